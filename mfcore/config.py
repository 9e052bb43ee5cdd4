"""Typed configuration: one dataclass per concern, saved with every checkpoint and result.

`ModelConfig` describes the network, `LossConfig` the matching and the loss weights. Defaults are the
paper's (MaskFormer R50 on ADE20K-150); presets in `mfcore.presets` override what differs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("maskformer", "perpixel", "perpixelplus")
# ImageNet statistics in the 0..255 RGB range (the paper's pixel mean / std): the one copy, used by the
# model's normalisation, the batch padding (padded with the mean, so it is 0 once normalised) and pretraining.
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
MATCHERS = ("hungarian", "fixed", "box", "perpixel")


@dataclass
class ModelConfig:
    arch: str = "maskformer"          # maskformer | perpixel (1x1 conv head) | perpixelplus (N=K queries, no class head)
    backbone: str = "r50"             # see mfcore.backbones.BACKBONES
    num_classes: int = 150            # K real categories; MaskFormer's class head has K+1 outputs
    num_queries: int = 100            # N; perpixelplus forces N=K
    conv_dim: int = 256               # pixel decoder channels
    mask_dim: int = 256               # per-pixel embedding channels (C_E in the paper)
    hidden_dim: int = 256             # transformer width d
    nheads: int = 8                   # attention heads in the transformer decoder/encoder
    dim_feedforward: int = 2048       # FFN width
    dropout: float = 0.1              # transformer dropout
    dec_layers: int = 6               # transformer decoder layers (Table VIII: 1 or 6)
    enc_layers: int = 0               # >0: the "+ 6 Enc" pixel decoder of the panoptic R50/R101 models
    memory_feature: str = "res5"      # what the decoder's queries attend to (paper: res5; small 64x64 presets
                                      # use res3 so the queries see 8x8 tokens instead of res5's 2x2)
    self_attention: bool = True       # False: decoder without self-attention (Table VIII)
    box_head: bool = False            # add DETR's box MLP for box matching (Table 5)
    gn_groups: int = 32               # GroupNorm groups in the pixel decoder (small models use fewer)
    drop_path: float = 0.0            # stochastic depth in Swin backbones (paper: 0.3)
    pretrained: str | None = None     # local backbone state-dict file; never downloaded
    grad_checkpointing: bool = False  # recompute the backbone's blocks in the backward: less memory, the same
                                      # gradients, ~1 more backbone forward (ResNets, Swin; timm's own for Swin)
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN  # RGB, 0..255 scale
    pixel_std: tuple[float, float, float] = PIXEL_STD

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch={self.arch!r}: expected one of {ARCHS}")
        if self.num_classes < 1:
            raise ValueError(f"ModelConfig.num_classes={self.num_classes}: expected >= 1")
        if self.memory_feature not in ("res2", "res3", "res4", "res5"):
            raise ValueError(f"ModelConfig.memory_feature={self.memory_feature!r}: expected res2..res5")
        if self.enc_layers > 0 and self.memory_feature != "res5":
            raise ValueError("ModelConfig: the transformer-encoder pixel decoder (enc_layers > 0) encodes res5; "
                             f"memory_feature={self.memory_feature!r} is not supported with it")
        if self.dec_layers < 1:
            raise ValueError(f"ModelConfig.dec_layers={self.dec_layers}: expected >= 1")
        self.pixel_mean = tuple(self.pixel_mean)
        self.pixel_std = tuple(self.pixel_std)


@dataclass
class LossConfig:
    matcher: str = "hungarian"        # hungarian | fixed (query i <-> class i) | box (DETR costs) | perpixel (CE)
    cost_class: float = 1.0           # matching cost weights (paper: 1, 20, 1)
    cost_mask: float = 20.0
    cost_dice: float = 1.0
    eos_coef: float = 0.1             # CE weight of the "no object" class
    num_points: int | None = None     # point-sampled mask loss (memory saver); None = dense, as the paper
    deep_supervision: bool = True     # losses after every decoder layer

    def __post_init__(self) -> None:
        if self.matcher not in MATCHERS:
            raise ValueError(f"LossConfig.matcher={self.matcher!r}: expected one of {MATCHERS}")
        if self.num_points is not None and (isinstance(self.num_points, bool) or not isinstance(self.num_points, int)
                                            or self.num_points < 1):
            raise ValueError(f"LossConfig.num_points={self.num_points!r}: expected an integer >= 1, or none (dense)")


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from `to_dict` output; unknown keys are an error, not silently dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {sorted(names)}")
    return cls(**data)


def _typed(where: str, value: Any, kind: Any) -> Any:
    """`value` (parsed from text) checked against the annotation `kind`; ValueError naming what was expected."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(where, value, arg)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{where}={value!r}: expected None")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{where}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r}: expected an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}={value!r}: expected a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}={value!r}: expected text")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r}: expected a JSON list, e.g. [1, 2, 3]")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ValueError(f"{where}={value!r}: expected a list of {len(args)} values")
        items = [args[0] if (origin is list or (args and args[-1] is Ellipsis)) else args[i]
                 for i in range(len(value))] if args else [Any] * len(value)
        return tuple(_typed(f"{where}[{i}]", v, k) for i, (v, k) in enumerate(zip(value, items)))
    return value


