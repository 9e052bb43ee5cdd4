"""What each speed path of `mfcore.fast` buys: paired timings of the plain core, of every path on, and of every
path on but one, call by call in alternation (`bench_steps.alternate`), for the steps the project waits on.

    python -m benchmarks.fast_paths --threads 2 --reps 10            # all rows
    python -m benchmarks.fast_paths --only maskformer-train --variants off on --reps 20

Rows: a training step (forward, 18 or 6 loss terms, backward, optimiser step) of each small preset at
batch 16, 64x64, and of R50 at batch 2, 256x256; an R50 prediction (forward + semantic label map) at 512x512.
A path pays where "on" beats "on without <path>". On a shared machine the process CPU time per call (and the
fastest call) are steadier than the median wall time; all three are printed and written as JSON (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from benchmarks.bench_steps import R50, alternate, make_batch
from mfcore import fast
from mfcore.fast.semantic_labels import semantic_labels
from mfcore.inference import semantic_inference
from mfcore.losses import total_loss
from mfcore.modeling.models import build_model
from mfcore.presets import get_preset
from mfcore.training.solver import clip_gradients

SMALL = ("synthetic-perpixel-tiny", "synthetic-perpixelplus-tiny", "synthetic-maskformer-tiny",
         "synthetic-maskformer-fixed-tiny")
ROWS = {f"{name.removeprefix('synthetic-').removesuffix('-tiny')}-train": name for name in SMALL}
ROWS |= {"r50-train": R50, "r50-inference": R50}
PATHS = (*fast.MODEL_PATHS, *fast.CRITERION_PATHS, *fast.OPTIMIZER_PATHS, "semantic_labels")


def _variants() -> dict[str, tuple[str, ...] | None]:
    """name -> the speed paths it uses (None: the switch off)."""
    return {"off": None, "on": PATHS} | {f"on without {p}": tuple(q for q in PATHS if q != p) for p in PATHS}


def train_step(preset: str, paths: tuple[str, ...] | None, batch: int, size: int,
               phases: bool = False) -> Callable[[], None]:
    """One optimiser step of `preset` built with the given speed paths (None: plain); phases: each phase
    (forward, criterion, backward, optimizer) in a profiler range of that name."""
    p = get_preset(preset)
    torch.manual_seed(0)
    model = build_model(p.model).train()
    criterion_args = (p.loss.matcher, p.model.num_classes, p.model.num_queries)
    criterion_kwargs = {"dec_layers": p.model.dec_layers, "eos_coef": p.loss.eos_coef}
    was = fast.enabled()
    fast.set_enabled(paths is not None)
    try:
        fast.accelerate(model, tuple(q for q in paths or () if q in fast.MODEL_PATHS))
        criterion = fast.build_criterion(*criterion_args, **criterion_kwargs,
                                         paths=tuple(q for q in paths or () if q in fast.CRITERION_PATHS))
        optimizer = fast.build_optimizer(model, p.train, paths=tuple(q for q in paths or () if q in fast.OPTIMIZER_PATHS))
    finally:
        fast.set_enabled(was)
    images, targets = make_batch(batch, size, p.model.num_classes, seed=0)

    def phase(name: str):
        return record_function(name) if phases else contextlib.nullcontext()

    def step() -> None:
        with phase("forward"):
            outputs = model(images)
        with phase("criterion"):
            loss = total_loss(criterion(outputs, targets), criterion.weight_dict)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            clip_gradients(model, p.train.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def prediction(preset: str, paths: tuple[str, ...] | None, size: int) -> Callable[[], torch.Tensor]:
    """Forward + semantic label map of one image."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset).model).eval()
    was = fast.enabled()
    fast.set_enabled(paths is not None)
    try:
        fast.accelerate(model, tuple(q for q in paths or () if q in fast.MODEL_PATHS))
    finally:
        fast.set_enabled(was)
    tiled = paths is not None and "semantic_labels" in paths
    images = torch.rand(1, 3, size, size) * 255

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model(images)
            if tiled:
                return semantic_labels(out["pred_logits"], out["pred_masks"], (size, size))
            masks = F.interpolate(out["pred_masks"], size=(size, size), mode="bilinear", align_corners=False)
            return semantic_inference(out["pred_logits"], masks, inplace=True).argmax(-3)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=tuple(ROWS), default=tuple(ROWS))
    parser.add_argument("--variants", nargs="+", help="time only these (e.g. off on); default: all")
    parser.add_argument("--out", type=Path, help="JSON file for the timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for row in args.only:
        preset = ROWS[row]
        batch, size = (1, 512) if row == "r50-inference" else ((2, 256) if row == "r50-train" else (16, 64))
        fns = {name: (prediction(preset, paths, size) if row == "r50-inference"
                      else train_step(preset, paths, batch, size))
               for name, paths in _variants().items() if not args.variants or name in args.variants}
        timings = alternate(fns, args.reps, args.warmup, torch.device("cpu"))
        results[row] = {name: {k: t[k] for k in ("median_s", "min_s", "median_cpu_s")} for name, t in timings.items()}
        print(f"{row} (batch {batch}, {size}x{size}, {args.threads} threads, {args.reps} paired rounds): "
              "median wall, fastest wall, median process CPU time, img/s of the fastest wall")
        for name, t in results[row].items():
            print(f"  {name:28s} {1000 * t['median_s']:8.1f} ms {1000 * t['min_s']:8.1f} ms "
                  f"{1000 * t['median_cpu_s']:8.1f} ms cpu {batch / t['min_s']:7.1f} img/s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
