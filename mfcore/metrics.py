"""Evaluation metrics, in percent as the paper reports them.

* ``SemSegEvaluator``: mIoU / pixel accuracy / mean class accuracy from a dataset-level confusion matrix,
  counted as detectron2's evaluator (which produced the paper's numbers) counts them: a class enters the
  means only if it occurs in the ground truth.
* Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019), written from the definition:
  a predicted and a ground-truth segment of the same class match when IoU > 0.5, where pixels the
  ground truth marks VOID (id 0) are removed from the prediction's area; ground-truth crowd segments are
  never false negatives, and an unmatched prediction whose pixels lie mostly (> 0.5) on VOID or on
  crowd regions of its own class is not a false positive. Per class
  ``PQ = sum_TP IoU / (|TP| + |FP|/2 + |FN|/2) = SQ * RQ`` with ``SQ = sum_TP IoU / |TP|`` and
  ``RQ = |TP| / (|TP| + |FP|/2 + |FN|/2)``; classes with no TP, FP or FN are left out of the averages.
* PQ^St for semantic predictions (Table 2, VII): ``semantic_to_panoptic`` makes every class region one
  segment, and all classes are scored as stuff (``PQAccumulator.add_semantic``).
* ``mask_ap``: COCO mask AP through pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

VOID = 0  # segment id of unlabeled pixels in COCO panoptic PNGs
_OFFSET = 256**3  # larger than any RGB-encoded id, so gt_id * _OFFSET + pred_id is unique


class SemSegEvaluator:
    """Dataset-level confusion matrix for semantic segmentation.

    ``conf[g, p]`` counts pixels of ground-truth class g predicted as p; column K counts pixels the
    prediction left VOID (``ignore_label``, e.g. from general inference), which are errors for their
    ground-truth class but false positives of no class. Ground-truth ``ignore_label`` pixels are skipped.
    """

    def __init__(self, num_classes: int, ignore_label: int = 255) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.conf = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    def reset(self) -> None:
        self.conf.zero_()

    def _labels(self, values: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
        values = torch.as_tensor(values).cpu().long().flatten()
        bad = (values != self.ignore_label) & ((values < 0) | (values >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"{name} contains label {int(values[bad][0])}; expected 0..{self.num_classes - 1} "
                f"or ignore_label {self.ignore_label}"
            )
        return values

    def update(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> None:
        """Add one image: ``pred`` [H, W] and ``gt`` [H, W] integer label maps."""
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from gt shape {tuple(gt.shape)}")
        pred, gt = self._labels(pred, "pred"), self._labels(gt, "gt")
        valid = gt != self.ignore_label
        pred = torch.where(pred == self.ignore_label, self.num_classes, pred)[valid]
        width = self.num_classes + 1
        counts = torch.bincount(gt[valid] * width + pred, minlength=self.num_classes * width)
        self.conf += counts.reshape(self.num_classes, width)

    def merge(self, other: SemSegEvaluator) -> None:
        """Add another evaluator's counts (e.g. gathered from another process)."""
        if other.conf.shape != self.conf.shape:
            raise ValueError(f"cannot merge confusion matrices {tuple(other.conf.shape)} and {tuple(self.conf.shape)}")
        self.conf += other.conf

    def sync(self) -> None:
        """Sum the confusion matrices of all processes (call once, after the last update)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        conf = self.conf.cuda() if dist.get_backend() == "nccl" else self.conf.clone()
        dist.all_reduce(conf)
        self.conf = conf.cpu()

    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "ignore_label": self.ignore_label, "conf": self.conf.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"state has {state['num_classes']} classes, evaluator has {self.num_classes}")
        self.conf = torch.as_tensor(state["conf"], dtype=torch.int64).clone()

    def compute(self) -> dict:
        """{"mIoU", "pixel_acc", "mAcc", "per_class_iou"} in percent; per-class IoU is nan for classes
        absent from the ground truth (detectron2's rule: they do not enter the means)."""
        conf = self.conf.double().numpy()
        tp = np.diag(conf[:, : self.num_classes])
        pos_gt = conf.sum(axis=1)  # includes pixels predicted VOID
        pos_pred = conf[:, : self.num_classes].sum(axis=0)
        present = pos_gt > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(present, tp / (pos_gt + pos_pred - tp), np.nan)  # IoU = TP / (TP + FP + FN)
            acc = np.where(present, tp / pos_gt, np.nan)
        total = pos_gt.sum()
        return {
            "mIoU": float(np.mean(iou[present])) * 100 if present.any() else math.nan,
            "pixel_acc": float(tp.sum() / total) * 100 if total > 0 else math.nan,
            "mAcc": float(np.mean(acc[present])) * 100 if present.any() else math.nan,
            "per_class_iou": (iou * 100).tolist(),
        }


# ----------------------------------------------------------------------------------------- panoptic


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 COCO panoptic PNG -> [H, W] int64 ids, id = R + 256 G + 256^2 B."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] ids -> [H, W, 3] uint8 (inverse of ``rgb_to_id``)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def _isthing_by_category(categories: Sequence[Mapping] | Mapping[int, Mapping]) -> dict[int, bool]:
    """COCO-style ``[{"id", "isthing"}, ...]`` (or ``{id: {"isthing"}}``) -> ``{id: isthing}``."""
    items = categories.values() if isinstance(categories, Mapping) else categories
    return {int(c["id"]): bool(c.get("isthing", 0)) for c in items}


def pq_compute_single(
    gt_seg: np.ndarray | torch.Tensor,
    gt_segments: Sequence[Mapping],
    pred_seg: np.ndarray | torch.Tensor,
    pred_segments: Sequence[Mapping],
    categories: Sequence[Mapping] | Mapping[int, Mapping],
) -> dict[int, dict[str, float]]:
    """PQ counts of one image: ``{category_id: {"tp", "fp", "fn", "iou" (sum over TPs)}}``.

    Args:
        gt_seg, pred_seg: [H, W] segment ids, 0 = VOID.
        gt_segments: ``[{"id", "category_id", "iscrowd" (default 0)}, ...]``; pred_segments: ``[{"id",
            "category_id"}, ...]``; categories: ``[{"id", "isthing"}, ...]``.
    """
    gt = np.asarray(gt_seg, dtype=np.int64)
    pred = np.asarray(pred_seg, dtype=np.int64)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"expected gt and pred segmentations of one [H, W] shape, got {gt.shape} and {pred.shape}")
    known = _isthing_by_category(categories)
    gt_info = {int(s["id"]): s for s in gt_segments}
    pred_info = {int(s["id"]): s for s in pred_segments}
    for name, info in (("ground-truth", gt_info), ("predicted", pred_info)):
        for seg_id, seg in info.items():
            if seg_id == VOID:
                raise ValueError(f"{name} segment id 0 is reserved for VOID")
            if int(seg["category_id"]) not in known:
                raise ValueError(f"{name} segment {seg_id} has unknown category_id {seg['category_id']}")

    gt_area = dict(zip(*(a.tolist() for a in np.unique(gt, return_counts=True))))
    pred_area = dict(zip(*(a.tolist() for a in np.unique(pred, return_counts=True))))
    for name, area, info in (("ground-truth", gt_area, gt_info), ("predicted", pred_area, pred_info)):
        unlisted = sorted(set(area) - set(info) - {VOID})
        if unlisted:
            raise ValueError(f"{name} segmentation has ids {unlisted[:5]} missing from its segments list")
    unpainted = sorted(set(pred_info) - set(pred_area))
    if unpainted:
        raise ValueError(f"predicted segments {unpainted[:5]} are listed but have no pixels")

    pair_ids, pair_counts = np.unique(gt * _OFFSET + pred, return_counts=True)
    overlap = {divmod(int(k), _OFFSET): int(n) for k, n in zip(pair_ids, pair_counts)}

    stats = {cat: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for cat in known}
    matched_gt: set[int] = set()
    matched_pred: set[int] = set()
    for (g, p), inter in overlap.items():
        if g == VOID or p == VOID:
            continue
        g_seg, p_seg = gt_info[g], pred_info[p]
        if g_seg.get("iscrowd", 0) or int(g_seg["category_id"]) != int(p_seg["category_id"]):
            continue
        # VOID pixels of the prediction are not counted in its area, hence not in the union.
        union = pred_area[p] + gt_area[g] - inter - overlap.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:  # IoU > 0.5 makes the matching unique (Kirillov et al., Thm. 1)
            stats[int(g_seg["category_id"])]["tp"] += 1
            stats[int(g_seg["category_id"])]["iou"] += iou
            matched_gt.add(g)
            matched_pred.add(p)

    crowd_by_category: dict[int, list[int]] = {}
    for g, g_seg in gt_info.items():
        if g in matched_gt:
            continue
        if g_seg.get("iscrowd", 0):  # crowd regions are never false negatives
            crowd_by_category.setdefault(int(g_seg["category_id"]), []).append(g)
        else:
            stats[int(g_seg["category_id"])]["fn"] += 1
    for p, p_seg in pred_info.items():
        if p in matched_pred:
            continue
        category = int(p_seg["category_id"])
        ignored = overlap.get((VOID, p), 0)
        ignored += sum(overlap.get((c, p), 0) for c in crowd_by_category.get(category, []))
        if ignored / pred_area[p] > 0.5:  # mostly on VOID / same-class crowd: not a false positive
            continue
        stats[category]["fp"] += 1
    return stats


