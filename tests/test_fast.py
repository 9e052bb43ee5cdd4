"""mfcore.fast: the switch, the core's independence of it, and every speed path against its plain reference
in float64, values and gradients (autograd through the plain path vs the fast one on random inputs).

The other files test more of each path (tests/test_mask_product.py, test_frozen_bn.py, test_attention.py,
test_semantic_labels.py); here each path meets the core module it replaces."""
import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mfcore import fast
from mfcore.fast import mask_product
from mfcore.fast.attention import Dropout, MultiheadAttention
from mfcore.fast.frozen_bn import FoldedFrozenBN, FrozenBNConv, fold_frozen_bn
from mfcore.fast.mask_loss import (
    FocalDiceLoss,
    FusedSetCriterion,
    interpolation_matrix,
    target_terms,
    upsample_bilinear,
)
from mfcore.fast.mask_product import FoldedMaskProduct
from mfcore.fast.matcher_costs import InPlaceCostMatcher, mask_costs
from mfcore.fast.perpixel_loss import FusedPerPixelCriterion
from mfcore.fast.semantic_labels import semantic_labels
from mfcore.losses import SetCriterion, build_criterion, total_loss
from mfcore.mask_loss import focal_dice, pairwise_focal_dice
from mfcore.matcher import HungarianMatcher
from mfcore.modeling.backbones import _resnet, conv_bn_pairs
from mfcore.modeling.models import MaskProduct, build_model
from mfcore.presets import get_preset
from mfcore.training.solver import build_optimizer

PACKAGE = Path(fast.__file__).resolve().parents[1]
# the layers that build a run's model and criterion, and may use the speed paths
CALLERS = ("fast", "training", "companion", "cli.py", "__main__.py")


@pytest.fixture
def switch(monkeypatch):
    """Set the switch for one test only."""
    def set_to(flag: bool) -> None:
        monkeypatch.setattr(fast, "_enabled", flag)
    return set_to