def parse_field(cls: type, name: str, text: str) -> Any:
    """The value of field `name` of config dataclass `cls` written as `text` on a command line
    ("false", "50", "0.5", "res3", "[1, 2, 3]", "none"), type-checked against the field's annotation.
    Unknown fields and values of the wrong type are a ValueError in one line."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ValueError(f"{cls.__name__} has no field {name!r}; valid: {', '.join(sorted(hints))}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if (hints[name] is str or str in typing.get_args(hints[name])) and value is not None \
            and not isinstance(value, str):
        value = text  # a text field takes the text as written (e.g. a file name "123")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{cls.__name__}.{name}={text!r}: expected a finite number")
    return _typed(f"{cls.__name__}.{name}", value, hints[name])


def check_field(cls: type, name: str, value: Any) -> Any:
    """An already-parsed (JSON) `value` of field `name` of config dataclass `cls`, type-checked as
    `parse_field` checks text: unknown fields and values of the wrong type are a ValueError in one line."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ValueError(f"{cls.__name__} has no field {name!r}; valid: {', '.join(sorted(hints))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{cls.__name__}.{name}={value!r}: expected a finite number")
    return _typed(f"{cls.__name__}.{name}", value, hints[name])


def override(cfg: Any, **changes: Any) -> Any:
    """Copy of `cfg` with fields changed; a misspelt field is an error."""
    names = {f.name for f in dataclasses.fields(cfg)}
    bad = sorted(set(changes) - names)
    if bad:
        raise ValueError(f"{type(cfg).__name__}: no field(s) {bad}; valid: {sorted(names)}")
    return dataclasses.replace(cfg, **changes)



@dataclass
class TrainConfig:
    dataset: str = "ade20k"                   # mfcore.data dataset name, or "synthetic" / "synthetic-panoptic"
    crop_size: tuple[int, int] = (512, 512)   # training crop (H, W); FLOPs are counted at this size
    short_sides: tuple[int, ...] = tuple(int(512 * s / 10) for s in range(5, 21))  # 256, 307, ..., 1024
    max_size: int = 2048                      # longest side cap after the short-side resize
    augmentation: str = "semantic"            # semantic: jitter, crop, SSD colour, flip, pad to the crop (released
                                              # semantic mappers) | detr: DETR's flip + resize or resize-crop-resize,
                                              # no colour, no fixed canvas (COCO panoptic, "detr_panoptic" mapper)
    test_short_side: int = 512                # single-scale evaluation short side (released INPUT.MIN_SIZE_TEST)
    test_max_size: int = 2048                 # its long-side cap (INPUT.MAX_SIZE_TEST)
    tta_short_sides: tuple[int, ...] = (256, 384, 512, 640, 768, 896)  # multi-scale test, + flip (TEST.AUG.MIN_SIZES)
    tta_max_size: int = 3584                  # their long-side cap (TEST.AUG.MAX_SIZE)
    tta_side: str = "short"                   # "long": tta_short_sides are long sides, each its own cap
                                              # (Mapillary Vistas: 0.5, 1.0, 1.5 x a long side of 2048)
    iters: int = 160_000                      # optimiser steps
    batch_size: int = 16                      # images per step, summed over processes and accumulation
    lr: float = 1e-4                          # AdamW base learning rate
    weight_decay: float = 1e-4                # 0 for norms and embeddings (paper)
    backbone_lr_mult: float = 0.1             # ResNet backbones 0.1, Swin 1.0
    lr_schedule: str = "poly"                 # poly (power 0.9) | step (COCO panoptic: x0.1 at `lr_steps`)
    poly_power: float = 0.9
    lr_steps: tuple[int, ...] = ()
    warmup_iters: int = 0                     # linear warm-up (Swin: 1500)
    clip_grad_norm: float = 0.01              # whole-model L2 gradient clipping
    amp: str = "off"                          # off (fp32, as the paper) | bf16 | fp16
    tf32: bool = True                         # fp32 matmuls/convs in TF32 on CUDA GPUs of compute capability >= 8
                                              # (runtime.set_tf32); false: strict fp32; nothing on CPU
    grad_accum: int = 1                       # micro-batches per optimiser step
    object_mask_threshold: float = 0.8        # panoptic inference (ADE20K panoptic 0.7)
    overlap_threshold: float = 0.8
    ignore_label: int = 255
    # run-level settings (do not change the result, except `seed`)
    seed: int = 0                             # model init, data order, augmentation and dropout RNGs
    eval_period: int = 0                      # evaluate on the val split every N iterations (0: only at the end)
    checkpoint_period: int = 1000             # write last.pt every N iterations (and always at the end)
    log_period: int = 20                      # one metrics.jsonl line every N iterations
    num_workers: int = 2                      # data-loading processes per training process

    def __post_init__(self) -> None:
        self.crop_size = tuple(self.crop_size)
        self.short_sides = tuple(self.short_sides)
        self.tta_short_sides = tuple(self.tta_short_sides)
        self.lr_steps = tuple(self.lr_steps)
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.amp={self.amp!r}: expected off, bf16 or fp16")
        if self.augmentation not in ("semantic", "detr"):
            raise ValueError(f"TrainConfig.augmentation={self.augmentation!r}: expected semantic or detr")
        if self.tta_side not in ("short", "long"):
            raise ValueError(f"TrainConfig.tta_side={self.tta_side!r}: expected short or long")
        if self.lr_schedule not in ("poly", "step"):
            raise ValueError(f"TrainConfig.lr_schedule={self.lr_schedule!r}: expected poly or step")
        # sizes and periods: a zero or negative value hangs, divides by zero or silently means something else
        for name, low in (("iters", 1), ("batch_size", 1), ("grad_accum", 1), ("checkpoint_period", 1),
                          ("log_period", 1), ("eval_period", 0), ("num_workers", 0), ("max_size", 1),
                          ("test_short_side", 1), ("test_max_size", 1), ("tta_max_size", 1), ("warmup_iters", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name}={value!r}: expected an integer >= {low}"
                                 + (" (0: only at the end)" if name == "eval_period" else ""))
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r}: expected a number > 0")


