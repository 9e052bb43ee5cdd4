"""Where does a mask-classification model lose mIoU: in its classes or in its masks?

The last decoder layer's N (class, mask) pairs of each validation image are matched to the ground-truth
segments with the training matcher (Hungarian, the checkpoint's cost weights). Over the matched pairs:

* class accuracy: the query's argmax over K+1 (no-object counts as wrong) is the segment's class;
* mask IoU: IoU of the query's binary mask (logit > 0) with the segment's mask, averaged over pairs;

and three dataset-level mIoUs from semantic inference: as predicted, with oracle classes (matched queries
get their segment's class, prob 1) and with oracle masks (matched queries get their segment's mask). A
large gap to the oracle-class mIoU says the classes are the bottleneck; to the oracle-mask mIoU, the
masks. Per-pixel models have no queries: only their mIoU and pixel accuracy are reported.

Over all queries it also counts the confident ones, those panoptic inference keeps (a real class with
p_i(c_i) > the object-mask threshold, 0.8 on COCO; section 3.4): a panoptic PQ of 0 with no confident
query says the classes never became sure enough, not that the masks are wrong.

`class_group_iou` reads a finished run's per-class IoU by group (thing vs stuff classes): where a mIoU gap sits.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mfcore.config import TrainConfig
from mfcore.inference import confident_queries, semantic_inference
from mfcore.test_time import predict_semantic, resize_shortest_edge
from mfcore.matcher import HungarianMatcher
from mfcore.metrics import SemSegEvaluator
from mfcore.training.checkpoint import configs_from_checkpoint, load_trained_model
from mfcore.training.evaluate import mask_predictions
from mfcore.training.runtime import checkpoint_dataset, resolve_device

_SURE = 50.0  # a logit that sigmoid / softmax read as certain


class MatchingDiagnostic:
    """Accumulates the diagnostic over images; `compute()` gives the numbers in percent."""

    def __init__(self, num_classes: int, ignore_label: int, matcher: HungarianMatcher,
                 object_mask_threshold: float = 0.8) -> None:
        self.matcher = matcher
        self.object_mask_threshold = object_mask_threshold
        self.confident = self.images_with_confident = self.images = 0
        self.semantic = {name: SemSegEvaluator(num_classes, ignore_label)
                         for name in ("predicted", "oracle_class", "oracle_mask")}
        self.correct = self.matched = 0
        self.iou_sum = 0.0

    @torch.inference_mode()
    def update(self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, masks: Tensor, sem_seg: Tensor) -> None:
        """One image: pred_logits [N, K+1], pred_masks [N, H, W] logits at the label's size; ground truth
        labels [n], masks bool [n, H, W], sem_seg [H, W]."""
        query, target = self.matcher({"pred_logits": pred_logits[None], "pred_masks": pred_masks[None]},
                                      [{"labels": labels, "masks": masks}])[0]
        query, target = query.to(pred_logits.device), target.to(pred_logits.device)
        gt_labels, gt_masks = labels[target], masks[target].bool()
        self.correct += int((pred_logits[query].argmax(-1) == gt_labels).sum())
        binary = pred_masks[query] > 0
        inter = (binary & gt_masks).flatten(1).sum(1)
        union = (binary | gt_masks).flatten(1).sum(1)
        self.iou_sum += float((inter / union.clamp(min=1)).sum())
        self.matched += len(query)
        confident = int(confident_queries(pred_logits, self.object_mask_threshold)[2].sum())
        self.confident += confident
        self.images_with_confident += confident > 0
        self.images += 1

        oracle_logits = pred_logits.clone()
        oracle_logits[query] = -_SURE
        oracle_logits[query, gt_labels] = _SURE
        oracle_masks = pred_masks.clone()
        oracle_masks[query] = torch.where(gt_masks, _SURE, -_SURE)
        for name, (lg, mk) in {"predicted": (pred_logits, pred_masks), "oracle_class": (oracle_logits, pred_masks),
                               "oracle_mask": (pred_logits, oracle_masks)}.items():
            self.semantic[name].update(semantic_inference(lg, mk).argmax(0).cpu(), sem_seg.cpu())

    def compute(self) -> dict:
        """{"class_acc", "mask_iou", "mIoU", "pixel_acc", "oracle_class_mIoU", "oracle_mask_mIoU",
        "matched_segments", "confident_per_image", "images_with_confident"}; percentages (nan when nothing was
        matched), but confident_per_image: the mean number of confident queries per image."""
        scores = {name: ev.compute() for name, ev in self.semantic.items()}
        nan = float("nan")
        return {"class_acc": 100.0 * self.correct / self.matched if self.matched else nan,
                "mask_iou": 100.0 * self.iou_sum / self.matched if self.matched else nan,
                "mIoU": scores["predicted"]["mIoU"], "pixel_acc": scores["predicted"]["pixel_acc"],
                "oracle_class_mIoU": scores["oracle_class"]["mIoU"],
                "oracle_mask_mIoU": scores["oracle_mask"]["mIoU"], "matched_segments": self.matched,
                "confident_per_image": self.confident / self.images if self.images else nan,
                "images_with_confident": 100.0 * self.images_with_confident / self.images if self.images else nan}


def matching_diagnostic(model: nn.Module, dataset: Any, cfg: TrainConfig, matcher: HungarianMatcher | None = None,
                        device: torch.device | str = "cpu", max_images: int | None = None) -> dict:
    """The diagnostic of `model` on `dataset` (built without transform), tested as `evaluate` tests it:
    the image resized to cfg.test_short_side, predictions resized back to the label's size.

    Returns MatchingDiagnostic.compute() plus {"applicable": True, "num_images"} for MaskFormer;
    {"applicable": False, "num_images", "mIoU", "pixel_acc"} for per-pixel models.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    mask_classification = model.cfg.arch == "maskformer"
    diag = MatchingDiagnostic(dataset.num_classes, dataset.ignore_label, matcher or HungarianMatcher())
    semseg = SemSegEvaluator(dataset.num_classes, dataset.ignore_label)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    for index in range(count):
        sample = dataset[index]
        gt = sample["sem_seg"]
        out_size = tuple(gt.shape[-2:])
        resized = resize_shortest_edge(sample["image"].to(device), cfg.test_short_side, cfg.test_max_size)
        if mask_classification:
            logits, masks = mask_predictions(model, resized, out_size)
            diag.update(logits, masks, sample["labels"].to(device), sample["masks"].to(device), gt)
        else:
            with torch.inference_mode():
                semseg.update(predict_semantic(model, resized, out_size).argmax(0).cpu(), gt)
    model.train(was_training)
    if mask_classification:
        return {"applicable": True, "num_images": count, **diag.compute()}
    scores = semseg.compute()
    return {"applicable": False, "num_images": count, "mIoU": scores["mIoU"], "pixel_acc": scores["pixel_acc"]}


