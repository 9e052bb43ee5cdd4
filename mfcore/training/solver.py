"""Optimiser, learning-rate schedule and gradient clipping of the paper's training recipe.

AdamW with lr 1e-4 and weight decay 1e-4 (Swin: 6e-5 and 0.01). Two exceptions to the decay, as in the
released code: normalisation layers (GroupNorm, LayerNorm, BatchNorm) and embeddings (the N query
embeddings, Swin's relative-position bias tables and absolute position embeddings) get weight decay 0,
because shrinking a scale/offset or a lookup table towards 0 is not a useful prior. Backbone parameters
train at lr x backbone_lr_mult (0.1 for ResNets, 1.0 for Swin).

Schedules, per optimiser step t of T:
    poly:   lr_t = lr * (1 - t / T) ** 0.9
    step:   lr_t = lr * 0.1 ** (number of lr_steps <= t)
    warm-up (optional): the factor above times  f + (1 - f) * t / W  for t < W  (f = 1e-6, W = warmup_iters)
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mfcore.config import TrainConfig

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
              nn.LocalResponseNorm)
# parameter names (last component) that are embeddings/lookup tables rather than weights
EMBEDDING_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed")
WARMUP_START_FACTOR = 1e-6  # the released Swin configs start the linear warm-up from lr * 1e-6


def _no_decay(module: nn.Module, param_name: str) -> bool:
    """True for parameters of norm layers and embeddings (weight decay 0)."""
    if isinstance(module, (*NORM_TYPES, nn.Embedding)):
        return True
    # norm layers from other libraries (timm's LayerNorm2d, ...) are recognised by their class name
    if "norm" in type(module).__name__.lower():
        return True
    return param_name in EMBEDDING_NAMES


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """Split trainable parameters into at most four AdamW groups by (backbone or not) x (decay or not).

    Returns [{"params": [...], "lr": float, "weight_decay": float, "name": str}, ...]; parameters whose
    name starts with "backbone." get lr * backbone_lr_mult. A parameter shared by two modules is counted once.
    """
    groups: dict[tuple[bool, bool], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            # DDP wraps the model as `module.`; the backbone is still recognised
            in_backbone = full_name.removeprefix("module.").startswith("backbone.")
            no_decay = _no_decay(module, param_name)
            key = (in_backbone, no_decay)
            if key not in groups:
                groups[key] = {"params": [], "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
                               "weight_decay": 0.0 if no_decay else weight_decay,
                               "name": ("backbone" if in_backbone else "head") + ("_no_decay" if no_decay else "")}
            groups[key]["params"].append(param)
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters")
    return [groups[k] for k in sorted(groups)]  # fixed order, so optimizer state dicts line up on resume


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the config's lr, weight decay and backbone multiplier (fused: torch's
    single-kernel implementation of the same update, chosen by `mfcore.fast.build_optimizer`)."""
    return torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_mult), lr=cfg.lr,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(step: int, max_iters: int, schedule: str = "poly", power: float = 0.9,
              lr_steps: Iterable[int] = (), warmup_iters: int = 0, gamma: float = 0.1) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based) of `max_iters` (module docstring)."""
    if schedule == "poly":
        factor = (1.0 - min(step, max_iters) / max_iters) ** power
    elif schedule == "step":
        factor = gamma ** sum(1 for s in lr_steps if s <= step)
    else:
        raise ValueError(f"lr schedule {schedule!r}: expected 'poly' or 'step'")
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= WARMUP_START_FACTOR * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """LambdaLR applying `lr_factor` to every group; call `.step()` once after every optimiser step."""
    if cfg.iters < 1:
        raise ValueError(f"TrainConfig.iters={cfg.iters}: expected >= 1")

    def factor(step: int) -> float:
        return lr_factor(step, cfg.iters, cfg.lr_schedule, cfg.poly_power, cfg.lr_steps, cfg.warmup_iters)

    return LambdaLR(optimizer, factor)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the L2 norm of all gradients of the model taken together (paper: 0.01); returns the norm
    before clipping. max_norm <= 0 disables clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm <= 0:
        norms = [p.grad.detach().norm() for p in params]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


__all__ = ["param_groups", "build_optimizer", "lr_factor", "build_scheduler", "clip_gradients"]
