"""Tests of the tiled label path against the unfused semantic inference it must equal."""

import pytest
import torch
import torch.nn.functional as F

from mfcore import fast
from mfcore.fast.mask_loss import interpolation_matrix
from mfcore.fast.semantic_labels import semantic_labels
from mfcore.inference import semantic_inference
from mfcore.test_time import postprocess_masks
from mfcore.modeling.models import build_model
from mfcore.training.evaluate import mask_labels, mask_predictions


@pytest.mark.parametrize("out_size,in_size", [(64, 16), (37, 16), (16, 37), (20, 20), (1, 5)])
def test_interpolation_matrix_is_f_interpolate_up_and_down(out_size, in_size):
    """The rows semantic_labels resizes the height with (equal to F.interpolate to a few ulps)."""
    torch.manual_seed(0)
    x = torch.randn(3, in_size)
    expected = F.interpolate(x[None, :, None, :], size=(1, out_size), mode="bilinear", align_corners=False)[0, :, 0]
    weights = interpolation_matrix(in_size, out_size, x.device)
    torch.testing.assert_close(x @ weights.t(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("padded,image,output,tile", [
    ((64, 64), (64, 64), (64, 64), None),   # the benchmark's case: no padding, no second resize
    ((32, 40), (27, 33), (50, 61), 3),      # padding cropped, then resized up; tiles not dividing the rows
    ((32, 32), (20, 30), (13, 9), 1),       # resized down, one row per tile
    ((32, 32), (32, 32), (32, 32), 100),    # one tile larger than the map
    ((32, 40), (27, 33), (50, 61), 50),     # one tile with padding and a resize (the GPU default)
])
def test_labels_equal_argmax_of_semantic_inference(padded, image, output, tile):
    torch.manual_seed(0)
    batch, queries, classes = 2, 12, 9
    logits = 2 * torch.randn(batch, queries, classes + 1)
    masks = 3 * torch.randn(batch, queries, padded[0] // 4, padded[1] // 4)
    labels = semantic_labels(logits, masks, padded, image, output, rows_per_tile=tile)
    assert labels.shape == (batch, *output) and labels.dtype == torch.int64
    for b in range(batch):  # reference in float64, so only genuine near-ties may differ
        scores = semantic_inference(logits[b].double(), postprocess_masks(masks[b].double(), padded, image, output))
        top2 = scores.topk(2, dim=0).values
        differ = labels[b] != scores.argmax(0)
        assert ((top2[0] - top2[1])[differ] < 1e-5).all()
        assert differ.float().mean() < 1e-3


def test_labels_follow_the_masks():
    """Two queries, each certain of its class, owning the left and right halves: the map is split there."""
    logits = torch.log(torch.tensor([[[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]]]))
    masks = torch.full((1, 2, 4, 8), -20.0)
    masks[0, 0, :, :4] = masks[0, 1, :, 4:] = 20.0
    labels = semantic_labels(logits, masks, (16, 32), rows_per_tile=5)
    assert (labels[0, :, :14] == 0).all() and (labels[0, :, 18:] == 1).all()


def test_ties_go_to_the_first_class_as_torch_max():
    """Where every mask is off (sigmoid = 0) all classes tie at 0: class 0, like torch.max, in the rows
    redone after the tie check; elsewhere query 0, sure of class 2, wins."""
    logits = torch.log(torch.tensor([[[0.01, 0.01, 0.97, 0.01], [0.3, 0.3, 0.3, 0.1]]]))
    masks = torch.full((1, 2, 6, 4), -1e4)
    masks[0, 0, 3:] = 20.0
    labels = semantic_labels(logits, masks, (24, 16), rows_per_tile=4)
    assert (labels[0, :8] == 0).all() and (labels[0, 16:] == 2).all()
    scores = semantic_inference(logits[0], postprocess_masks(masks[0], (24, 16), (24, 16), (24, 16)))
    assert torch.equal(labels[0], scores.max(0).indices)


def test_nan_scores_give_a_label_in_range():
    logits, masks = torch.zeros(1, 3, 5), torch.zeros(1, 3, 4, 4)
    masks[0, :, 1, 1] = float("nan")
    labels = semantic_labels(logits, masks, (16, 16))
    assert labels.min() >= 0 and labels.max() < 4


def test_bad_shapes_and_sizes_are_named():
    with pytest.raises(ValueError, match="pred_logits"):
        semantic_labels(torch.zeros(1, 3, 5), torch.zeros(1, 4, 2, 2), (8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        semantic_labels(torch.zeros(1, 3, 5), torch.zeros(1, 3, 2, 2), (8, 8), (9, 8))


@pytest.mark.parametrize("on", [True, False])
def test_evaluation_labels_equal_the_argmax_over_full_resolution_masks(on, one_thread, monkeypatch):
    """evaluate.mask_labels (what evaluation scores semantic datasets with; tiled while the speed paths
    are on) against the full-resolution path (mask_predictions + semantic_inference, which panoptic
    datasets use): padding and a resize included."""
    monkeypatch.setattr(fast, "_enabled", on)
    torch.manual_seed(0)
    model = build_model("synthetic-maskformer-tiny").eval()
    image = torch.rand(3, 45, 61) * 255  # padded to 64x64
    labels = mask_labels(model, image, (50, 70))
    logits, masks = mask_predictions(model, image, (50, 70))
    scores = semantic_inference(logits.double(), masks.double())
    top2 = scores.topk(2, dim=0).values
    differ = labels != scores.argmax(0)
    assert labels.shape == (50, 70) and ((top2[0] - top2[1])[differ] < 1e-5).all()