def semantic_to_panoptic(label_map: np.ndarray | torch.Tensor, ignore_label: int = 255) -> tuple[np.ndarray, list[dict]]:
    """Semantic label map [H, W] -> (segmentation [H, W] with id = class + 1 and VOID = 0 where
    ``ignore_label``, segments ``[{"id", "category_id", "iscrowd": 0}]``): one segment per class region."""
    labels = np.asarray(label_map, dtype=np.int64)
    valid = labels != ignore_label
    if (labels[valid] < 0).any():
        raise ValueError(f"label map contains negative label {int(labels[valid][labels[valid] < 0][0])}")
    segmentation = np.where(valid, labels + 1, VOID)
    segments = [{"id": int(c) + 1, "category_id": int(c), "iscrowd": 0} for c in np.unique(labels[valid])]
    return segmentation, segments


def semantic_categories(num_classes: int) -> list[dict]:
    """Categories 0..K-1 all scored as stuff, for PQ^St."""
    return [{"id": c, "isthing": 0} for c in range(num_classes)]


class PQAccumulator:
    """Sums per-category PQ counts over images and averages them (All / Things / Stuff, in percent)."""

    def __init__(self, categories: Sequence[Mapping] | Mapping[int, Mapping]) -> None:
        self.categories = [{"id": c, "isthing": t} for c, t in _isthing_by_category(categories).items()]
        self.stats = {c["id"]: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in self.categories}

    def add(self, gt_seg, gt_segments, pred_seg, pred_segments) -> None:
        """Add one image (arguments as in ``pq_compute_single``)."""
        self._add_stats(pq_compute_single(gt_seg, gt_segments, pred_seg, pred_segments, self.categories))

    def add_semantic(self, pred_labels, gt_labels, ignore_label: int = 255) -> None:
        """Add one image of semantic label maps [H, W] for PQ^St (use ``semantic_categories``)."""
        gt_seg, gt_segments = semantic_to_panoptic(gt_labels, ignore_label)
        pred_seg, pred_segments = semantic_to_panoptic(pred_labels, ignore_label)
        self.add(gt_seg, gt_segments, pred_seg, pred_segments)

    def merge(self, other: PQAccumulator) -> None:
        self._add_stats(other.stats)

    def _add_stats(self, stats: Mapping[int, Mapping[str, float]]) -> None:
        for cat, s in stats.items():
            if cat not in self.stats:
                raise ValueError(f"unknown category_id {cat}")
            for key in ("tp", "fp", "fn", "iou"):
                self.stats[cat][key] += s[key]

    def compute(self) -> dict:
        """{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {"pq", "sq", "rq", "tp",
        "fp", "fn"}}}; percent; nan where no category counts."""
        per_class = {}
        for cat, s in self.stats.items():
            denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
            if denom == 0:  # category absent from both gt and predictions: left out
                continue
            per_class[cat] = {
                "pq": 100 * s["iou"] / denom,
                "sq": 100 * s["iou"] / s["tp"] if s["tp"] else 0.0,
                "rq": 100 * s["tp"] / denom,
                "tp": s["tp"], "fp": s["fp"], "fn": s["fn"],
            }
        isthing = {c["id"]: c["isthing"] for c in self.categories}
        result: dict = {}
        for name, select in (("All", lambda t: True), ("Things", lambda t: t), ("Stuff", lambda t: not t)):
            chosen = [v for cat, v in per_class.items() if select(isthing[cat])]
            n = len(chosen)
            result[name] = {k: (sum(v[k] for v in chosen) / n if n else math.nan) for k in ("pq", "sq", "rq")}
            result[name]["n"] = n
        result["per_class"] = per_class
        return result


