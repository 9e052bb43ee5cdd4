"""Checkpoints: atomic save, safe load (`weights_only=True`), RNG state capture, clear mismatch errors.

A checkpoint is one dict of tensors and plain Python values, so `torch.load(..., weights_only=True)` can
read it without unpickling arbitrary objects:

    {"format": "mfcore-checkpoint-1", "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "iteration": int (optimiser steps done), "rng": {"torch", "cuda", "numpy", "python"},
     "sampler": {"epoch", "position"}, "config": {"preset", "model", "loss", "train"} (plain dicts),
     "git_commit": str}

Saving writes `<name>.tmp` in the same folder and renames it over the target with `os.replace`, which is
atomic on POSIX: a run killed while saving leaves the previous checkpoint intact, never a truncated file.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import LossConfig, ModelConfig, TrainConfig, from_dict, to_dict

FORMAT = "mfcore-checkpoint-1"


def git_commit() -> str:
    """Commit of the mfcore source tree (with "-dirty" if files outside results/ have local changes), or "unknown".
    MFCORE_GIT_COMMIT names it for a copy of the tree without .git (e.g. a job shipped to a GPU machine)."""
    if os.environ.get("MFCORE_GIT_COMMIT"):
        return os.environ["MFCORE_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # results/ is written by the runs themselves: changes there do not make the source dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


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


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over if writing failed


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Write `checkpoint` (see module docstring) to `path` atomically."""
    checkpoint = {"format": FORMAT, "git_commit": git_commit(), **checkpoint}
    _atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def json_safe(obj: Any) -> Any:
    """`obj` with NaN/inf floats replaced by None and tuples by lists (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, strict JSON (NaN -> null) to `path` atomically."""
    data = json.dumps(json_safe(obj), indent=2, allow_nan=False).encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def load_checkpoint(path: str | Path) -> dict:
    """Read an mfcore checkpoint on the CPU without unpickling code (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types; all mean "not a readable checkpoint"
        raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {err}. "
                         f"Released detectron2 .pkl files must be converted first: "
                         f"python -m mfcore convert-checkpoint FILE.pkl OUT.pt --preset NAME --allow-pickle") from err
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
    """`section.field: a != b` for every differing field of two `config_dict`s."""
    out = [f"preset: {a['preset']} != {b['preset']}"] if a["preset"] != b["preset"] else []
    for section in ("model", "loss", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if key in ignore:
                continue
            va, vb = a[section].get(key), b[section].get(key)
            if _normalise(va) != _normalise(vb):
                out.append(f"{section}.{key}: {va!r} != {vb!r}")
    return out


def _normalise(value: Any) -> Any:
    # lists and tuples compare equal (JSON round trips turn tuples into lists)
    return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


__all__ = ["git_commit", "capture_rng_state", "restore_rng_state", "config_dict", "configs_from_checkpoint",
           "save_checkpoint", "json_safe", "write_json", "load_checkpoint", "state_dict_mismatch", "load_model_state",
           "config_differences"]


def load_trained_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The model a checkpoint was trained as, with its weights, in eval mode: (model, checkpoint dict)."""
    from .config import override
    from .models import build_model

    ckpt = load_checkpoint(path)
    _, model_cfg, _, _ = configs_from_checkpoint(ckpt)
    model = build_model(override(model_cfg, pretrained=None))  # weights come from the checkpoint
    load_model_state(model, ckpt["model"], str(path))
    return model.eval(), ckpt