def grads_of(loss: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


def assert_all_close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- layout and switch
def _core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in CALLERS]


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file of the package, relative ones resolved;
    `from a import b` gives both a and a.b."""
    package = ["mfcore", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def test_the_core_never_imports_fast():
    """No module of the core names mfcore.fast in an import, absolute or relative..."""
    offenders = [f"{path.relative_to(PACKAGE)}:{line} {name}" for path in _core_files()
                 for line, name in _imported(path) if name == "mfcore.fast" or name.startswith("mfcore.fast.")]
    assert not offenders, offenders
    assert len(_core_files()) > 20  # the walk found the package
    assert ("mfcore.fast" in {n for _, n in _imported(PACKAGE / "training" / "train.py")})  # the check sees one


def test_importing_the_core_loads_no_speed_path():
    """...nor through another module: importing all of the core leaves mfcore.fast unloaded."""
    modules = ["mfcore." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in _core_files()]
    modules = [m.removesuffix(".__init__") for m in modules]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m.startswith('mfcore.fast')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_switch_reads_the_environment_and_turns_every_entry_point_off(monkeypatch):
    for value, expected in (("0", False), ("1", True), (None, True)):
        env = {"MFCORE_FAST": value} if value is not None else {}
        code = "import mfcore.fast as f; print(f.enabled())"
        run_env = {k: v for k, v in __import__("os").environ.items() if k != "MFCORE_FAST"} | env
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=run_env)
        assert out.stdout.strip() == str(expected)
    monkeypatch.setenv("MFCORE_FAST", "1")
    monkeypatch.setattr(fast, "_enabled", True)
    fast.set_enabled(False)
    assert not fast.enabled() and __import__("os").environ["MFCORE_FAST"] == "0"
    model = build_model("synthetic-maskformer-tiny")
    assert type(fast.accelerate(model).predictor.mask_product) is MaskProduct
    assert type(fast.build_criterion("hungarian", 5, 4)) is SetCriterion
    fast.set_enabled(True)
    assert type(fast.accelerate(model).predictor.mask_product) is FoldedMaskProduct
    criterion = fast.build_criterion("hungarian", 5, 4, cost_mask=3.0)
    assert type(criterion) is FusedSetCriterion and type(criterion.matcher) is InPlaceCostMatcher
    assert criterion.matcher.cost_mask == 3.0
    assert type(fast.build_criterion("perpixel", 5, 4)) is FusedPerPixelCriterion


def test_accelerate_keeps_parameters_buffers_and_state_dict():
    torch.manual_seed(0)
    plain = build_model("ade20k-maskformer-r50", num_classes=8, enc_layers=1)
    model = copy.deepcopy(plain)
    params = {name: p for name, p in model.named_parameters()}
    fast.accelerate(model)
    assert {name: p for name, p in model.named_parameters()} == params  # the very same tensors
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    types = {type(m) for m in model.modules()}
    assert {MultiheadAttention, Dropout, FrozenBNConv, FoldedFrozenBN, FoldedMaskProduct} <= types
    assert nn.MultiheadAttention not in types and nn.Dropout not in {
        type(m) for layer in model.predictor.transformer.layers for m in layer.children()}


# ------------------------------------------------------------------------------------- attention, dropout
@pytest.mark.parametrize("training", [False, True])
def test_attention_equals_torch_in_values_and_gradients(training):
    """In training with p so small that nothing is dropped, the explicit softmax(QK^T/sqrt(d)) V path."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, dropout=1e-12 if training else 0.1, batch_first=True).double()
    ours = MultiheadAttention(copy.deepcopy(ref))
    ref.train(training), ours.train(training)
    query = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, 32, dtype=torch.float64)
    got, want = ours(query, memory, memory)[0], ref(query, memory, memory, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params_ours, params_ref = [query, memory, *ours.parameters()], [query, memory, *ref.parameters()]
    assert_all_close(grads_of((got * weights).sum(), params_ours), grads_of((want * weights).sum(), params_ref))


def test_dropout_gradient_is_its_scaled_mask():
    torch.manual_seed(0)
    x = torch.randn(300, 200, dtype=torch.float64, requires_grad=True)
    y = Dropout(0.3).train()(x)
    mask = (y != 0).double() / 0.7
    torch.testing.assert_close(y, x * mask, rtol=0, atol=0)
    assert mask.ne(0).double().mean().item() == pytest.approx(0.7, abs=0.01)
    assert_all_close(grads_of(y.sum(), [x]), [mask])


# ------------------------------------------------------------------------------------- frozen BN
def test_folded_frozen_bn_equals_plain_in_values_and_input_gradients():
    """A frozen backbone (no gradient to the weights) runs folded; its outputs and input gradients equal
    the plain conv + frozen BN's."""
    torch.manual_seed(0)
    plain = _resnet((1, 1, 1, 1), bottleneck=True, frozen_bn=True, deep_stem=True, drop_path=0.0).double()
    gen = torch.Generator().manual_seed(0)
    for _, bn in conv_bn_pairs(plain):
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    plain.requires_grad_(False)
    folded = copy.deepcopy(plain)
    fold_frozen_bn(conv_bn_pairs(folded))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    weights = {k: torch.randn_like(v) for k, v in plain(x).items()}
    outs = [net(x) for net in (folded, plain)]
    for key in weights:
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-10, atol=1e-10)
    losses = [sum((out[k] * w).sum() for k, w in weights.items()) for out in outs]
    assert_all_close(grads_of(losses[0], [x]), grads_of(losses[1], [x]))


