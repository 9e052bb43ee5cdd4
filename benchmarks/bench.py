"""Performance benchmarks: mfcore against Hugging Face transformers' MaskFormer, side by side in one run.

`python -m mfcore bench [--device cpu|cuda] [--threads N] [--reps R] [--quick]`

CPU (R50 = MaskFormer ResNet-50, K=150 classes, N=100 queries, 6 decoder layers; random weights):
  train_step    forward + loss with deep supervision (18 terms) + backward, 256x256, batch 2
  inference     eval forward + semantic inference to a label map, 512x512, batch 1
  matcher       Hungarian matching alone: B=2, N=100, K=150, 64x64 predictions, 8 segments per image
  train_memory  extra memory of one train_step, each side in a fresh process (RSS high-water mark)
  small_train   the four small models of the tables (perpixel, perpixelplus, maskformer-fixed, maskformer) as
                the quick profile trains them, 64x64, batch 16, full optimiser steps (mfcore only; with
                --compile also compiled): the throughput the notebooks' training waits on
GPU (`--device cuda`): training img/s of R50 at 512x512, batch 8, in fp32 and bf16 autocast; inference
img/s at batch 1 (the paper: 24.5 fps on a V100) and batch 16; the achieved FLOP rate against the GPU's
datasheet peak; matcher and memory (torch.cuda.max_memory_allocated) as on CPU.
Both: the ATen operators of one eager eval forward per side (views excluded), a count CPU runs can check
of what bounds a batch-1 prediction on a GPU, where every operator is at least one kernel launch.

Method: one process, fixed thread count, warm-up calls, then rounds in which the two sides run one
after the other, alternating who goes first; medians of wall time (and of process CPU time) are
reported, ratio = mfcore time / transformers time. Targets (CPU): train_step <= 0.8, inference <= 0.7,
matcher <= 0.5, train_memory <= 1.0; (GPU) training in fp32 and bf16 and its memory <= 1.0, inference
at batch 1 in fp32 >= 73.5 img/s (3x the paper's V100). Results: results/benchmarks/<device>[-quick].{json,md}.
transformers is optional (`pip install -e ".[bench]"`); without it the mfcore side runs alone.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from benchmarks import bench_hf
from benchmarks.bench_report import cpu_family_tag, environment, print_table, write_results
from benchmarks.bench_steps import (
    GPU_FPS_TARGET,
    GPU_TARGETS,
    R50,
    SIZES,
    alternate,
    build_contender,
    case,
    count_flops,
    count_operators,
    inference,
    make_batch,
    matcher_inputs,
    matchers,
    measure_memory,
    memory_case,
    normalized,
    SMALL_MODELS,
    small_step,
    train_step,
)
from mfcore import fast
from mfcore.companion.analysis import count_macs
from mfcore.companion.profiles import get_profile
from mfcore.losses import total_loss
from mfcore.modeling.models import build_model
from mfcore.training.runtime import keep_freed_memory, resolve_device

# dense datasheet peaks in TFLOP/s: (fp32 CUDA cores, tf32 tensor cores, bf16 tensor cores); first match wins
GPU_PEAKS = (("H100 PCIe", (51.2, 378.0, 756.0)), ("H100 NVL", (60.0, 417.5, 835.5)), ("H100", (66.9, 494.7, 989.4)),
             ("H200 NVL", (60.0, 417.5, 835.5)), ("H200", (66.9, 494.7, 989.4)), ("A100", (19.5, 156.0, 312.0)),
             ("V100", (15.7, None, None)), ("L40S", (91.6, 183.0, 362.0)), ("L4", (30.3, 60.0, 121.0)),
             ("A10", (31.2, 62.5, 125.0)), ("RTX 4090", (82.6, 82.6, 165.2)))


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")
PARTS = ("train", "inference", "matcher", "memory", "small")


def gpu_peak_tflops(name: str, amp: str | None) -> tuple[float | None, str]:
    """Datasheet peak for the precision the convolutions run in: bf16 under autocast, else tf32 when cuDNN
    may use it (PyTorch's default), else fp32."""
    precision = "bf16" if amp == "bf16" else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
    for key, peaks in GPU_PEAKS:
        if key in name:
            value = peaks[("fp32", "tf32", "bf16").index(precision)]
            return (value, precision) if value is not None else (peaks[0], "fp32")
    return None, precision


def loss_cross_check(model_hf: torch.nn.Module, size: int, device: torch.device) -> dict:
    """Both criteria on the same random predictions (6 layers) and targets: the total losses must agree."""
    gen = torch.Generator().manual_seed(1)
    layers = [{"pred_logits": torch.randn(2, 100, 151, generator=gen).to(device),
               "pred_masks": (3 * torch.randn(2, 100, size // 4, size // 4, generator=gen)).to(device)}
              for _ in range(6)]
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    _, targets = make_batch(2, size, 150, 1, device)
    criterion = fast.build_criterion("hungarian", 150, 100, dec_layers=6).to(device)
    ours = float(total_loss(criterion(outputs, targets), criterion.weight_dict))
    theirs = bench_hf.criterion_loss(model_hf, outputs, [t["masks"] for t in targets], [t["labels"] for t in targets])
    return {"mfcore": ours, "transformers": theirs, "relative_difference": abs(ours - theirs) / abs(theirs)}


def same_assignment(fns: dict[str, Callable[[], list]]) -> bool:
    """Do both matchers pick the same (prediction, segment) pairs in every image?"""
    pairs = {name: [sorted(zip(i.tolist(), j.tolist())) for i, j in fn()] for name, fn in fns.items()}
    return pairs["mfcore"] == pairs["transformers"]


def operators(eager: dict[str, torch.nn.Module], images: torch.Tensor) -> dict[str, int]:
    """ATen operators (views excluded) of one eager eval forward per side: on a GPU, a lower bound on its
    kernel launches, which bound a batch-1 prediction there. Post-processing is left out: on CPU mfcore's
    labels run in tiles of rows, where a GPU takes one."""
    counts = {}
    for impl, model in eager.items():
        x = images if impl == "mfcore" else normalized(images)
        with torch.inference_mode():
            model.eval()(x)  # the steady state: mfcore's first call after training refolds its frozen BNs
            counts[impl] = count_operators(lambda: model(x))
    return counts


def _contenders(impls: list[str], device: torch.device, compile_mode: str | None) -> tuple[dict, dict]:
    """(eager models, models to time): with a compile_mode the timed mfcore model is torch.compile'd in
    that mode ("reduce-overhead" adds CUDA graphs on GPU); FLOPs are always counted on the eager one."""
    eager = {impl: build_contender(impl, device) for impl in impls}
    timed = dict(eager, mfcore=torch.compile(eager["mfcore"], mode=compile_mode)) if compile_mode else dict(eager)
    return eager, timed


def small_cases(device: torch.device, sizes: dict, reps: int, warmup: int, compile_mode: str | None,
                log: Callable[[str], None]) -> list[dict]:
    """Training img/s of each small model of the tables (SMALL_MODELS), eager, and compiled with a compile_mode."""
    size, batch = sizes["small"]
    if device.type == "cpu":
        keep_freed_memory()  # as `mfcore train` does on CPU
    cases = []
    for model in SMALL_MODELS:
        for compiled in (False, True) if compile_mode else (False,):
            name = f"small_train[{model}{', compiled' if compiled else ''}]"
            log(f"{name}: {size}x{size}, batch {batch}")
            step = small_step(model, size, batch, device, compiled)
            cases.append(case(name, f"{model} as the quick profile trains it (K={get_profile('quick').base_classes}), "
                              f"{size}x{size}, batch {batch}, optimiser steps",
                              alternate({"mfcore": step}, reps, warmup, device), per_call=batch, unit="img/s"))
    return cases


def cpu_suite(device: torch.device, sizes: dict, reps: int, warmup: int, with_hf: bool, threads: int,
              parts: frozenset[str], compile_mode: str | None, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    impls = ["mfcore", "transformers"] if with_hf else ["mfcore"]
    eager, models = _contenders(impls, device, compile_mode)  # also for --only matcher/small: a few seconds
    cases, checks = [], {}
    if with_hf and "train" in parts:
        checks["loss_on_same_predictions"] = loss_cross_check(models["transformers"], sizes["train"][0], device)

    if "train" in parts:
        size, batch = sizes["train"]
        log(f"train_step: R50 {size}x{size}, batch {batch}")
        images, targets = make_batch(batch, size, 150, 0, device)
        fns = {impl: train_step(impl, models[impl], images, targets) for impl in impls}
        flops = count_flops(train_step("mfcore", eager["mfcore"], images, targets))
        cases.append(case("train_step", f"forward + loss (18 terms) + backward, R50, {size}x{size}, batch {batch}",
                          alternate(fns, reps, warmup, device), flops=flops))

    if "inference" in parts:
        size, batch = sizes["infer"]
        log(f"inference: R50 {size}x{size}, batch {batch}")
        images = make_batch(batch, size, 150, 0, device)[0]
        fns = {impl: inference(impl, models[impl], images) for impl in impls}
        flops = 2 * batch * count_macs(build_model(R50).to(device), (size, size))  # the paper's count, 2 per MAC
        checks["operators_per_forward"] = operators(eager, images)
        cases.append(case("inference", f"eval forward + semantic inference -> labels, R50, {size}x{size}, "
                          f"batch {batch}", alternate(fns, reps, warmup, device), flops=flops))
    del eager, models

    if "matcher" in parts:
        log("matcher")
        outputs, targets = matcher_inputs(sizes["match"], device)
        fns = matchers(outputs, targets, with_hf)
        if with_hf:
            checks["matcher_same_assignment"] = same_assignment(fns)
        cases.append(case("matcher", f"Hungarian matching, B=2, N=100, K=150, {sizes['match']}x{sizes['match']} "
                          "predictions, 8 segments/image", alternate(fns, 10 * reps, warmup, device)))

    if "memory" in parts:
        size, batch = sizes["train"]
        log("train_memory: one fresh process per side")
        results = {impl: measure_memory(impl, device, size, batch, threads) for impl in impls}
        cases.append(memory_case("train_memory", f"peak RSS over 2 train steps minus RSS before them ({size}x{size}, "
                                 f"batch {batch}), fresh process per side", results))

    if "small" in parts:
        cases += small_cases(device, sizes, reps, warmup, compile_mode, log)
    return cases, checks


def gpu_suite(device: torch.device, sizes: dict, reps: int, warmup: int, with_hf: bool, threads: int,
              parts: frozenset[str], compile_mode: str | None, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    torch.backends.cudnn.benchmark = True  # both sides: let cuDNN pick its fastest kernels for fixed shapes
    impls = ["mfcore", "transformers"] if with_hf else ["mfcore"]
    eager, models = _contenders(impls, device, compile_mode)
    name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else "cpu"
    cases, checks = [], {}

    def add(row: dict, amp: str | None) -> None:
        peak, precision = gpu_peak_tflops(name, amp)
        if peak is not None and "achieved_tflops" in row["mfcore"]:
            row["mfcore"].update(peak_tflops=peak, peak_precision=precision,
                                 fraction_of_peak=row["mfcore"]["achieved_tflops"] / peak)
        cases.append(row)

    size, batch = sizes["gpu_train"]
    images, targets = make_batch(batch, size, 150, 0, device)
    for amp in (None, "bf16") if "train" in parts else ():
        log(f"train {amp or 'fp32'}: R50 {size}x{size}, batch {batch}")
        fns = {impl: train_step(impl, models[impl], images, targets, amp) for impl in impls}
        flops = count_flops(train_step("mfcore", eager["mfcore"], images, targets, amp))
        add(case(f"train_{amp or 'fp32'}", f"training img/s, {amp or 'fp32'}, R50, {size}x{size}, batch {batch}",
                 alternate(fns, reps, warmup, device), per_call=batch, unit="img/s", flops=flops,
                 targets=GPU_TARGETS), amp)
    inference_runs = ((1, None), (sizes["gpu_infer"][1], None), (sizes["gpu_infer"][1], "bf16"))
    for batch, amp in inference_runs if "inference" in parts else ():
        size = sizes["gpu_infer"][0]
        log(f"inference {amp or 'fp32'}: R50 {size}x{size}, batch {batch}")
        images = make_batch(batch, size, 150, 0, device)[0]
        fns = {impl: inference(impl, models[impl], images, amp) for impl in impls}
        flops = 2 * batch * count_macs(build_model(R50).to(device), (size, size))
        if batch == 1:
            checks["operators_per_forward"] = operators(eager, images)
        row = case(f"inference_{amp or 'fp32'}_b{batch}", f"inference img/s, {amp or 'fp32'}, R50, {size}x{size}, "
                   f"batch {batch}", alternate(fns, reps, warmup, device), per_call=batch, unit="img/s", flops=flops)
        if batch == 1 and amp is None:  # the paper's setting (fp32, one image), against 3x its V100 fps
            row["target_img_s"], row["met"] = GPU_FPS_TARGET, row["mfcore"]["value"] >= GPU_FPS_TARGET
        add(row, amp)
    del eager, models

    if "matcher" in parts:
        outputs, targets = matcher_inputs(sizes["match"], device)
        fns = matchers(outputs, targets, with_hf)
        if with_hf:
            checks["matcher_same_assignment"] = same_assignment(fns)
        cases.append(case("matcher", f"Hungarian matching, B=2, N=100, K=150, {sizes['match']}x{sizes['match']}",
                          alternate(fns, 10 * reps, warmup, device), targets=GPU_TARGETS))
    if "memory" in parts:
        size, batch = sizes["gpu_train"]
        results = {impl: measure_memory(impl, device, size, batch, threads) for impl in impls}
        cases.append(memory_case("train_memory", f"torch.cuda.max_memory_allocated over 2 fp32 train steps minus "
                                 f"memory_allocated before ({size}x{size}, batch {batch})", results, GPU_TARGETS))
    if "small" in parts:
        cases += small_cases(device, sizes, reps, warmup, compile_mode, log)
    return cases, checks


def main(device: str = "cpu", threads: int | None = None, reps: int | None = None, warmup: int = 1,
         quick: bool = False, out_dir: str = "results/benchmarks", compare: bool = True, memory: bool = True,
         compile_mode: str | None = None, only: Sequence[str] | None = None,
         log: Callable[[str], None] = print) -> dict:
    """Run the suite for `device`, print the table, write
    <out_dir>/<device or cpu-<family>>[-quick][-compiled[-MODE]][-only-PARTS].{json,md}; returns the result dict.
    compare=False (or transformers not installed) times mfcore alone; memory=False skips the memory case;
    compile_mode ("default", "reduce-overhead", "max-autotune") times torch.compile(mfcore model, mode=...)
    (transformers stays eager; warm-up includes compiling); `only` runs a subset of PARTS (e.g. a short GPU
    lease: only=["inference"])."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r}: expected one of {COMPILE_MODES}")
    unknown = sorted(set(only or ()) - set(PARTS))
    if unknown or (only is not None and not only):
        raise ValueError(f"only={list(only)!r}: expected one or more of {PARTS}")
    parts = frozenset(only or PARTS) - (set() if memory else {"memory"})
    dev = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}: expected >= 1")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    reps = reps if reps is not None else (1 if quick else 9 if dev.type == "cpu" else 20)
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps={reps}, warmup={warmup}: expected reps >= 1 and warmup >= 0")
    with_hf = compare and bench_hf.available()
    if compare and not with_hf:
        log("transformers is not installed: timing mfcore alone (pip install -e '.[bench]' to compare)")
    env = environment(dev, threads)
    suite = cpu_suite if dev.type == "cpu" else gpu_suite
    cases, checks = suite(dev, SIZES["quick" if quick else "full"], reps, warmup, with_hf, threads, parts,
                          compile_mode, log)
    if not cases:
        raise ValueError(f"only={sorted(parts)}: the {dev.type} suite has none of these")
    env["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {"environment": env, "quick": quick, "compiled": compile_mode, "reps": reps, "warmup": warmup,
              "only": [p for p in PARTS if p in parts] if only else None, "cases": cases, "checks": checks}
    compiled = "" if not compile_mode else "-compiled" + ("" if compile_mode == "default" else "-" + compile_mode)
    subset = "-only-" + "-".join(result["only"]) if only else ""
    # one file per CPU family (cpu-amd-epyc, cpu-intel-xeon): kernels and ratios differ between them
    family = f"cpu-{cpu_family_tag()}" if dev.type == "cpu" else dev.type
    stem = family + ("-quick" if quick else "") + compiled + subset
    json_path, md_path = write_results(result, out_dir, stem)
    print_table(cases)
    log(f"wrote {json_path} and {md_path}")
    return result
