"""Evaluation metrics, in percent as the paper reports them.

* ``SemSegEvaluator``: mIoU / pixel accuracy / mean class accuracy from a dataset-level confusion matrix,
  counted as detectron2's evaluator (which produced the paper's numbers) counts them: a class enters mIoU
  when it occurs in the ground truth or in the prediction (GT + predicted pixels > 0), so a class predicted
  but absent from the ground truth counts as IoU 0; mAcc averages over the classes of the ground truth.
* ``MaskAPAccumulator`` / ``mask_ap``: COCO mask AP through pycocotools (the instance output of panoptic
  datasets in ``mfcore.training.evaluate``).
* Panoptic quality (PQ, and PQ^St of semantic predictions) lives in ``mfcore.panoptic_quality``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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

    def sync(self) -> None:
        """Sum the confusion matrices of all processes (call once, after the last update)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        conf = self.conf.cuda() if dist.get_backend() == "nccl" else self.conf.clone()
        dist.all_reduce(conf)
        self.conf = conf.cpu()

    def compute(self) -> dict:
        """{"mIoU", "pixel_acc", "mAcc", "per_class_iou"} in percent.

        detectron2's rule, which the paper's numbers use: a class enters mIoU when it is in the ground truth
        or in the prediction (TP + FP + FN > 0), so a class predicted but absent from the ground truth counts
        as IoU 0; per-class IoU is nan only for classes neither present nor predicted. mAcc averages over the
        classes present in the ground truth."""
        conf = self.conf.double().numpy()
        tp = np.diag(conf[:, : self.num_classes])
        pos_gt = conf.sum(axis=1)  # includes pixels predicted VOID
        pos_pred = conf[:, : self.num_classes].sum(axis=0)
        present = pos_gt > 0
        seen = present | (pos_pred > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(seen, tp / (pos_gt + pos_pred - tp), np.nan)  # IoU = TP / (TP + FP + FN)
            acc = np.where(present, tp / pos_gt, np.nan)
        total = pos_gt.sum()
        return {
            "mIoU": float(np.mean(iou[seen])) * 100 if seen.any() else math.nan,
            "pixel_acc": float(tp.sum() / total) * 100 if total > 0 else math.nan,
            "mAcc": float(np.mean(acc[present])) * 100 if present.any() else math.nan,
            "per_class_iou": (iou * 100).tolist(),
        }


class MaskAPAccumulator:
    """COCO mask AP (pycocotools COCOeval, iouType "segm") over images added one at a time: masks are
    run-length encoded as they arrive, so a dataset's worth of full-resolution masks is never held.
    Labels are contiguous 0..K-1; `sync` gathers the images of all processes (call once, before compute)."""

    KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[dict] = []

    @staticmethod
    def _encode(mask: Any) -> dict:
        from pycocotools import mask as mask_util

        rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        return rle

    def add(self, gt: Mapping, pred: Mapping) -> None:
        """One image. gt: ``{"masks": [M, H, W] bool, "labels": [M], "iscrowd": [M] (optional)}``; pred:
        ``{"masks": [M', H, W] bool, "labels": [M'], "scores": [M']}`` (e.g. from ``instance_inference``)."""
        from pycocotools import mask as mask_util

        gt_masks = np.asarray(to_numpy(gt["masks"]), dtype=bool)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": gt_masks.shape[-2], "width": gt_masks.shape[-1]})
        crowd = np.asarray(to_numpy(gt.get("iscrowd", np.zeros(len(gt_masks)))), dtype=int)
        for mask, label, is_crowd in zip(gt_masks, to_numpy(gt["labels"]), crowd):
            rle = self._encode(mask)
            self.annotations.append({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                                     "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(),
                                     "iscrowd": int(is_crowd)})
        for mask, label, score in zip(to_numpy(pred["masks"]), to_numpy(pred["labels"]), to_numpy(pred["scores"])):
            self.detections.append({"image_id": image_id, "category_id": int(label),
                                    "segmentation": self._encode(mask), "score": float(score)})

    def sync(self) -> None:
        """Collect every process's images (renumbered) into this accumulator."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.images, self.annotations, self.detections))
        self.images, self.annotations, self.detections = [], [], []
        for part_images, part_annotations, part_detections in parts:
            offset = len(self.images)
            self.images += [{**im, "id": im["id"] + offset} for im in part_images]
            self.annotations += [{**a, "image_id": a["image_id"] + offset} for a in part_annotations]
            self.detections += [{**d, "image_id": d["image_id"] + offset} for d in part_detections]

    def compute(self) -> dict[str, float]:
        """{"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent; nan where COCOeval has no ground truth (-1),
        0 when nothing was predicted."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not self.detections:
            return dict.fromkeys(self.KEYS, 0.0)
        annotations = [{**a, "id": i} for i, a in enumerate(self.annotations, start=1)]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco_gt = COCO()
            coco_gt.dataset = {"images": self.images, "annotations": annotations,
                               "categories": [{"id": c} for c in range(self.num_classes)]}
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(self.detections), iouType="segm")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {k: (float(v) * 100 if v >= 0 else math.nan) for k, v in zip(self.KEYS, evaluator.stats[:6])}


def to_numpy(value: Any) -> np.ndarray:
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def mask_ap(gts: Sequence[Mapping], preds: Sequence[Mapping], num_classes: int) -> dict[str, float]:
    """COCO mask AP of whole lists of images (`MaskAPAccumulator`), in percent."""
    if len(gts) != len(preds):
        raise ValueError(f"got {len(gts)} ground-truth images and {len(preds)} predictions")
    accumulator = MaskAPAccumulator(num_classes)
    for gt, pred in zip(gts, preds):
        accumulator.add(gt, pred)
    return accumulator.compute()