# ------------------------------------------------------------------------------------- mask product
@pytest.mark.parametrize("queries", [4, 40])
def test_folded_mask_product_equals_the_einsum(queries, monkeypatch):
    """4 queries x 2 layers: folded conv; 40: conv then product with the sparse backward forced on."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).double()
    y = torch.randn(2, 16, 8, 12, dtype=torch.float64, requires_grad=True)
    embed = torch.randn(2, 2, queries, 16, dtype=torch.float64, requires_grad=True)   # [L, B, N, C_E]
    grad = torch.randn(2, 2, queries, 8, 12, dtype=torch.float64)
    grad[:, :, 3:] = 0  # a few live rows, as after matching
    params = [embed, y, conv.weight, conv.bias]
    want = MaskProduct()(embed, y, conv)
    monkeypatch.setattr(mask_product, "SPARSE_BACKWARD_MIN_MACS", 0)
    got = FoldedMaskProduct()(embed, y, conv)
    assert_all_close([got], [want])
    assert_all_close(grads_of((got * grad).sum(), params), grads_of((want * grad).sum(), params))


# ------------------------------------------------------------------------------------- losses, matching
def test_fused_focal_dice_equals_autograd():
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 70, dtype=torch.float64)).requires_grad_()
    targets = (torch.rand(5, 70) > 0.6).double()
    targets[0] = torch.rand(70, dtype=torch.float64)  # soft targets too (point-sampled ground truth)
    got, want = FocalDiceLoss.apply(logits, targets, *target_terms(targets)), focal_dice(logits, targets)
    assert_all_close(got, want)
    w_focal, w_dice = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert_all_close(grads_of((got[0] * w_focal).sum() + (got[1] * w_dice).sum(), [logits]),
                     grads_of((want[0] * w_focal).sum() + (want[1] * w_dice).sum(), [logits]))
    small = logits[:2, :6].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: FocalDiceLoss.apply(x, targets[:2, :6], *target_terms(targets[:2, :6])),
                                    (small,))


@pytest.mark.parametrize("size, out", [((4, 5), (16, 20)), ((8, 8), (30, 17)), ((6, 6), (6, 6))])
def test_upsample_bilinear_equals_f_interpolate(size, out):
    torch.manual_seed(0)
    x = torch.randn(3, *size, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, *out, dtype=torch.float64)
    got = upsample_bilinear(x, out)
    want = F.interpolate(x[:, None], size=out, mode="bilinear", align_corners=False)[:, 0]
    assert_all_close([got], [want])
    assert_all_close(grads_of((got * weights).sum(), [x]), grads_of((want * weights).sum(), [x]))


def random_case(sizes, num_queries=5, num_classes=4, small=4, gt_sizes=None, seed=0, image_sizes=None):
    """float64 outputs with 3 decoder layers and random binary targets (sizes: segments per image); image_sizes:
    each image's (h, w) inside its padded ground truth (no fixed canvas), as collate records it."""
    gen = torch.Generator().manual_seed(seed)
    layers = [{"pred_logits": torch.randn(len(sizes), num_queries, num_classes + 1, generator=gen,
                                          dtype=torch.float64).requires_grad_(),
               "pred_masks": (2 * torch.randn(len(sizes), num_queries, small, small, generator=gen,
                                              dtype=torch.float64)).requires_grad_()} for _ in range(3)]
    gt_sizes = gt_sizes or [(4 * small, 4 * small)] * len(sizes)
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen),
                "masks": torch.rand(n, *hw, generator=gen) > 0.5} for n, hw in zip(sizes, gt_sizes)]
    for t, image_size in zip(targets, image_sizes or []):
        t["image_size"] = image_size
    return dict(layers[-1], aux_outputs=layers[:-1]), targets


