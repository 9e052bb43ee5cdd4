"""Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019), in percent.

* Written from the definition: a predicted and a ground-truth segment of the same class match when IoU > 0.5, where pixels the
  ground truth marks VOID (id 0) are removed from the prediction's area; ground-truth crowd segments are
  never false negatives, and an unmatched prediction whose pixels lie mostly (> 0.5) on VOID or on
  crowd regions of its own class is not a false positive. Per class
  ``PQ = sum_TP IoU / (|TP| + |FP|/2 + |FN|/2) = SQ * RQ`` with ``SQ = sum_TP IoU / |TP|`` and
  ``RQ = |TP| / (|TP| + |FP|/2 + |FN|/2)``; classes with no TP, FP or FN are left out of the averages.
* PQ^St for semantic predictions (Table 2, VII): ``semantic_to_panoptic`` makes every class region one
  segment, and all classes are scored as stuff (``PQAccumulator.add_semantic``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

VOID = 0  # segment id of unlabeled pixels in COCO panoptic PNGs
_OFFSET = 256**3  # larger than any RGB-encoded id, so gt_id * _OFFSET + pred_id is unique


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
    for name, info, segments in (("ground-truth", gt_info, gt_segments), ("predicted", pred_info, pred_segments)):
        if len(info) != len(segments):  # one id listed twice would be counted twice (or its category lost)
            ids = [int(s["id"]) for s in segments]
            raise ValueError(f"{name} segments list id(s) {sorted({i for i in ids if ids.count(i) > 1})} "
                             f"more than once")
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
