"""Matchers and boxes checked against explicit per-pair formulas and brute-force assignment."""
import itertools
import math

import pytest
import torch

from mfcore.boxes import masks_to_cxcywh, pairwise_giou, target_boxes
from mfcore.matcher import BoxMatcher, FixedMatcher, HungarianMatcher


def make_case(sizes, num_queries=4, num_classes=3, size=8, stride=4, seed=0):
    """Random outputs at stride `stride` and random binary targets at `size` x `size`."""
    gen = torch.Generator().manual_seed(seed)
    batch, small = len(sizes), size // stride
    outputs = {"pred_logits": torch.randn(batch, num_queries, num_classes + 1, generator=gen),
               "pred_masks": 2 * torch.randn(batch, num_queries, small, small, generator=gen)}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen),
                "masks": torch.rand(n, size, size, generator=gen) > 0.5} for n in sizes]
    return outputs, targets


def reference_cost(logits, mask_logits, label, gt_small):
    """C = -p(c) + 20 * mean focal + dice for one pair, written out pixel by pixel."""
    prob_class = torch.exp(logits[label]) / torch.exp(logits).sum()
    focal, inter, sum_p, sum_t = 0.0, 0.0, 0.0, 0.0
    pixels = mask_logits.flatten().tolist()
    for x, t in zip(pixels, gt_small.flatten().float().tolist()):
        p = 1 / (1 + math.exp(-x))
        focal += -0.25 * t * (1 - p) ** 2 * math.log(p) - 0.75 * (1 - t) * p ** 2 * math.log(1 - p)
        inter, sum_p, sum_t = inter + p * t, sum_p + p, sum_t + t
    dice = 1 - (2 * inter + 1) / (sum_p + sum_t + 1)
    return -float(prob_class) + 20 * focal / len(pixels) + dice


def test_cost_matrix_equals_per_pair_loop():
    outputs, targets = make_case([3, 1, 2], size=8, stride=4)
    costs = HungarianMatcher().cost_matrices(outputs, targets)
    for b, (cost, t) in enumerate(zip(costs, targets)):
        assert cost.shape == (4, len(t["labels"]))
        for i in range(4):
            for j in range(len(t["labels"])):
                # nearest downsampling by 4 keeps pixel (4r, 4c)
                gt_small = t["masks"][j, ::4, ::4]
                ref = reference_cost(outputs["pred_logits"][b, i], outputs["pred_masks"][b, i],
                                     t["labels"][j], gt_small)
                assert cost[i, j].item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


def brute_force(cost):
    """Minimum total cost over all injective maps segment j -> query perm[j]."""
    num_queries, num_segments = cost.shape
    return min(sum(cost[q, j].item() for j, q in enumerate(perm))
               for perm in itertools.permutations(range(num_queries), num_segments))


def test_batched_equals_per_image_and_brute_force():
    outputs, targets = make_case([3, 2, 4, 1], num_queries=5, size=8, stride=2, seed=1)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    costs = matcher.cost_matrices(outputs, targets)
    for b, (pred_idx, tgt_idx) in enumerate(batched):
        single = {k: v[b:b + 1] for k, v in outputs.items()}
        alone_pred, alone_tgt = matcher(single, [targets[b]])[0]
        assert torch.equal(pred_idx, alone_pred) and torch.equal(tgt_idx, alone_tgt)
        assert pred_idx.dtype == torch.int64 and len(set(pred_idx.tolist())) == len(pred_idx)
        assert sorted(tgt_idx.tolist()) == list(range(len(targets[b]["labels"])))
        total = costs[b][pred_idx, tgt_idx].sum().item()
        assert total == pytest.approx(brute_force(costs[b]), abs=1e-5)


def test_more_segments_than_queries_matches_every_query():
    outputs, targets = make_case([5], num_queries=3, seed=2)
    pred_idx, tgt_idx = HungarianMatcher()(outputs, targets)[0]
    assert sorted(pred_idx.tolist()) == [0, 1, 2] and len(set(tgt_idx.tolist())) == 3


def test_images_without_segments():
    outputs, targets = make_case([0, 2, 0], seed=3)
    indices = HungarianMatcher()(outputs, targets)
    assert [len(i) for i, _ in indices] == [0, 2, 0]
    assert indices[0][0].dtype == torch.int64 and indices[0][1].dtype == torch.int64
    outputs, targets = make_case([0, 0], seed=3)
    assert all(len(i) == 0 and len(j) == 0 for i, j in HungarianMatcher()(outputs, targets))


def test_matching_prefers_the_right_mask():
    # Query 1 predicts segment 0's mask exactly and confidently; query 0 predicts segment 1.
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2], masks[1, 2:] = True, True
    pred = torch.stack([torch.where(masks[1], 10.0, -10.0), torch.where(masks[0], 10.0, -10.0)])[None]
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": pred}
    pred_idx, tgt_idx = HungarianMatcher()(outputs, [{"labels": torch.tensor([0, 1]), "masks": masks}])[0]
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {0: 1, 1: 0}