@pytest.mark.parametrize("sizes, gt_sizes, image_sizes", [
    ([3, 1, 2], None, None),
    ([2, 0, 7], [(16, 16), (12, 20), (12, 20)], None),  # an image without segments, more segments than queries,
                                                        # two sizes
    ([7, 2, 3], None, None),                            # unmatched segments in the first of three images of one size
    ([3, 2, 4], None, [(16, 16), (11, 16), (9, 13)]),   # images of their own sizes padded into one batch
])
def test_fused_criterion_equals_the_plain_one(sizes, gt_sizes, image_sizes):
    """All 9 terms (3 layers) and the gradients of their weighted sum, fused vs plain, on the same matching."""
    outputs, targets = random_case(sizes, gt_sizes=gt_sizes, image_sizes=image_sizes)
    plain = build_criterion("hungarian", 4, 5, dec_layers=3)
    fused = copy.deepcopy(plain)
    fused.__class__ = FusedSetCriterion
    inputs = [t for layer in [outputs, *outputs["aux_outputs"]] for t in (layer["pred_logits"], layer["pred_masks"])]
    got, want = fused(outputs, targets), plain(outputs, targets)
    assert list(got) == list(want) and len(got) == 9
    assert_all_close(list(got.values()), list(want.values()))
    assert_all_close(grads_of(total_loss(got, fused.weight_dict), inputs),
                     grads_of(total_loss(want, plain.weight_dict), inputs))


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.5), (1.0, 0.0)])
def test_in_place_mask_costs_equal_the_pairwise_losses(alpha, gamma):
    """Other focal parameters too, and logits large enough that 1 - sigmoid(x) rounds to 0 in float32."""
    gen = torch.Generator().manual_seed(4)
    logits = 30 * torch.randn(2, 3, 20, generator=gen, dtype=torch.float64)
    targets = (torch.rand(2, 4, 20, generator=gen) > 0.5).double()
    p, t = logits.sigmoid()[:, :, None], targets[:, None]
    per_pixel = (alpha * t * (1 - p) ** gamma * F.softplus(-logits)[:, :, None]
                 + (1 - alpha) * (1 - t) * p ** gamma * F.softplus(logits)[:, :, None])
    want = per_pixel.mean(-1), 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    assert_all_close(mask_costs(logits, targets, alpha, gamma), want)
    assert_all_close(mask_costs(logits, targets, alpha, gamma, per_image=False), want)  # the GPU default
    if (alpha, gamma) == (0.25, 2.0):
        assert_all_close(pairwise_focal_dice(logits, targets), want)
        valid = torch.zeros(2, 20, dtype=torch.float64)  # padded images: 14 and 9 of the 20 pixels inside
        valid[0, :14], valid[1, :9] = 1, 1
        v = valid[:, None, None]
        inside = ((per_pixel * v).sum(-1) / v.sum(-1),
                  1 - (2 * (p * t * v).sum(-1) + 1) / ((p * v).sum(-1) + (t * v).sum(-1) + 1))
        for per_image in (True, False):
            assert_all_close(mask_costs(logits, targets, valid=valid, per_image=per_image), inside)
        assert_all_close(pairwise_focal_dice(logits, targets, valid), inside)
    with pytest.raises(ValueError, match="alpha=0"):
        mask_costs(logits, targets, alpha=0.0)


@pytest.mark.parametrize("image_sizes", [None, [(16, 16), (10, 7), (13, 16)]])
def test_matching_all_layers_at_once_equals_each_layer_alone(image_sizes):
    outputs, targets = random_case([3, 0, 6], num_queries=6, image_sizes=image_sizes)
    layers = [outputs, *outputs["aux_outputs"]]
    plain, in_place = HungarianMatcher(1.0, 20.0, 1.0), InPlaceCostMatcher(1.0, 20.0, 1.0)
    got = in_place.match_layers(layers, targets)
    want = [plain(layer, targets) for layer in layers]
    assert [[(i.tolist(), j.tolist()) for i, j in layer] for layer in got] == \
        [[(i.tolist(), j.tolist()) for i, j in layer] for layer in want]
    empty = in_place.match_layers(layers, [{"labels": t["labels"][:0], "masks": t["masks"][:0]} for t in targets])
    assert len(empty) == 3 and all(len(i) == 0 for layer in empty for i, _ in layer)