def diagnose_checkpoint(checkpoint: str | Path, data_root: str | Path | None = None, split: str = "val",
                        device: str = "auto", max_images: int | None = None) -> dict:
    """`matching_diagnostic` of an mfcore checkpoint on its preset's dataset, with the checkpoint's
    matching cost weights. Returns that dict plus {"checkpoint", "iteration", "split"}."""
    model, ckpt = load_trained_model(checkpoint)
    _, model_cfg, loss_cfg, train_cfg = configs_from_checkpoint(ckpt)
    dataset = checkpoint_dataset(checkpoint, model_cfg, train_cfg, data_root, split)
    run_device = resolve_device(device)
    matcher = HungarianMatcher(loss_cfg.cost_class, loss_cfg.cost_mask, loss_cfg.cost_dice)
    result = matching_diagnostic(model.to(run_device), dataset, train_cfg, matcher, run_device, max_images)
    return {"checkpoint": str(checkpoint), "iteration": ckpt.get("iteration"), "split": split, **result}


def class_group_iou(run_dir: Path, thing_ids: set[int]) -> dict[str, float]:
    """Mean val IoU of a run over its thing classes and over its stuff classes ({"things", "stuff"}), from the
    per-class IoU of its final evaluation (classes absent from val and never predicted left out)."""
    per_class = json.loads((run_dir / "final.json").read_text())["metrics"]["semantic"]["per_class"]
    groups: dict[str, list[float]] = {"things": [], "stuff": []}
    for row in per_class:
        if row.get("iou") is not None and math.isfinite(row["iou"]):
            groups["things" if row["id"] in thing_ids else "stuff"].append(row["iou"])
    return {name: statistics.fmean(values) if values else math.nan for name, values in groups.items()}
