"""Tests of mfcore.metrics against hand-computed confusion matrices and PQ counts."""

import math

import numpy as np
import pytest
import torch

from mfcore.metrics import SemSegEvaluator, mask_ap
from mfcore.panoptic_quality import (
    PQAccumulator,
    pq_compute_single,
    semantic_categories,
    semantic_to_panoptic,
)

# ------------------------------------------------------------------------------------------- mIoU

# Two images of 5 pixels; one ignored gt pixel (255) and one prediction left VOID (255).
GT = [[0, 0, 1, 1, 2], [255, 1, 0, 2, 0]]
PRED = [[0, 1, 1, 1, 0], [2, 2, 0, 255, 0]]


def test_semseg_hand_computed_confusion_matrix():
    gt, pred = torch.tensor(GT), torch.tensor(PRED)
    ev = SemSegEvaluator(num_classes=3)
    ev.update(pred[0], gt[0])  # two updates: the matrix is accumulated over the dataset
    ev.update(pred[1], gt[1])
    # gt0: pred 0 x3 (cols 0, 2, 4), pred 1 x1; gt1: pred 1 x2, pred 2 x1; gt2: pred 0 x1, VOID x1.
    assert ev.conf.tolist() == [[3, 1, 0, 0], [0, 2, 1, 0], [1, 0, 0, 1]]
    # tp = [3, 2, 0]; pos_gt = [4, 3, 2]; pos_pred = [4, 3, 1]
    iou = [3 / (4 + 4 - 3), 2 / (3 + 3 - 2), 0.0]
    out = ev.compute()
    assert out["per_class_iou"] == pytest.approx([100 * v for v in iou])
    assert out["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 5 / 9)
    assert out["mAcc"] == pytest.approx(100 * (3 / 4 + 2 / 3 + 0) / 3)


def test_semseg_a_class_predicted_but_absent_counts_as_zero():
    ev = SemSegEvaluator(num_classes=4)
    ev.update(np.array([[0, 0, 3, 1]]), np.array([[0, 0, 0, 1]]))
    out = ev.compute()
    # Class 2 is nowhere: nan, out of the mean. Class 3 is predicted but absent from the gt: IoU 0, in the
    # mean (detectron2's rule); mAcc still averages over the classes of the gt.
    assert math.isnan(out["per_class_iou"][2]) and out["per_class_iou"][3] == 0.0
    assert out["per_class_iou"][:2] == pytest.approx([100 * 2 / 3, 100.0])
    assert out["mIoU"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert out["mAcc"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_semseg_errors_and_counts_add_up():
    ev = SemSegEvaluator(num_classes=3)
    with pytest.raises(ValueError, match="gt contains label 7"):
        ev.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [0, 0]]))
    with pytest.raises(ValueError, match="pred contains label -1"):
        ev.update(torch.tensor([[0, -1], [0, 0]]), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        ev.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    both = SemSegEvaluator(3)
    both.update(torch.tensor(PRED), torch.tensor(GT))
    ev.update(torch.tensor(PRED[0]), torch.tensor(GT[0]))
    ev.update(torch.tensor(PRED[1]), torch.tensor(GT[1]))
    ev.sync()  # no process group: a no-op
    assert torch.equal(ev.conf, both.conf)


# ------------------------------------------------------------------------------------------- PQ

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "sky", "isthing": 0},
    {"id": 3, "name": "car", "isthing": 1},
]
# Ground truth, 4 x 10: sky (id 1), person (2), person (3), a crowd of cars (4), VOID (0).
GT_SEG = np.array([
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [2, 2, 2, 2, 0, 0, 3, 3, 3, 3],
    [2, 2, 2, 2, 0, 0, 3, 3, 3, 3],
    [4, 4, 4, 4, 4, 0, 0, 0, 0, 0],
])
GT_SEGMENTS = [
    {"id": 1, "category_id": 2, "iscrowd": 0},
    {"id": 2, "category_id": 1, "iscrowd": 0},
    {"id": 3, "category_id": 1, "iscrowd": 0},
    {"id": 4, "category_id": 3, "iscrowd": 1},
]
P = 70000  # an id that needs all three RGB channels
PRED_SEG = np.array([
    [10, 10, 10, 10, 10, 10, 10, 10, 10, 10],
    [0, 20, 20, 20, 20, 20, 0, 0, P, P],
    [0, 20, 20, 20, 20, 20, 0, 0, P, P],
    [0, 30, 30, 30, 30, 30, 0, 0, 0, 0],
])
PRED_SEGMENTS = [
    {"id": 10, "category_id": 2},  # sky: IoU 1 -> TP
    # person: 6 px on gt 2, 4 px on VOID; IoU 6 / (10 + 8 - 6 - 4) = 0.75 -> TP
    # (without discounting VOID: 6 / 12 = 0.5, no match)
    {"id": 20, "category_id": 1},
    {"id": 30, "category_id": 3},  # car: 4 px on the car crowd + 1 on VOID -> not a FP
    {"id": P, "category_id": 1},  # person: IoU with gt 3 = 4 / 8 = 0.5, not > 0.5 -> FP (and gt 3 FN)
]