@pytest.mark.parametrize("sizes", [None, [(16, 16), (12, 20)]])
def test_fused_per_pixel_criterion_equals_the_plain_one(sizes):
    """All layers in one pass vs image by image and layer by layer: terms and gradients, ignored pixels
    included; label maps of two sizes take the plain path."""
    gen = torch.Generator().manual_seed(0)
    layers = [(2 * torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)).requires_grad_() for _ in range(3)]
    outputs = {"sem_seg_logits": layers[-1], "aux_outputs": [{"sem_seg_logits": x} for x in layers[:-1]]}
    shapes = sizes or [(16, 16)] * 2
    targets = [{"sem_seg": torch.randint(0, 5, hw, generator=gen)} for hw in shapes]
    targets[0]["sem_seg"][:3] = 255
    plain = build_criterion("perpixel", 5, 5, dec_layers=3)
    fused = fast.build_criterion("perpixel", 5, 5, dec_layers=3)
    assert type(fused) is FusedPerPixelCriterion
    got, want = fused(outputs, targets), plain(outputs, targets)
    assert list(got) == list(want) == ["loss_ce", "loss_ce_0", "loss_ce_1"]
    assert_all_close(list(got.values()), list(want.values()))
    assert_all_close(grads_of(total_loss(got, fused.weight_dict), layers),
                     grads_of(total_loss(want, plain.weight_dict), layers))


@pytest.mark.parametrize("image_sizes", [None, [(16, 16), (10, 7), (13, 16)]])
def test_in_place_matcher_equals_the_plain_one(image_sizes):
    outputs, targets = random_case([3, 0, 6], num_queries=6, image_sizes=image_sizes)
    plain, in_place = HungarianMatcher(1.0, 20.0, 1.0), InPlaceCostMatcher(1.0, 20.0, 1.0)
    for _ in range(2):  # the second call reuses the work tensors
        assert_all_close(in_place.cost_matrices(outputs, targets), plain.cost_matrices(outputs, targets))
    assert [(i.tolist(), j.tolist()) for i, j in in_place(outputs, targets)] == \
        [(i.tolist(), j.tolist()) for i, j in plain(outputs, targets)]


@pytest.mark.parametrize("gt_size, size", [((64, 64), (16, 16)), ((50, 70), (16, 24)), ((32, 48), (32, 48))])
@pytest.mark.parametrize("padded", [False, True])
def test_picked_ground_truth_equals_the_interpolated_one(gt_size, size, padded):
    """InPlaceCostMatcher.ground_truth reads only the kept pixels (a strided view, or a gather with cached
    indices where the sizes do not divide); it must equal F.interpolate(mode="nearest")'s downsampling, the
    valid region of padded images included."""
    gen = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.tensor([1, 4, 2]), "masks": torch.rand(3, *gt_size, generator=gen) > 0.5},
               {"labels": torch.tensor([], dtype=torch.int64), "masks": torch.zeros(0, *gt_size, dtype=torch.bool)},
               {"labels": torch.tensor([0]), "masks": torch.rand(1, *gt_size, generator=gen) > 0.3}]
    if padded:
        targets[0]["image_size"], targets[2]["image_size"] = (gt_size[0] - 9, gt_size[1]), (20, gt_size[1] - 5)
    like = torch.zeros(1, dtype=torch.float64)
    got, want = InPlaceCostMatcher.ground_truth(targets, size, like), HungarianMatcher.ground_truth(targets, size, like)
    assert (got[2] is None) == (want[2] is None) == (not padded)
    for a, b in zip(got, want):
        assert a is None or (a.dtype == b.dtype and torch.equal(a, b))
    if padded:  # the masks are empty outside their image's valid region
        assert (want[1] * (1 - want[2][:, None])).abs().sum() == 0 and 0 < want[2].sum() < want[2].numel()


