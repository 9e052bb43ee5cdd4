"""Speed paths: the same maths as the paper's modules in mfcore's core, computed with fewer passes or operators.

One switch decides whether they are used: `enabled()`, read from the environment variable MFCORE_FAST at
import ("0" turns it off; default on), and `set_enabled(flag)`. The core (config, presets, modeling/,
matcher, losses, inference, metrics, ...) never imports this package; the layers that build a run's model
and criterion (mfcore.training, mfcore.companion, benchmarks/) call these entry points, which do nothing
while the switch is off:

    accelerate(model)          in place: attention + dropout (`attention`), each frozen BN folded into the
                               conv before it (`frozen_bn`), the mask product in its cheapest order
                               (`mask_product`); parameters, buffers and state-dict keys are unchanged
    build_criterion(...)       `mfcore.losses.build_criterion`, with the fused focal + dice (`mask_loss`),
                               the matching of all layers in one in-place batch (`matcher_costs`) and the
                               per-pixel CE of all layers in one pass (`perpixel_loss`)
    build_optimizer(model, cfg)
                               `mfcore.training.solver.build_optimizer` with torch's fused AdamW kernel: one
                               pass over each parameter group instead of a dozen tensor-list operations
    semantic_labels.semantic_labels(...)
                               the label map of semantic inference in tiles; callers check `enabled()`
                               and use `mfcore.inference` otherwise

Each speed path has a test that it equals its plain reference in values and gradients (tests/test_fast.py).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mfcore import losses
from mfcore.fast.attention import Dropout, MultiheadAttention
from mfcore.fast.frozen_bn import fold_frozen_bn
from mfcore.fast.mask_loss import FusedSetCriterion
from mfcore.fast.mask_product import FoldedMaskProduct
from mfcore.fast.matcher_costs import InPlaceCostMatcher
from mfcore.fast.perpixel_loss import FusedPerPixelCriterion
from mfcore.matcher import HungarianMatcher
from mfcore.modeling.backbones import ResNetBackbone, conv_bn_pairs
from mfcore.modeling.models import MaskProduct
from mfcore.modeling.transformer import DecoderLayer, EncoderLayer
from mfcore.training import solver

_enabled = os.environ.get("MFCORE_FAST", "1") != "0"


def enabled() -> bool:
    """Whether the speed paths are used."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the speed paths on or off, for this process and the processes it starts (MFCORE_FAST)."""
    global _enabled
    _enabled = bool(flag)
    os.environ["MFCORE_FAST"] = "1" if flag else "0"


def _attention(module: nn.Module) -> None:
    """The transformer layers' attention and dropouts -> `attention.MultiheadAttention`, `attention.Dropout`."""
    if isinstance(module, (EncoderLayer, DecoderLayer)):
        for name, child in list(module.named_children()):
            if type(child) is nn.MultiheadAttention:
                setattr(module, name, MultiheadAttention(child))
            elif type(child) is nn.Dropout:
                setattr(module, name, Dropout(child.p).train(child.training))


def _frozen_bn(module: nn.Module) -> None:
    """Each frozen BN of a ResNet folded into the conv before it (`frozen_bn`)."""
    if isinstance(module, ResNetBackbone):
        pairs = conv_bn_pairs(module)
        if all(type(bn) is FrozenBatchNorm2d for _, bn in pairs):
            fold_frozen_bn(pairs)


def _mask_product(module: nn.Module) -> None:
    """The predictor's MaskProduct -> `mask_product.FoldedMaskProduct`."""
    if type(getattr(module, "mask_product", None)) is MaskProduct:
        module.mask_product = FoldedMaskProduct().train(module.training)


MODEL_PATHS = {"attention": _attention, "frozen_bn": _frozen_bn, "mask_product": _mask_product}


def accelerate(model: nn.Module, paths: tuple[str, ...] = tuple(MODEL_PATHS)) -> nn.Module:
    """Swap the speed paths (names of MODEL_PATHS) into a built model, in place, and return it (unchanged
    while the switch is off). Call it before wrapping the model (DDP, torch.compile); the parameters stay
    the same objects, so an optimiser made before or after sees the same ones."""
    if not _enabled:
        return model
    for module in list(model.modules()):
        for name in paths:
            MODEL_PATHS[name](module)
    return model


def _mask_loss(criterion: nn.Module) -> None:
    """SetCriterion -> `mask_loss.FusedSetCriterion`, a subclass without state of its own (the same criterion)."""
    if type(criterion) is losses.SetCriterion:
        criterion.__class__ = FusedSetCriterion


def _perpixel_loss(criterion: nn.Module) -> None:
    """PerPixelCriterion -> `perpixel_loss.FusedPerPixelCriterion`, a subclass without state of its own."""
    if type(criterion) is losses.PerPixelCriterion:
        criterion.__class__ = FusedPerPixelCriterion


def _matcher_costs(criterion: nn.Module) -> None:
    """The Hungarian matcher -> `matcher_costs.InPlaceCostMatcher` with the same cost weights."""
    matcher = getattr(criterion, "matcher", None)
    if type(matcher) is HungarianMatcher:
        criterion.matcher = InPlaceCostMatcher(matcher.cost_class, matcher.cost_mask, matcher.cost_dice)


CRITERION_PATHS = {"mask_loss": _mask_loss, "matcher_costs": _matcher_costs, "perpixel_loss": _perpixel_loss}


def build_criterion(*args, paths: tuple[str, ...] = tuple(CRITERION_PATHS), **kwargs) -> nn.Module:
    """`mfcore.losses.build_criterion(*args, **kwargs)`, with the speed paths (names of CRITERION_PATHS)
    swapped in while enabled."""
    criterion = losses.build_criterion(*args, **kwargs)
    if _enabled:
        for name in paths:
            CRITERION_PATHS[name](criterion)
    return criterion


OPTIMIZER_PATHS = ("fused_adamw",)


def build_optimizer(model: nn.Module, cfg, paths: tuple[str, ...] = OPTIMIZER_PATHS) -> torch.optim.AdamW:
    """`mfcore.training.solver.build_optimizer(model, cfg)`; while enabled and "fused_adamw" is in `paths`, with
    torch's fused AdamW (the same update, one kernel per group) where every parameter is on the CPU or CUDA."""
    fused = _enabled and "fused_adamw" in paths and all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return solver.build_optimizer(model, cfg, fused=fused)