def test_bad_targets_raise():
    outputs, targets = make_case([2, 1])
    with pytest.raises(ValueError, match="one per image"):
        HungarianMatcher()(outputs, targets[:1])
    with pytest.raises(ValueError, match="masks"):
        HungarianMatcher()(outputs, [targets[0], {"labels": torch.tensor([0, 1]), "masks": torch.zeros(1, 8, 8)}])


def test_fixed_matcher_assigns_query_to_class():
    outputs = {"pred_logits": torch.zeros(2, 4, 5), "pred_masks": torch.zeros(2, 4, 2, 2)}
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :1], masks[1, 1:3], masks[2, 3:] = True, True, True     # areas 8, 16, 40
    targets = [{"labels": torch.tensor([2, 0]), "masks": masks[:2]},
               {"labels": torch.tensor([3, 1, 1]), "masks": masks}]   # class 1 twice: largest (segment 2) wins
    (p0, t0), (p1, t1) = FixedMatcher()(outputs, targets)
    assert p0.tolist() == [0, 2] and t0.tolist() == [1, 0]
    assert p1.tolist() == [1, 3] and t1.tolist() == [2, 0]
    empty = FixedMatcher()(outputs, [{"labels": torch.zeros(0, dtype=torch.long), "masks": masks[:0]}] * 2)
    assert all(len(i) == 0 for i, _ in empty)


def test_fixed_matcher_rejects_bad_input():
    with pytest.raises(ValueError, match="N=3, K=4"):
        FixedMatcher()({"pred_logits": torch.zeros(1, 3, 5)}, [{"labels": torch.tensor([0]),
                                                                 "masks": torch.ones(1, 4, 4)}])
    with pytest.raises(ValueError, match="labels"):
        FixedMatcher()({"pred_logits": torch.zeros(1, 4, 5)}, [{"labels": torch.tensor([4]),
                                                                 "masks": torch.ones(1, 4, 4)}])


def test_masks_to_cxcywh_by_hand():
    masks = torch.zeros(3, 8, 10, dtype=torch.uint8)
    masks[0, 2:4, 1:5] = 1          # rows 2-3, cols 1-4
    masks[1] = 1                    # the whole image
    boxes = masks_to_cxcywh(masks)
    expected = torch.tensor([[3 / 10, 3 / 8, 4 / 10, 2 / 8], [0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0]])
    assert torch.allclose(boxes, expected)
    given = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(target_boxes({"boxes": given, "masks": masks[:1]}), given)
    # identical boxes have GIoU 1; disjoint boxes far apart are negative
    giou = pairwise_giou(expected[:2], torch.tensor([[3 / 10, 3 / 8, 4 / 10, 2 / 8], [0.9, 0.9, 0.1, 0.1]]))
    assert giou[0, 0].item() == pytest.approx(1.0) and giou[0, 1].item() < 0


def test_box_matcher_recovers_permutation():
    gen = torch.Generator().manual_seed(4)
    gt = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.3, 0.3, 0.2], [0.5, 0.8, 0.6, 0.3]])
    order = torch.tensor([2, 0, 3, 1])   # query q predicts GT box order[q] (3 = junk box)
    boxes = torch.cat([gt, torch.tensor([[0.9, 0.9, 0.05, 0.05]])])[order][None]
    outputs = {"pred_logits": torch.randn(1, 4, 4, generator=gen) * 0.1, "pred_boxes": boxes}
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": torch.zeros(3, 8, 8), "boxes": gt}]
    pred_idx, tgt_idx = BoxMatcher()(outputs, targets)[0]
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {0: 2, 1: 0, 3: 1}
    cost = BoxMatcher(cost_class=0, cost_giou=0).cost_matrices(outputs, targets)[0]
    assert cost[1, 1].item() == pytest.approx(5 * (0.5 + 0.1 + 0.1 + 0.0))   # L1 between boxes 0 and 1
    with pytest.raises(ValueError, match="pred_boxes"):
        BoxMatcher()({"pred_logits": outputs["pred_logits"]}, targets)



def test_box_targets_are_normalised_by_the_image_size_not_the_padded_size():
    """DETR normalises box targets by the image before batch padding (Table 5's box matching)."""
    from mfcore.data import collate

    def sample(h, w):
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        masks[0] = True                      # the whole image
        masks[1, : h // 2, w // 4: w // 2] = True  # top half, second quarter of the width
        return {"image": torch.zeros(3, h, w), "sem_seg": torch.zeros(h, w, dtype=torch.int64),
                "labels": torch.tensor([0, 1]), "masks": masks}

    _, targets = collate([sample(32, 48), sample(64, 64)])
    assert targets[0]["masks"].shape[-2:] == (64, 64) and targets[0]["image_size"] == (32, 48)
    expected = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.375, 0.25, 0.25, 0.5]])
    torch.testing.assert_close(target_boxes(targets[0]), expected)
    torch.testing.assert_close(target_boxes(targets[1]), expected)
    torch.testing.assert_close(masks_to_cxcywh(targets[0]["masks"], (32, 48)), expected)