def test_pq_compute_single_hand_counts():
    stats = pq_compute_single(GT_SEG, GT_SEGMENTS, PRED_SEG, PRED_SEGMENTS, CATEGORIES)
    assert {c: (s["tp"], s["fp"], s["fn"]) for c, s in stats.items()} == {1: (1, 1, 1), 2: (1, 0, 0), 3: (0, 0, 0)}
    assert stats[1]["iou"] == pytest.approx(0.75) and stats[2]["iou"] == pytest.approx(1.0)


def test_pq_crowd_absorbs_only_its_own_class():
    gt_segments = [dict(s) for s in GT_SEGMENTS]
    gt_segments[3]["category_id"] = 1  # the crowd is now of persons: the car prediction is a FP
    stats = pq_compute_single(GT_SEG, gt_segments, PRED_SEG, PRED_SEGMENTS, CATEGORIES)
    assert (stats[3]["tp"], stats[3]["fp"], stats[3]["fn"]) == (0, 1, 0)
    assert stats[1]["fn"] == 1  # the person crowd is still no false negative


def test_pq_summary_hand_computed():
    accumulator = PQAccumulator(CATEGORIES)
    accumulator.add(GT_SEG, GT_SEGMENTS, PRED_SEG, PRED_SEGMENTS)
    out = accumulator.compute()
    # person: PQ = 0.75 / (1 + 0.5 + 0.5) = 0.375, SQ 0.75, RQ 0.5; sky: 1, 1, 1; car: no TP/FP/FN, left out.
    assert out["per_class"][1] == pytest.approx({"pq": 37.5, "sq": 75.0, "rq": 50.0, "tp": 1, "fp": 1, "fn": 1})
    assert 3 not in out["per_class"]
    assert out["All"] == pytest.approx({"pq": 68.75, "sq": 87.5, "rq": 75.0, "n": 2})
    assert out["Things"] == pytest.approx({"pq": 37.5, "sq": 75.0, "rq": 50.0, "n": 1})
    assert out["Stuff"] == pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 1})


def test_pq_unlisted_segment_is_an_error():
    with pytest.raises(ValueError, match=r"\[70000\] missing from its segments list"):
        PQAccumulator(CATEGORIES).add(GT_SEG, GT_SEGMENTS, PRED_SEG, PRED_SEGMENTS[:3])


def test_pq_st_from_semantic_maps():
    gt = np.array([[0, 0, 255, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 0, 0, 1], [0, 0, 0, 1]])
    seg, segments = semantic_to_panoptic(gt)
    assert seg.tolist() == [[1, 1, 0, 2], [1, 1, 2, 2]]
    assert segments == [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0}]
    acc = PQAccumulator(semantic_categories(3))
    acc.add_semantic(pred, gt)
    # class 0: pred 6 px (1 on VOID), gt 4, inter 4 -> IoU 4 / (6 + 4 - 4 - 1) = 0.8
    # class 1: pred 2, gt 3, inter 2 -> IoU 2 / 3; class 2 absent -> left out
    out = acc.compute()
    assert out["All"] == pytest.approx({"pq": 100 * (0.8 + 2 / 3) / 2, "sq": 100 * (0.8 + 2 / 3) / 2, "rq": 100.0, "n": 2})
    assert out["Things"]["n"] == 0 and math.isnan(out["Things"]["pq"])


def test_mask_ap_perfect_and_wrong_labels():
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, :10, :10] = True
    masks[1, 16:, 8:30] = True
    gts = [{"masks": masks, "labels": np.array([0, 1])}]
    perfect = [{"masks": masks, "labels": np.array([0, 1]), "scores": np.array([0.9, 0.8])}]
    swapped = [{"masks": masks, "labels": np.array([1, 0]), "scores": np.array([0.9, 0.8])}]
    assert mask_ap(gts, perfect, num_classes=2)["AP"] == pytest.approx(100.0)
    assert mask_ap(gts, swapped, num_classes=2)["AP"] == pytest.approx(0.0)