def _read_panoptic_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    with Image.open(path) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


def pq_from_files(
    gt_json: str | Path,
    gt_folder: str | Path,
    pred_json: str | Path,
    pred_folder: str | Path,
    categories: Sequence[Mapping] | None = None,
) -> dict:
    """PQ over COCO-panoptic files (JSON with "annotations" [{"image_id", "file_name", "segments_info"}]
    + RGB-id PNGs). ``categories`` defaults to the ground-truth JSON's. Returns ``PQAccumulator.compute()``."""
    gt_data = json.loads(Path(gt_json).read_text())
    pred_data = json.loads(Path(pred_json).read_text())
    categories = categories if categories is not None else gt_data.get("categories")
    if not categories:
        raise ValueError(f"no categories given and none in {gt_json}")
    gt_anns = {a["image_id"]: a for a in gt_data["annotations"]}
    pred_anns = {a["image_id"]: a for a in pred_data["annotations"]}
    unknown = sorted(set(pred_anns) - set(gt_anns), key=str)
    if unknown:
        raise ValueError(f"{pred_json} has predictions for image ids {unknown[:5]} that are not in {gt_json}")
    missing = sorted(set(gt_anns) - set(pred_anns), key=str)
    if missing:
        raise ValueError(f"{pred_json} has no prediction for image ids {missing[:5]} of {gt_json}")

    accumulator = PQAccumulator(categories)
    for image_id, gt_ann in gt_anns.items():
        pred_ann = pred_anns[image_id]
        gt_seg = _read_panoptic_png(Path(gt_folder) / gt_ann["file_name"])
        pred_seg = _read_panoptic_png(Path(pred_folder) / pred_ann["file_name"])
        try:
            accumulator.add(gt_seg, gt_ann["segments_info"], pred_seg, pred_ann["segments_info"])
        except ValueError as err:
            raise ValueError(f"image id {image_id}: {err}") from err
    return accumulator.compute()


