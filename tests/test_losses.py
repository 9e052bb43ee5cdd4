"""Loss terms checked against values written out by hand on tiny cases."""
import math

import pytest
import torch

from mfcore.losses import (
    PerPixelCriterion,
    SetCriterion,
    average_num_masks,
    build_criterion,
    sample_uncertain_points,
    total_loss,
)
from mfcore.matcher import BoxMatcher, FixedMatcher, HungarianMatcher

# 1-D bilinear upsampling 2 -> 4 with align_corners=False: output pixel j reads input position
# (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
UP = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)


class StubMatcher:
    """Returns fixed indices, so a loss can be checked independently of the matching."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(p, dtype=torch.long), torch.tensor(t, dtype=torch.long)) for p, t in indices]

    def __call__(self, outputs, targets):
        return self.indices


def ce(logits, label):
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def focal_mean(x, t):
    """Mean over pixels of -a t (1-p)^2 log p - (1-a)(1-t) p^2 log(1-p), a = 0.25."""
    p = torch.sigmoid(x.double())
    t = t.double()
    per_pixel = -0.25 * t * (1 - p) ** 2 * torch.log(p) - 0.75 * (1 - t) * p ** 2 * torch.log(1 - p)
    return per_pixel.mean().item()


def dice(x, t):
    p = torch.sigmoid(x.double())
    return 1 - (2 * (p * t).sum().item() + 1) / (p.sum().item() + t.sum().item() + 1)


def random_case(sizes, num_queries=4, num_classes=3, size=8, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(len(sizes), num_queries, num_classes + 1, generator=gen),
               "pred_masks": torch.randn(len(sizes), num_queries, size // 4, size // 4, generator=gen)}
    for v in outputs.values():
        v.requires_grad_(grad)
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen),
                "masks": torch.rand(n, size, size, generator=gen) > 0.5} for n in sizes]
    return outputs, targets


@pytest.mark.parametrize("eos_coef", [0.1, 1.0])
def test_ce_weights_no_object(eos_coef):
    q0, q1 = [1.0, -0.5, 0.3], [0.2, 2.0, -1.0]
    outputs = {"pred_logits": torch.tensor([[q0, q1]]), "pred_masks": torch.zeros(1, 2, 2, 2)}
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4)}]
    crit = SetCriterion(2, StubMatcher([([1], [0])]), eos_coef=eos_coef, deep_supervision=False)
    # query 1 -> class 1 (weight 1); query 0 unmatched -> "no object" = class 2 (weight eos_coef)
    expected = (eos_coef * ce(q0, 2) + ce(q1, 1)) / (eos_coef + 1)
    assert crit(outputs, targets)["loss_ce"].item() == pytest.approx(expected, rel=1e-6)


def test_mask_losses_by_hand_with_upsampling():
    x = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    gt = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.stack([torch.full((2, 2), 5.0), x])[None]}
    targets = [{"labels": torch.tensor([0]), "masks": gt[None].bool()}]
    crit = SetCriterion(2, StubMatcher([([1], [0])]), deep_supervision=False)
    losses = crit(outputs, targets)
    up = UP @ x.double() @ UP.T
    assert losses["loss_mask"].item() == pytest.approx(focal_mean(up, gt), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice(up, gt), rel=1e-5)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}


def test_mask_losses_divide_by_all_ground_truth_segments():
    outputs, targets = random_case([2, 1], num_queries=3, size=4, seed=1)
    outputs["pred_masks"] = torch.randn(2, 3, 4, 4)                # GT resolution: no upsampling
    pairs = [(0, 0, 1), (0, 2, 0), (1, 1, 0)]                      # (image, query, segment)
    crit = SetCriterion(3, StubMatcher([([0, 2], [1, 0]), ([1], [0])]), deep_supervision=False)
    losses = crit(outputs, targets)
    ref = [(outputs["pred_masks"][b, q], targets[b]["masks"][s].double()) for b, q, s in pairs]
    assert losses["loss_mask"].item() == pytest.approx(sum(focal_mean(x, t) for x, t in ref) / 3, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(sum(dice(x, t) for x, t in ref) / 3, rel=1e-5)
    # one matched pair, still 3 ground-truth segments in the batch
    crit = SetCriterion(3, StubMatcher([([0], [1]), ([], [])]), deep_supervision=False)
    assert crit(outputs, targets)["loss_mask"].item() == pytest.approx(focal_mean(*ref[0]) / 3, rel=1e-5)


def test_num_masks_averaged_over_processes(monkeypatch):
    targets = [{"labels": torch.zeros(3, dtype=torch.long)}]
    assert average_num_masks(targets, torch.device("cpu")) == 3
    assert average_num_masks([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1   # clamped
    # pretend to be one of 2 processes; the other holds 5 segments
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(5))
    assert average_num_masks(targets, torch.device("cpu")) == 4


def test_batch_without_segments_backpropagates():
    outputs, targets = random_case([0, 0], seed=2)
    crit = SetCriterion(3, HungarianMatcher(), deep_supervision=False)
    losses = crit(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    # every query is "no object", so the CE is the plain mean of -log p(no object)
    logits = outputs["pred_logits"].detach()
    assert losses["loss_ce"].item() == pytest.approx(-logits.log_softmax(-1)[..., 3].mean().item(), rel=1e-6)
    total_loss(losses, crit.weight_dict).backward()
    assert torch.equal(outputs["pred_masks"].grad, torch.zeros_like(outputs["pred_masks"]))
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_gradients_reach_every_layer():
    outputs, targets = random_case([2, 1], seed=3)
    aux = [random_case([2, 1], seed=10 + i)[0] for i in range(5)]
    outputs["aux_outputs"] = aux
    crit = SetCriterion(3, HungarianMatcher())
    losses = crit(outputs, targets)
    assert len(losses) == 18
    total_loss(losses, crit.weight_dict).backward()
    for out in [outputs] + aux:
        assert out["pred_logits"].grad.abs().sum() > 0 and out["pred_masks"].grad.abs().sum() > 0


def test_each_aux_layer_has_its_own_matching():
    outputs, targets = random_case([3, 2], seed=4, grad=False)
    flipped = {k: v.flip(1) for k, v in outputs.items()}           # same predictions, queries reversed
    outputs["aux_outputs"] = [flipped] * 5
    losses = SetCriterion(3, HungarianMatcher())(outputs, targets)
    for i in range(5):
        for name in ("loss_ce", "loss_mask", "loss_dice"):
            assert losses[f"{name}_{i}"].item() == pytest.approx(losses[name].item(), rel=1e-6)
    too_many = dict(outputs, aux_outputs=[flipped] * 6)
    with pytest.raises(ValueError, match="num_aux_layers=5"):
        SetCriterion(3, HungarianMatcher())(too_many, targets)


def test_weight_dict():
    crit = build_criterion("box", 3, 4)
    base = {"loss_ce": 1, "loss_mask": 20, "loss_dice": 1, "loss_bbox": 5, "loss_giou": 2}
    assert crit.weight_dict == {**base, **{f"{k}_{i}": w for i in range(5) for k, w in base.items()}}
    assert build_criterion("hungarian", 3, 4, dec_layers=1).weight_dict == {"loss_ce": 1, "loss_mask": 20,
                                                                            "loss_dice": 1}
    assert total_loss({"loss_ce": torch.tensor(2.0), "loss_mask": torch.tensor(3.0)}, crit.weight_dict) == 62
    with pytest.raises(ValueError, match="loss_other"):
        total_loss({"loss_other": torch.tensor(1.0)}, crit.weight_dict)


def test_point_sampled_loss_constant_case_is_exact():
    outputs = {"pred_logits": torch.zeros(1, 1, 3), "pred_masks": torch.full((1, 1, 2, 2), 0.7)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8)}]
    dense = SetCriterion(2, StubMatcher([([0], [0])]), deep_supervision=False)(outputs, targets)
    points = SetCriterion(2, StubMatcher([([0], [0])]), num_points=64, deep_supervision=False)(outputs, targets)
    for name in ("loss_mask", "loss_dice"):
        assert points[name].item() == pytest.approx(dense[name].item(), rel=1e-5)


def test_point_sampled_loss_approximates_dense_loss():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.zeros(1, 1, 3), "pred_masks": 2 * torch.randn(1, 1, 4, 4)}
    gt = torch.zeros(1, 16, 16)
    gt[0, 3:12, 5:14] = 1
    targets = [{"labels": torch.tensor([0]), "masks": gt}]
    dense = SetCriterion(2, StubMatcher([([0], [0])]), deep_supervision=False)(outputs, targets)
    crit = SetCriterion(2, StubMatcher([([0], [0])]), num_points=64 * 256, importance_sample_ratio=0.0,
                        deep_supervision=False)
    points = crit(outputs, targets)
    for name in ("loss_mask", "loss_dice"):
        assert points[name].item() == pytest.approx(dense[name].item(), rel=0.05)


def test_importance_sampling_picks_uncertain_points():
    torch.manual_seed(0)
    ramp = torch.linspace(-8, 8, 16).expand(1, 1, 4, 16)           # |logit| smallest at x = 0.5
    coords = sample_uncertain_points(ramp, 90, oversample_ratio=3.0, importance_sample_ratio=1.0)
    assert coords.shape == (1, 90, 2) and coords.min() >= 0 and coords.max() <= 1
    assert (coords[0, :, 0] - 0.5).abs().mean() < 0.12             # uniform points would give 0.25


def test_box_losses_by_hand():
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]], requires_grad=True)
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.7, 0.7, 0.2, 0.2]])
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": pred}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 4, 4), "boxes": gt}]
    crit = SetCriterion(2, StubMatcher([([0, 1], [0, 1])]), losses=("boxes",), deep_supervision=False)
    losses = crit(outputs, targets)
    # pair 0: pred inside GT, IoU 0.04/0.08, enclosing box = GT -> GIoU 0.5; L1 = 0.2
    # pair 1: disjoint, union 0.08, enclosing box 0.7 x 0.7 -> GIoU = -(0.49 - 0.08) / 0.49; L1 = 1.0
    assert losses["loss_bbox"].item() == pytest.approx((0.2 + 1.0) / 2, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx((0.5 + 1 + 0.41 / 0.49) / 2, rel=1e-5)
    losses["loss_giou"].backward()
    assert pred.grad.abs().sum() > 0


def test_box_criterion_end_to_end():
    outputs, targets = random_case([2, 0], seed=5)
    outputs["pred_boxes"] = torch.rand(2, 4, 4).requires_grad_()
    crit = SetCriterion(3, BoxMatcher(), losses=("labels", "masks", "boxes"), deep_supervision=False)
    total_loss(crit(outputs, targets), crit.weight_dict).backward()
    assert outputs["pred_boxes"].grad.abs().sum() > 0


def test_fixed_criterion():
    outputs, targets = random_case([2, 1], num_queries=3, seed=6)
    crit = build_criterion("fixed", 3, 3, deep_supervision=False)
    assert isinstance(crit.matcher, FixedMatcher)
    assert torch.isfinite(total_loss(crit(outputs, targets), crit.weight_dict))
    with pytest.raises(ValueError, match="num_queries == num_classes"):
        build_criterion("fixed", 3, 100)
    with pytest.raises(ValueError, match="kind='dense'"):
        build_criterion("dense", 3, 100)


def test_per_pixel_ce_ignores_255_and_upsamples():
    # logits vary along x only: [a, b] per class, upsampled 2 -> 4 by UP
    cols = torch.tensor([[0.5, -1.0], [-1.0, 1.5], [2.0, 0.0]])     # [K=3, 2 columns]
    logits = cols[:, None, :].expand(3, 2, 2)[None].clone()       # [1, 3, 2, 2]
    sem = torch.tensor([[0, 1, 255, 2], [255, 255, 255, 2]] * 2)   # [4, 4]
    up = (UP @ cols.double().T).tolist()                           # [4 columns, K]
    valid = [(r, c) for r in range(4) for c in range(4) if sem[r, c] != 255]
    expected = sum(ce(up[c], int(sem[r, c])) for r, c in valid) / len(valid)
    crit = PerPixelCriterion(3)
    assert crit({"sem_seg_logits": logits}, [{"sem_seg": sem}])["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    # the same map built from masks: uncovered pixels are ignored
    labels = torch.tensor([0, 1, 2])
    masks = torch.stack([sem == k for k in range(3)])
    from_masks = crit({"sem_seg_logits": logits}, [{"labels": labels, "masks": masks}])["loss_ce"]
    assert from_masks.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"\[3\]"):
        crit({"sem_seg_logits": logits}, [{"sem_seg": torch.full((4, 4), 3)}])


def test_per_pixel_aux_and_all_ignored():
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    outputs = {"sem_seg_logits": logits, "aux_outputs": [{"sem_seg_logits": logits}] * 5}
    targets = [{"sem_seg": torch.full((8, 8), 255)}, {"labels": torch.zeros(0, dtype=torch.long),
                                                     "masks": torch.zeros(0, 8, 8)}]
    crit = build_criterion("perpixel", 3, 3)
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_ce"} | {f"loss_ce_{i}" for i in range(5)}
    assert all(v == 1 for v in crit.weight_dict.values()) and len(crit.weight_dict) == 6
    assert losses["loss_ce"].item() == 0
    total_loss(losses, crit.weight_dict).backward()
    assert logits.grad is not None


@pytest.mark.parametrize("fast_on", [False, True])
@pytest.mark.parametrize("kind,num_points", [("hungarian", None), ("hungarian", 16), ("fixed", None), ("fixed", 16),
                                             ("box", None), ("box", 16), ("perpixel", None)])
def test_criterion_runs_in_float64(kind, num_points, fast_on):
    """`criterion.double()` on float64 outputs: every term in float64, gradients too (point-sampled masks
    included), with the speed paths on and off."""
    from mfcore import fast

    was = fast.enabled()
    fast.set_enabled(fast_on)
    try:
        torch.manual_seed(0)
        k, batch = 4, 2
        n = k if kind == "fixed" else 6
        criterion = fast.build_criterion(kind, k, n, num_points=num_points, dec_layers=2).double()
        leaves = {"pred_logits": torch.randn(batch, n, k + 1, dtype=torch.float64),
                  "pred_masks": torch.randn(batch, n, 4, 4, dtype=torch.float64),
                  "pred_boxes": torch.rand(batch, n, 4, dtype=torch.float64),
                  "sem_seg_logits": torch.randn(batch, k, 4, 4, dtype=torch.float64)}
        for v in leaves.values():
            v.requires_grad_(True)
        outputs = {**leaves, "aux_outputs": [{name: v * 1.5 for name, v in leaves.items()}]}
        targets = []
        for b in range(batch):
            sem = torch.randint(0, k, (16, 16))
            sem[:3] = 255
            labels = sem.unique()
            labels = labels[labels != 255]
            targets.append({"labels": labels, "masks": sem[None] == labels[:, None, None], "sem_seg": sem})
        losses = criterion(outputs, targets)
        assert all(v.dtype == torch.float64 for v in losses.values()), {n: v.dtype for n, v in losses.items()}
        total_loss(losses, criterion.weight_dict).backward()
        used = ("sem_seg_logits",) if kind == "perpixel" else ("pred_logits", "pred_masks")
        assert all(leaves[name].grad is not None and leaves[name].grad.dtype == torch.float64 for name in used)
    finally:
        fast.set_enabled(was)


@pytest.mark.parametrize("fast_on", [False, True])
@pytest.mark.parametrize("num_points", [None, 16])
def test_loss_and_matching_never_see_the_batch_padding(num_points, fast_on):
    """Images of their own sizes padded into one batch (no fixed canvas): changing what lies in the padding,
    the ground-truth masks there and the predicted logits that only padding pixels read, changes neither
    the matching nor any loss term (plain and fast paths, dense and point-sampled)."""
    from mfcore import fast

    was = fast.enabled()
    fast.set_enabled(fast_on)
    try:
        gen = torch.Generator().manual_seed(0)
        k, n, sizes = 4, 5, [(40, 52), (64, 36)]  # the batch is 64 x 64, logits at stride 4: 16 x 16
        criterion = fast.build_criterion("hungarian", k, n, num_points=num_points, dec_layers=2)
        layers = [{"pred_logits": torch.randn(2, n, k + 1, generator=gen, dtype=torch.float64),
                   "pred_masks": 3 * torch.randn(2, n, 16, 16, generator=gen, dtype=torch.float64)} for _ in range(2)]
        targets = []
        for h, w in sizes:
            masks = torch.zeros(3, 64, 64, dtype=torch.bool)
            masks[:, :h, :w] = torch.rand(3, h, w, generator=gen) > 0.5
            targets.append({"labels": torch.tensor([0, 2, 3]), "masks": masks, "image_size": (h, w)})

        def losses(layers, targets):
            torch.manual_seed(1)  # the same sampled points
            return criterion(dict(layers[-1], aux_outputs=layers[:-1]), targets)

        want = losses(layers, targets)
        changed = [{"pred_logits": layer["pred_logits"], "pred_masks": layer["pred_masks"].clone()}
                   for layer in layers]
        noisy = [dict(t, masks=t["masks"].clone()) for t in targets]
        for b, (h, w) in enumerate(sizes):
            # output pixel y reads logit rows around (y + 0.5) / 4 - 0.5: rows > h / 4 are read by padding only
            for layer in changed:
                layer["pred_masks"][b, :, h // 4 + 1:] = 50.0
                layer["pred_masks"][b, :, :, w // 4 + 1:] = -50.0
            noisy[b]["masks"][:, h:] = True
            noisy[b]["masks"][:, :, w:] = True
        got = losses(changed, noisy)
        assert list(got) == list(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)
    finally:
        fast.set_enabled(was)
