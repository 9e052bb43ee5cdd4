"""Import the authors' released detectron2 checkpoints (`model_final.pkl`) into an mfcore checkpoint.

A released file is a pickled dict whose "model" entry maps parameter names to numpy arrays. mfcore's
module names mirror the released ones, so the conversion is a list of renames (the names of the released
`model_final.pkl` state dicts):

    released (detectron2)                                  mfcore
    backbone.stem.conv1.weight / .norm.*                   backbone.conv1.weight / backbone.bn1.*
    backbone.stem.conv{1,2,3} (+ .norm) (R101c stem)       backbone.conv1.{0,3,6} (+ conv1.{1,4}, bn1)
    backbone.res{s}.{j}.conv{c}.weight / .norm.*           backbone.layer{s-1}.{j}.conv{c}.weight / .bn{c}.*
    backbone.res{s}.0.shortcut.weight / .norm.*            backbone.layer{s-1}.0.downsample.0.weight / .1.*
    backbone.<swin names>                                  timm's Swin layout (backbone.convert_checkpoint)
    sem_seg_head.{adapter_i,layer_i}.weight / .norm.*      pixel_decoder.{adapter_i,layer_i}.0.weight / .1.*
    sem_seg_head.mask_features.*                           pixel_decoder.mask_features.*
    sem_seg_head.input_proj.* (+6 Enc)                     pixel_decoder.input_proj.*
    sem_seg_head.transformer.encoder.layers.*              pixel_decoder.encoder.layers.*
    sem_seg_head.predictor.transformer.decoder.layers.*    predictor.transformer.layers.*
    sem_seg_head.predictor.transformer.decoder.norm.*      predictor.transformer.norm.*
    sem_seg_head.predictor.*                               predictor.*
    criterion.empty_weight                                 (a loss buffer, not a model weight: skipped)

Unpickling can run arbitrary code hidden in the file, so it happens only with `allow_pickle=True`
(`--allow-pickle` on the command line), and even then through an unpickler that only rebuilds numpy
arrays and plain containers. A folder instead of a file is a Hugging Face snapshot of transformers'
MaskFormer, read without unpickling by `mfcore.training.convert_hf`.
"""
from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mfcore.config import ModelConfig
from mfcore.modeling.models import build_model
from mfcore.presets import get_preset
from mfcore.training.checkpoint import config_dict, save_checkpoint, state_dict_mismatch

# released names that are not model weights in mfcore
SKIPPED = ("criterion.empty_weight",)

