"""Checkpoints: atomic save, safe load (`weights_only=True`), RNG state capture, clear mismatch errors.

A checkpoint is one dict of tensors and plain Python values, so `torch.load(..., weights_only=True)` can
read it without unpickling arbitrary objects:

    {"format": "mfcore-checkpoint-1", "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "iteration": int (optimiser steps done), "rng": {"torch", "cuda", "numpy", "python"},
     "sampler": {"epoch", "position"}, "config": {"preset", "model", "loss", "train"} (plain dicts),
     "git_commit": str}

Saving goes through `mfcore.files.atomic_write`: a run killed while saving leaves the previous checkpoint
intact, never a truncated file.
"""
from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mfcore.config import LossConfig, ModelConfig, TrainConfig, from_dict, to_dict
from mfcore.files import atomic_write, git_commit

FORMAT = "mfcore-checkpoint-1"


def capture_rng_state() -> dict:
    """RNG states of torch (CPU and every CUDA device), numpy and Python, as tensors / plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def config_dict(preset: str, model: ModelConfig, loss: LossConfig, train: TrainConfig) -> dict:
    """The resolved configs as plain dicts (what every checkpoint and result file carries)."""
    return {"preset": preset, "model": to_dict(model), "loss": to_dict(loss), "train": to_dict(train)}


def configs_from_checkpoint(ckpt: dict) -> tuple[str, ModelConfig, LossConfig, TrainConfig]:
    """(preset name, ModelConfig, LossConfig, TrainConfig) stored in a loaded checkpoint."""
    cfg = ckpt["config"]
    return (cfg["preset"], from_dict(ModelConfig, cfg["model"]), from_dict(LossConfig, cfg["loss"]),
            from_dict(TrainConfig, cfg["train"]))


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Write `checkpoint` (see module docstring) to `path` atomically."""
    checkpoint = {"format": FORMAT, "git_commit": git_commit(), **checkpoint}
    try:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except RuntimeError as err:  # torch's zip writer: "[enforce fail at inline_container.cc] unexpected pos"
        free = ""
        try:
            free = f"; {shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free on its disk"
        except OSError:
            pass
        raise OSError(errno.EIO, f"cannot write checkpoint {path}: writing failed (disk full?){free}") from err


def load_checkpoint(path: str | Path) -> dict:
    """Read an mfcore checkpoint on the CPU without unpickling code (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): it was not written completely")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types; all mean "not a readable checkpoint"
        reason = " ".join(str(err).split()) or type(err).__name__
        hint = (". Released detectron2 .pkl files must be converted first: python -m mfcore convert-checkpoint "
                "FILE.pkl OUT.pt --preset NAME --allow-pickle") if path.suffix == ".pkl" else ""
        raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {reason}{hint}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mfcore checkpoint (expected a dict with format={FORMAT!r})")
    return ckpt


def _listing(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def state_dict_mismatch(expected: dict[str, Tensor], given: dict[str, Tensor]) -> list[str]:
    """Human-readable differences between a model's state dict and one to load into it ([] if none)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in given and given[k].shape != expected[k].shape]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("different shapes", shapes)):
        if items:
            problems.append(f"{what} ({len(items)}): {_listing(items)}")
    return problems


def load_model_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` into `model` strictly; any key or shape difference is a ValueError that lists them."""
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not fit this model (was it saved for another preset or size?): "
                         + "; ".join(problems))
    model.load_state_dict(state)


def config_differences(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """`section.field: a != b` for every differing field of two `config_dict`s. A field only one of them has was
    added after the other was saved; it is not a difference (a run saved before it can still be resumed)."""
    out = [f"preset: {a['preset']} != {b['preset']}"] if a["preset"] != b["preset"] else []
    for section in ("model", "loss", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if key in ignore or key not in a[section] or key not in b[section]:
                continue
            va, vb = a[section].get(key), b[section].get(key)
            if _normalise(va) != _normalise(vb):
                out.append(f"{section}.{key}: {va!r} != {vb!r}")
    return out


def _normalise(value: Any) -> Any:
    # lists and tuples compare equal (JSON round trips turn tuples into lists)
    return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


__all__ = ["capture_rng_state", "restore_rng_state", "config_dict", "configs_from_checkpoint",
           "save_checkpoint", "load_checkpoint", "state_dict_mismatch", "load_model_state",
           "config_differences"]


def load_trained_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The model a checkpoint was trained as, with its weights, in eval mode, its speed paths swapped in
    (`mfcore.fast.accelerate`): (model, checkpoint dict)."""
    from mfcore import fast
    from mfcore.config import override
    from mfcore.modeling.models import build_model

    ckpt = load_checkpoint(path)
    _, model_cfg, _, _ = configs_from_checkpoint(ckpt)
    model = build_model(override(model_cfg, pretrained=None))  # weights come from the checkpoint
    load_model_state(model, ckpt["model"], str(path))
    return fast.accelerate(model).eval(), ckpt
