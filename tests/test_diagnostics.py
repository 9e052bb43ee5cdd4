"""The class-accuracy / mask-IoU diagnostic: a hand-checkable case and a tiny untrained model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mfcore.companion.diagnostics import MatchingDiagnostic, matching_diagnostic
from mfcore.data import build_dataset, make_synthetic
from mfcore.matcher import HungarianMatcher
from mfcore.modeling.models import build_model
from mfcore.presets import get_preset


def _ground_truth() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three classes over a 4x4 image: labels [3], masks [3, 4, 4], sem_seg [4, 4] (one ignored pixel)."""
    sem_seg = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 1, 1], [1, 1, 1, 255]])
    labels = torch.tensor([0, 1, 2])
    masks = torch.stack([sem_seg == k for k in labels])
    return labels, masks, sem_seg


def test_ground_truth_as_prediction_scores_100():
    labels, masks, sem_seg = _ground_truth()
    num_classes, queries = 4, 5
    logits = torch.full((queries, num_classes + 1), -10.0)
    logits[:, num_classes] = 10.0  # spare queries: no object
    mask_logits = torch.full((queries, 4, 4), -10.0)
    for q, (k, m) in enumerate(zip(labels.tolist(), masks), start=2):  # queries 2..4 hold the segments
        logits[q] = -10.0
        logits[q, k] = 10.0
        mask_logits[q] = torch.where(m, 10.0, -10.0)
    diag = MatchingDiagnostic(num_classes, 255, HungarianMatcher())
    diag.update(logits, mask_logits, labels, masks, sem_seg)
    out = diag.compute()
    assert out["matched_segments"] == 3
    assert out["confident_per_image"] == 3 and out["images_with_confident"] == 100.0  # the spare ones say no-object
    for key in ("class_acc", "mask_iou", "mIoU", "pixel_acc", "oracle_class_mIoU", "oracle_mask_mIoU"):
        assert out[key] == pytest.approx(100.0), key


def test_wrong_classes_are_fixed_by_the_class_oracle_only():
    labels, masks, sem_seg = _ground_truth()
    logits = torch.full((3, 4), -10.0)
    logits[torch.arange(3), torch.tensor([1, 2, 0])] = 10.0  # every segment gets the wrong class
    mask_logits = torch.where(masks, 10.0, -10.0)
    diag = MatchingDiagnostic(3, 255, HungarianMatcher(cost_class=0.0))  # match by mask only
    diag.update(logits, mask_logits, labels, masks, sem_seg)
    out = diag.compute()
    assert out["class_acc"] == 0.0 and out["mask_iou"] == pytest.approx(100.0)
    assert out["mIoU"] == 0.0 and out["oracle_class_mIoU"] == pytest.approx(100.0) and out["oracle_mask_mIoU"] == 0.0


def test_confident_queries_are_those_panoptic_inference_keeps():
    """A query counts when its top class is real and above the object-mask threshold (0.8): one sure query,
    one at 0.6 and one sure of no-object give one confident query; the second image has none."""
    labels, masks, sem_seg = _ground_truth()
    logits = torch.full((3, 4), -10.0)
    logits[0, 0] = 10.0                                   # sure of class 0
    logits[1, 1], logits[1, 2] = 0.0, -0.405              # p(class 1) ~ 0.6
    logits[2, 3] = 10.0                                   # sure of no-object
    diag = MatchingDiagnostic(3, 255, HungarianMatcher())
    diag.update(logits, torch.where(masks, 10.0, -10.0), labels, masks, sem_seg)
    logits[0, 1] = 10.0                                   # the second image: query 0 torn between two classes
    diag.update(logits, torch.where(masks, 10.0, -10.0), labels, masks, sem_seg)
    out = diag.compute()
    assert out["confident_per_image"] == 0.5 and out["images_with_confident"] == 50.0


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> object:
    root: Path = tmp_path_factory.mktemp("diag")
    make_synthetic(root, num_classes=6, num_train=0, num_val=2, image_size=32, kind="semantic", workers=1,
                   design="hue")
    return build_dataset("synthetic", root, "val")


@pytest.mark.parametrize("preset, applicable", [("synthetic-maskformer-tiny", True),
                                                 ("synthetic-perpixel-tiny", False)])
def test_untrained_tiny_models_give_percentages(one_thread, val_set, preset, applicable):
    spec = get_preset(preset)
    model = build_model(spec.model, num_classes=6, pretrained=None)
    out = matching_diagnostic(model, val_set, spec.train)
    assert out["applicable"] is applicable and out["num_images"] == 2
    keys = ["mIoU", "pixel_acc"] + (["class_acc", "mask_iou", "oracle_class_mIoU", "oracle_mask_mIoU"]
                                    if applicable else [])
    for key in keys:
        assert 0.0 <= out[key] <= 100.0 and not math.isnan(out[key]), key
    if applicable:
        assert out["matched_segments"] == sum(len(val_set[i]["labels"]) for i in range(2))