# (pattern, replacement) applied in order to names outside the backbone; first match wins
HEAD_RULES = [
    (r"^sem_seg_head\.predictor\.transformer\.decoder\.layers\.", "predictor.transformer.layers."),
    (r"^sem_seg_head\.predictor\.transformer\.decoder\.norm\.", "predictor.transformer.norm."),
    (r"^sem_seg_head\.predictor\.", "predictor."),
    (r"^sem_seg_head\.transformer\.encoder\.layers\.", "pixel_decoder.encoder.layers."),
    (r"^sem_seg_head\.input_proj\.", "pixel_decoder.input_proj."),
    # conv_gn blocks are nn.Sequential(conv, GroupNorm[, ReLU]): index 0 is the conv, 1 the norm
    (r"^sem_seg_head\.((?:adapter|layer)_\d)\.norm\.", r"pixel_decoder.\1.1."),
    (r"^sem_seg_head\.((?:adapter|layer)_\d)\.weight$", r"pixel_decoder.\1.0.weight"),
    (r"^sem_seg_head\.mask_features\.", "pixel_decoder.mask_features."),
]
# detectron2 ResNet -> torchvision/timm ResNet names (without the "backbone." prefix)
RESNET_RULES = [
    (r"^res(\d)\.(\d+)\.conv(\d)\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (r"^res(\d)\.(\d+)\.conv(\d)\.weight$", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (r"^res(\d)\.(\d+)\.shortcut\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
    (r"^res(\d)\.(\d+)\.shortcut\.weight$", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
]
PLAIN_STEM_RULES = [(r"^stem\.conv1\.norm\.", "bn1."), (r"^stem\.conv1\.weight$", "conv1.weight")]
# DeepLab stem (R101c): timm's "deep" stem is Sequential(conv, BN, ReLU, conv, BN, ReLU, conv) then bn1
DEEP_STEM_RULES = [(r"^stem\.conv1\.norm\.", "conv1.1."), (r"^stem\.conv1\.weight$", "conv1.0.weight"),
                   (r"^stem\.conv2\.norm\.", "conv1.4."), (r"^stem\.conv2\.weight$", "conv1.3.weight"),
                   (r"^stem\.conv3\.norm\.", "bn1."), (r"^stem\.conv3\.weight$", "conv1.6.weight")]

# globals a detectron2 .pkl of numpy arrays may reference; anything else is refused
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and containers only (defence in depth after --allow-pickle)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"the file references {module}.{name}, which is not a numpy array type; "
                                         "refusing to import it")
        if module.startswith("numpy.core") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = module.replace("numpy.core", "numpy._core")  # the same functions, renamed in numpy 2
        return getattr(importlib.import_module(module), name)


def read_released(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The {name: tensor} "model" dict of a released detectron2 .pkl; needs allow_pickle=True."""
    path = Path(path)
    if not allow_pickle:
        raise ValueError(f"refusing to read {path}: it is a Python pickle, and unpickling a file can run "
                         "arbitrary code stored in it. If you trust its source (e.g. the authors' released "
                         "model_final.pkl), pass --allow-pickle (allow_pickle=True).")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"cannot unpickle {path} as a detectron2 checkpoint: {err}") from err
    weights = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, np.ndarray) for v in weights.values()):
        raise ValueError(f"{path}: expected a dict with a 'model' entry mapping names to numpy arrays")
    odd = [f"{k} ({v.dtype})" for k, v in weights.items() if v.dtype.kind not in "biuf"]
    if odd:  # e.g. object arrays, which torch cannot hold
        raise ValueError(f"{path}: {len(odd)} entr(ies) of 'model' are not numeric arrays (first: {odd[0]}); "
                         f"expected numeric weights")
    return {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}  # np.array: a writable copy


def apply_rules(rules: list, name: str) -> str | None:
    """`name` rewritten by the first (pattern, replacement) of `rules` that matches it; None if none does."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def rename_released(weights: dict[str, Tensor], backbone: torch.nn.Module,
                    backbone_name: str) -> tuple[dict[str, Tensor], list[str]]:
    """Released names -> mfcore names. Returns (renamed state dict, released names that no rule covers)."""
    out, unknown, backbone_part = {}, [], {}
    for name, value in weights.items():
        if name in SKIPPED:
            continue
        if name.startswith("backbone."):
            backbone_part[name.removeprefix("backbone.")] = value
            continue
        new = apply_rules(HEAD_RULES, name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = value
    if backbone_name.startswith("swin"):
        # timm's filter moves Microsoft's end-of-stage downsampling to the next stage's start and drops
        # the recomputed index buffers; the names are otherwise the same
        backbone_part = backbone.convert_checkpoint(backbone_part)
        out.update({f"backbone.{k}": v for k, v in backbone_part.items()})
    else:
        rules = RESNET_RULES + (DEEP_STEM_RULES if backbone_name == "r101c" else PLAIN_STEM_RULES)
        for name, value in backbone_part.items():
            new = apply_rules(rules, name)
            if new is None:
                unknown.append(f"backbone.{name}")
            else:
                out[f"backbone.{new}"] = value
    return out, unknown


def convert_checkpoint(pkl: str | Path, output: str | Path, preset: str, allow_pickle: bool = False) -> dict:
    """Convert a released .pkl for `preset` into an mfcore checkpoint at `output` (loadable by `evaluate`).

    `pkl` may also be a Hugging Face snapshot folder of transformers' MaskFormer (config.json and
    model.safetensors or pytorch_model.bin), converted by `mfcore.training.convert_hf` without unpickling.
    Raises ValueError if a weight of the model is missing or has another shape (listing them); released
    names that map to nothing are reported in the returned summary and dropped.
    Returns {"output", "converted", "skipped", "unexpected"}.
    """
    if Path(pkl).is_dir():
        from mfcore.training.convert_hf import convert_hf_folder

        return convert_hf_folder(pkl, output, preset)
    weights = read_released(pkl, allow_pickle)
    cfg = get_preset(preset)
    with torch.device("meta"):  # only names and shapes are needed to check the mapping
        model = build_model(cfg.model)
    state, unknown = rename_released(weights, model.backbone, cfg.model.backbone)
    summary = save_converted(state, unknown, model.state_dict(), pkl, output, preset, cfg.model)
    return {**summary, "skipped": [k for k in weights if k in SKIPPED]}


def save_converted(state: dict[str, Tensor], unknown: list[str], expected: dict[str, Tensor], source: str | Path,
                   output: str | Path, preset: str, model_cfg: ModelConfig) -> dict:
    """Check renamed weights `state` against the model's state dict `expected` and save them as an mfcore
    checkpoint of `preset` with model config `model_cfg`. `unknown`: source names no rule covers.

    Raises ValueError listing what is missing or has another shape (nothing is written then).
    Returns {"output", "converted", "unexpected"}.
    """
    cfg = get_preset(preset)
    unexpected = sorted(unknown + [k for k in state if k not in expected])
    state = {k: v for k, v in state.items() if k in expected}
    for k in expected:
        # detectron2 files never store BatchNorm's step counter (its BN is frozen); mfcore's small r18 has
        # trainable BN, whose counter only matters for momentum=None: start it at 0
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.int64)
    problems = state_dict_mismatch(expected, state)
    if problems:
        raise ValueError(f"{source} does not fit preset {preset!r}: " + "; ".join(problems)
                         + (f"; released names left unused: {unexpected[:12]}" if unexpected else ""))
    save_checkpoint(output, {"model": state, "iteration": 0, "config": config_dict(preset, model_cfg, cfg.loss,
                                                                                    cfg.train),
                             "source": str(source)})
    return {"output": str(output), "converted": len(state), "unexpected": unexpected}


__all__ = ["read_released", "rename_released", "convert_checkpoint", "save_converted", "SKIPPED"]