def mask_ap(gts: Sequence[Mapping], preds: Sequence[Mapping], num_classes: int) -> dict[str, float]:
    """COCO mask AP (pycocotools COCOeval, iouType "segm"), in percent.

    Args:
        gts: per image ``{"masks": [M, H, W] bool, "labels": [M], "iscrowd": [M] (optional)}``.
        preds: per image ``{"masks": [M', H, W] bool, "labels": [M'], "scores": [M']}`` (e.g. from
            ``instance_inference``); labels are contiguous 0..K-1.
    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"}; nan where COCOeval has no ground truth (-1).
    """
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(gts) != len(preds):
        raise ValueError(f"got {len(gts)} ground-truth images and {len(preds)} predictions")

    def encode(mask) -> dict:
        rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        return rle

    images, annotations, detections = [], [], []
    for image_id, (gt, pred) in enumerate(zip(gts, preds), start=1):
        gt_masks = np.asarray(gt["masks"], dtype=bool)
        images.append({"id": image_id, "height": gt_masks.shape[-2], "width": gt_masks.shape[-1]})
        crowd = np.asarray(gt.get("iscrowd", np.zeros(len(gt_masks))), dtype=int)
        for mask, label, is_crowd in zip(gt_masks, np.asarray(gt["labels"]), crowd):
            rle = encode(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "segmentation": rle, "area": float(mask_util.area(rle)),
                "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": int(is_crowd),
            })
        for mask, label, score in zip(np.asarray(pred["masks"]), np.asarray(pred["labels"]), np.asarray(pred["scores"])):
            detections.append({"image_id": image_id, "category_id": int(label),
                               "segmentation": encode(mask), "score": float(score)})
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not detections:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations,
                           "categories": [{"id": c} for c in range(num_classes)]}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: (float(v) * 100 if v >= 0 else math.nan) for k, v in zip(keys, evaluator.stats[:6])}
