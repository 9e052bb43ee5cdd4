"""The pieces `benchmarks.bench` times: synthetic inputs, one closure per contender and case, the alternating
timer, the FLOP counter and the fresh-process memory probe.

Every closure runs one complete unit of work (a training step, a prediction, a matching) so that
`alternate` can interleave contenders call by call. The transformers side comes from `benchmarks.bench_hf`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_hf
from mfcore import fast
from mfcore.companion.paper_numbers import TABLE1
from mfcore.fast.semantic_labels import semantic_labels
from mfcore.files import REPO
from mfcore.inference import semantic_inference
from mfcore.losses import total_loss
from mfcore.modeling.models import build_model
from mfcore.companion.profiles import get_profile
from mfcore.presets import get_preset, with_classes
from mfcore.training.solver import clip_gradients

R50 = "ade20k-maskformer-r50"     # K=150, N=100, 6 decoder layers: the configuration
SMALL_MODELS = ("perpixel", "perpixelplus", "maskformer-fixed", "maskformer")  # small rows, quick protocol
NOISY_SPREAD = 1.3                 # median / fastest call above this: the machine was busy, rerun when idle
SEGMENTS = 8                       # ground-truth segments per image (ADE20K averages 8.2 classes per image)
TARGETS = {"train_step": 0.8, "inference": 0.7, "matcher": 0.5, "train_memory": 1.0}  # CPU, mfcore / transformers
GPU_TARGETS = {"train_fp32": 1.0, "train_bf16": 1.0, "train_memory": 1.0}  # GPU: ahead of transformers on it
GPU_FPS_TARGET = 3 * TABLE1[R50]["fps"]  # inference_fp32_b1, img/s: 3x the paper's V100 (24.5 fps)
SIZES = {  # full and --quick problem sizes
    "full": dict(train=(256, 2), infer=(512, 1), match=64, small=(64, 16), gpu_train=(512, 8), gpu_infer=(512, 16)),
    "quick": dict(train=(64, 1), infer=(64, 1), match=16, small=(64, 4), gpu_train=(128, 2), gpu_infer=(128, 4)),
}


# ----------------------------------------------------------------------------------------------- inputs
def make_batch(batch: int, size: int, num_classes: int, seed: int = 0, device: str | torch.device = "cpu",
               segments: int = SEGMENTS) -> tuple[torch.Tensor, list[dict]]:
    """images [B,3,S,S] in 0..255 and targets with `segments` disjoint masks [n,S,S] (float 0/1) each:
    the Voronoi cells of distinct seed pixels, so every segment is non-empty; distinct random classes."""
    if segments > num_classes or segments > size * size:
        raise ValueError(f"segments={segments}: expected at most num_classes={num_classes} and {size}x{size} pixels")
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=gen) * 255
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    targets = []
    for _ in range(batch):
        seeds = torch.randperm(size * size, generator=gen)[:segments]
        dist = (ys - (seeds // size)[:, None, None]) ** 2 + (xs - (seeds % size)[:, None, None]) ** 2
        cells = dist.argmin(0)                                            # [S, S] segment index per pixel
        masks = (cells[None] == torch.arange(segments)[:, None, None]).float()
        labels = torch.randperm(num_classes, generator=gen)[:segments]
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return images.to(device), targets


def normalized(images: torch.Tensor) -> torch.Tensor:
    """What transformers' image processor hands the model (mfcore normalises inside its forward)."""
    cfg = get_preset(R50).model
    mean = torch.tensor(cfg.pixel_mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# ------------------------------------------------------------------------------------------------ steps
def _autocast(device: torch.device, amp: str | None):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def build_contender(impl: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The R50 model of one side: "mfcore" or "transformers" (same architecture, random weights)."""
    torch.manual_seed(seed)
    model = fast.accelerate(build_model(R50)) if impl == "mfcore" else bench_hf.build_model(num_classes=150,
                                                                                           num_queries=100)
    return model.to(device)


def train_step(impl: str, model: torch.nn.Module, images: torch.Tensor, targets: list[dict],
               amp: str | None = None) -> Callable[[], None]:
    """forward + loss with deep supervision (18 terms) + backward, as a closure."""
    device = images.device
    model.train()
    if impl == "mfcore":
        criterion = fast.build_criterion("hungarian", 150, 100, dec_layers=6).to(device)

        def step() -> None:
            with _autocast(device, amp):       # as mfcore.train: autocast the model, fp32 loss
                outputs = model(images)
            total_loss(criterion(outputs, targets), criterion.weight_dict).backward()
            model.zero_grad(set_to_none=True)
        return step
    pixels, masks, labels = normalized(images), [t["masks"] for t in targets], [t["labels"] for t in targets]

    def hf_step() -> None:
        with _autocast(device, amp):           # a transformers user autocasts the call that returns the loss
            loss = bench_hf.train_loss(model, pixels, masks, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return hf_step


def inference(impl: str, model: torch.nn.Module, images: torch.Tensor, amp: str | None = None) -> Callable[[], object]:
    """eval-mode forward + semantic inference to a label map [B, H, W], as a closure."""
    model.eval()
    if impl == "mfcore":
        size = tuple(images.shape[-2:])

        def run() -> torch.Tensor:
            with torch.inference_mode(), _autocast(images.device, amp):
                out = model(images)
                if fast.enabled():
                    return semantic_labels(out["pred_logits"], out["pred_masks"], size)
                masks = torch.nn.functional.interpolate(out["pred_masks"], size=size, mode="bilinear",
                                                        align_corners=False)
                return semantic_inference(out["pred_logits"], masks, inplace=True).argmax(-3)
        return run
    pixels, predict = normalized(images), bench_hf.semantic_predictor()

    def hf_run() -> list[torch.Tensor]:
        with torch.inference_mode(), _autocast(images.device, amp):
            return predict(model, pixels)
    return hf_run


def matcher_inputs(size: int, device: torch.device, seed: int = 0) -> tuple[dict, list[dict]]:
    """B=2, N=100, K=150 predictions at size^2 and 8 ground-truth segments per image at (4 size)^2."""
    gen = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(2, 100, 151, generator=gen).to(device),
               "pred_masks": (3 * torch.randn(2, 100, size, size, generator=gen)).to(device)}
    return outputs, make_batch(2, 4 * size, 150, seed, device)[1]


def matchers(outputs: dict, targets: list[dict], with_hf: bool) -> dict[str, Callable[[], list]]:
    mf = fast.build_criterion("hungarian", 150, 100).matcher
    fns = {"mfcore": lambda: mf(outputs, targets)}
    if with_hf:
        hf = bench_hf.build_matcher()
        masks, labels = [t["masks"] for t in targets], [t["labels"] for t in targets]
        fns["transformers"] = lambda: hf(outputs["pred_masks"], outputs["pred_logits"], masks, labels)
    return fns


def small_step(model_name: str, size: int, batch: int, device: torch.device, compiled: bool = False,
               seed: int = 0) -> Callable[[], None]:
    """One full optimiser step of a small model as the quick profile trains it (its width, memory, N; K = its
    base K), from a random backbone: what every notebook and trained table waits for."""
    profile = get_profile("quick")
    preset = get_preset(f"synthetic-{model_name}-{profile.backbone}")
    config = with_classes(dataclasses.replace(preset.model, **profile.model_fields(model_name)), preset.loss,
                          profile.base_classes)
    torch.manual_seed(seed)
    model = fast.accelerate(build_model(config).to(device).train())
    criterion = fast.build_criterion(preset.loss.matcher, config.num_classes, config.num_queries,
                                     dec_layers=config.dec_layers).to(device)
    optimizer = fast.build_optimizer(model, preset.train)
    forward = torch.compile(model) if compiled else model
    images, targets = make_batch(batch, size, config.num_classes, seed, device)

    def step() -> None:
        total_loss(criterion(forward(images), targets), criterion.weight_dict).backward()
        clip_gradients(model, preset.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device) -> dict[str, dict]:
    """Warm each contender up, then `reps` rounds running every contender once, the order reversed every
    other round. -> {name: {"median_s", "wall_s": [...], "median_cpu_s", "cpu_s": [...]}}"""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: {"median_s": statistics.median(wall[n]), "min_s": min(wall[n]), "wall_s": wall[n],
                "median_cpu_s": statistics.median(cpu[n]), "cpu_s": cpu[n]} for n in names}


def count_flops(fn: Callable[[], object]) -> int:
    """Flops (2 per multiply-add, as GPU peaks are quoted) of one call, forward and backward."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class _OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def count_operators(fn: Callable[[], object]) -> int:
    """ATen operators one call runs, views excluded. Run eagerly on a GPU, each is at least one kernel
    launch, and a batch-1 prediction is bound by launches there: a count that CPU runs can check."""
    with _OperatorCounter() as counter:
        fn()
    return counter.count


def case(name: str, what: str, timings: dict[str, dict], per_call: float = 1.0, unit: str = "s",
         flops: int | None = None, targets: dict[str, float] = TARGETS) -> dict:
    """One result row; `per_call` converts a call's time into the reported unit (e.g. images per call for
    img/s: value = per_call / median_s). The ratio is mfcore's time over transformers'; `targets` the
    largest ratio each case name may reach (TARGETS on CPU, GPU_TARGETS on a GPU)."""
    row = {"name": name, "what": what, "unit": unit}
    for impl, t in timings.items():
        row[impl] = dict(t, value=per_call / t["median_s"] if unit == "img/s" else t["median_s"] * per_call)
    if "transformers" in timings:
        row["ratio"] = timings["mfcore"]["median_s"] / timings["transformers"]["median_s"]
        row["ratio_cpu_time"] = timings["mfcore"]["median_cpu_s"] / timings["transformers"]["median_cpu_s"]
        if "min_s" in timings["mfcore"]:  # noise only ever adds time: the ratio of the fastest calls
            row["ratio_min"] = timings["mfcore"]["min_s"] / timings["transformers"]["min_s"]
            # a median far above the fastest call means other processes competed for the cores
            row["noisy"] = max(t["median_s"] / t["min_s"] for t in timings.values()) > NOISY_SPREAD
        if name in targets:
            row["target"], row["met"] = targets[name], row["ratio"] <= targets[name]
    if flops is not None:
        row["mfcore"]["flops_per_call"] = flops
        row["mfcore"]["achieved_tflops"] = flops / timings["mfcore"]["median_s"] / 1e12
    return row


# ----------------------------------------------------------------------------------------------- memory
def _reset_rss_peak() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM, so the peak below is the step's alone
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (memory measurement needs Linux)")


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: build one contender and its inputs, then run two train steps.
    CPU: resident set before the first step (VmRSS) and its high-water mark over the steps (VmHWM);
    GPU: torch.cuda.memory_allocated before and max_memory_allocated over the steps."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    images, targets = make_batch(spec["batch"], spec["size"], 150, 0, device)
    step = train_step(spec["impl"], build_contender(spec["impl"], device), images, targets, spec.get("amp"))
    _sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before, reset = _rss_bytes("VmRSS"), _reset_rss_peak()
    for _ in range(2):  # the second step runs with whatever the first one left cached
        step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes("VmHWM")
    result = {"before_step_mib": before / 2**20, "peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}
    if device.type == "cpu":
        result["peak_reset"] = reset
    return result


def measure_memory(impl: str, device: torch.device, size: int, batch: int, threads: int,
                   amp: str | None = None) -> dict:
    """memory_child of `impl` in a fresh Python process (so neither side's freed memory or caches mask
    the other's). glibc is told to serve every block of 64 KiB or more with mmap and to give it back
    on free: the resident set then follows the live tensors and its high-water mark is their peak,
    not whatever the allocator chose to keep."""
    spec = {"impl": impl, "device": str(device), "size": size, "batch": batch, "threads": threads, "amp": amp}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_steps", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {impl} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_case(name: str, what: str, results: dict[str, dict], targets: dict[str, float] = TARGETS) -> dict:
    row = {"name": name, "what": what, "unit": "MiB"}
    for impl, r in results.items():
        row[impl] = dict(r, value=r["step_mib"])
    if "transformers" in results:
        row["ratio"] = results["mfcore"]["step_mib"] / results["transformers"]["step_mib"]
        row["ratio_peak"] = results["mfcore"]["peak_mib"] / results["transformers"]["peak_mib"]
        row["target"], row["met"] = targets[name], row["ratio"] <= targets[name]
    return row


if __name__ == "__main__":  # the fresh process of measure_memory
    print(json.dumps(memory_child(json.loads(sys.argv[1]))))