def test_training_after_a_prediction_at_the_same_sizes(one_thread, switch):
    """The loss's cached resize matrices may first be built by a prediction under inference_mode; a
    training step that reuses them must still backpropagate (an inference tensor cannot be saved)."""
    switch(True)
    interpolation_matrix.cache_clear()
    torch.manual_seed(0)
    logits, masks = torch.randn(1, 4, 6), torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        semantic_labels(logits, masks, (24, 24))          # builds interpolation_matrix(8, 24)
    criterion = fast.build_criterion("hungarian", 5, 4, dec_layers=1)
    pred_masks = torch.randn(1, 4, 8, 8, requires_grad=True)
    target = {"labels": torch.tensor([1, 3]), "masks": torch.zeros(2, 24, 24, dtype=torch.bool)}
    target["masks"][0, :12], target["masks"][1, 12:] = True, True
    outputs = {"pred_logits": logits.clone().requires_grad_(), "pred_masks": pred_masks}
    total_loss(criterion(outputs, [target]), criterion.weight_dict).backward()
    assert pred_masks.grad is not None and pred_masks.grad.abs().sum() > 0
    assert not interpolation_matrix(8, 24, torch.device("cpu")).is_inference()


# ------------------------------------------------------------------------------------- optimiser
def test_fused_adamw_equals_the_plain_update(switch, one_thread):
    """fast.build_optimizer (torch's fused AdamW) takes the same steps as the core's AdamW in float64 over a few
    real training steps: the parameter groups (lr multiplier, weight decay) and the moments included. The grads
    come from autograd, as in training: the fused kernel reads a grad with its parameter's strides (the
    channels-last conv weights here), which autograd's gradient layout contract guarantees."""
    switch(True)
    torch.manual_seed(0)
    p = get_preset("synthetic-maskformer-tiny")
    plain = build_model(p.model, num_classes=6, dropout=0.0).double().train()
    fused = copy.deepcopy(plain)
    optimizers = [build_optimizer(plain, p.train), fast.build_optimizer(fused, p.train)]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    assert len({(g["lr"], g["weight_decay"]) for g in optimizers[0].param_groups}) > 1
    criterion = build_criterion(p.loss.matcher, 6, p.model.num_queries, dec_layers=p.model.dec_layers)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        images = torch.rand(2, 3, 64, 64, generator=gen, dtype=torch.float64) * 255
        targets = [{"labels": torch.tensor([0, 3]), "masks": torch.rand(2, 64, 64, generator=gen) > 0.5},
                   {"labels": torch.tensor([2]), "masks": torch.ones(1, 64, 64, dtype=torch.bool)}]
        for model, optimizer in zip((plain, fused), optimizers):
            total_loss(criterion(model(images), targets), criterion.weight_dict).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for want, got in zip(plain.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)  # weight decay alone moves ~1e-7 x |w|
    switch(False)
    assert not fast.build_optimizer(plain, p.train).defaults["fused"]


# ------------------------------------------------------------------------------------- whole steps
@pytest.mark.parametrize("preset", ["synthetic-maskformer-tiny", "ade20k-maskformer-r50"])
def test_accelerated_training_step_equals_the_plain_one(preset, one_thread, switch):
    """Model + criterion, forward and backward in float64: the loss terms and every parameter's gradient
    agree with the switch on and off (dropout off: the two sides draw their masks differently)."""
    switch(True)
    torch.manual_seed(0)
    p = get_preset(preset)
    plain = build_model(p.model, num_classes=6, dropout=0.0).double().train()
    accelerated = fast.accelerate(copy.deepcopy(plain))
    criteria = [build_criterion(p.loss.matcher, 6, p.model.num_queries, dec_layers=p.model.dec_layers),
                fast.build_criterion(p.loss.matcher, 6, p.model.num_queries, dec_layers=p.model.dec_layers)]
    assert type(criteria[1]) is FusedSetCriterion
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=gen, dtype=torch.float64) * 255
    targets = [{"labels": torch.tensor([0, 3, 5]), "masks": torch.rand(3, 64, 64, generator=gen) > 0.5},
               {"labels": torch.tensor([2]), "masks": torch.ones(1, 64, 64, dtype=torch.bool)}]
    results = []
    for model, criterion in zip((accelerated, plain), reversed(criteria)):
        losses = criterion(model(images), targets)
        total_loss(losses, criterion.weight_dict).backward()
        results.append((losses, [p.grad for p in model.parameters()]))
    (got, got_grads), (want, want_grads) = results
    assert_all_close(list(got.values()), list(want.values()))
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