# ----------------------------------------------------------------------------- overrides by section
# `--set SECTION.FIELD=VALUE` and `--config FILE.json` ({"model": {...}, "train": {...}, "loss": {...}})
SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "loss": LossConfig}


def parse_sets(items: list[str], base: dict[str, dict] | None = None) -> dict[str, dict]:
    """["model.num_queries=50", "train.crop_size=[384,384]", "loss.num_points=12544", "dropout=0"] ->
    {"model": {...}, "train": {...}, "loss": {...}} on top of `base` (a copy); a field without a section is a
    ModelConfig field. Values are type-checked (`parse_field`); unknown sections and fields are refused."""
    out = {section: dict((base or {}).get(section, {})) for section in SECTIONS}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE or SECTION.FIELD=VALUE, e.g. "
                             f"--set num_queries=50 or --set train.crop_size=[384,384]")
        section, dot, name = key.strip().rpartition(".")
        section = section if dot else "model"
        if section not in SECTIONS:
            raise ValueError(f"--set {item}: unknown section {section!r}; expected {', '.join(SECTIONS)} "
                             f"(no section: model)")
        try:
            out[section][name] = parse_field(SECTIONS[section], name, text)
        except ValueError as err:
            raise ValueError(f"--set {item}: {err}") from None
    return out


def read_overrides(path: str | Path) -> dict[str, dict]:
    """The overrides of a JSON file {"model": {...}, "train": {...}, "loss": {...}} (every section optional),
    each value type-checked (`check_field`); unknown sections and fields are refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object {{\"model\": {{...}}, \"train\": {{...}}, "
                         f"\"loss\": {{...}}}}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--config {path}: unknown section(s) {unknown}; expected {', '.join(SECTIONS)}")
    out: dict[str, dict] = {section: {} for section in SECTIONS}
    for section, fields in data.items():
        if not isinstance(fields, dict):
            raise ValueError(f"--config {path}: section {section!r} must be a JSON object of field: value")
        for name, value in fields.items():
            try:
                out[section][name] = check_field(SECTIONS[section], name, value)
            except ValueError as err:
                raise ValueError(f"--config {path}: {err}") from None
    return out
