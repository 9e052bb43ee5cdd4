"""Training: one flat loop, in the spirit of torchvision's references/segmentation/train.py.

    python -m mfcore train --preset synthetic-maskformer-tiny --output runs/x          # one process
    torchrun --nproc_per_node 2 -m mfcore train --preset ... --output runs/x           # DDP (gloo / NCCL)
    python -m mfcore train --preset ... --output runs/x --resume                       # continue a run

Per optimiser step: `grad_accum` micro-batches (forward, loss, backward), then whole-model gradient
clipping, AdamW, and the poly (or step) schedule. The output folder receives `metrics.jsonl` (one JSON
object per log / eval event), `last.pt` (written atomically every `checkpoint_period` steps, at the end,
and when SIGTERM / Ctrl-C arrives) and `eval_val.json` (per-class tables of the final evaluation).

Resuming restores the model, optimiser, schedule, AMP scaler, RNG states and the position in the data
order, so on the CPU a resumed run ends with bit-identical weights to an uninterrupted one (under DDP,
processes other than rank 0 reseed their dropout RNG instead of restoring it); the run folder's log and
resume rules are mfcore.training.run_folder's.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mfcore import fast
from mfcore.config import TrainConfig, override
from mfcore.data.catalog import SYNTHETIC, dataset_name
from mfcore.data.transforms import build_detr_transform, build_train_transform, collate
from mfcore.files import write_json
from mfcore.losses import total_loss
from mfcore.modeling.models import build_model
from mfcore.presets import adapt_to_data, get_preset
from mfcore.training import distributed as du
from mfcore.training.checkpoint import capture_rng_state, config_dict, save_checkpoint
from mfcore.training.evaluate import evaluate_model
from mfcore.training.run_folder import (
    StopRequest,
    append_metric,
    read_metrics,
    restore_run,
    resume_decision,
    truncate_metrics,
)
from mfcore.training.runtime import (
    ResumableBatchSampler,
    RunLock,
    SeededSamples,
    build_run_dataset,
    default_synthetic_root,
    ignore_stop_signals,
    keep_freed_memory,
    resolve_device,
    seed_everything,
    set_tf32,
)
from mfcore.training.solver import build_scheduler, clip_gradients

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def _batches(loader: DataLoader) -> Iterator[Any]:
    """iter(loader) whose worker processes are shut down when the block ends, also by an exception (whose
    traceback would otherwise keep the iterator, and its workers, alive until the interpreter exits)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def train_transform(cfg: TrainConfig) -> Callable:
    """The training augmentation of `cfg`: DETR's (augmentation="detr", COCO panoptic) or the semantic recipe
    (hue jitter off for the synthetic scenes, whose classes differ by hue)."""
    if cfg.augmentation == "detr":
        return build_detr_transform(cfg.short_sides, cfg.max_size)
    return build_train_transform(cfg.crop_size, cfg.short_sides, cfg.max_size, ignore_label=cfg.ignore_label,
                                 hue_delta=0 if cfg.dataset in SYNTHETIC else 18)


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def _nonfinite_outputs(outputs: Any, prefix: str = "") -> list[str]:
    """Names of the model outputs (nested dicts / lists of tensors) holding NaN or inf."""
    if isinstance(outputs, torch.Tensor):
        return [prefix or "output"] if outputs.is_floating_point() and not torch.isfinite(outputs).all() else []
    if isinstance(outputs, dict):
        return [n for k, v in outputs.items() for n in _nonfinite_outputs(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(outputs, (list, tuple)):
        return [n for i, v in enumerate(outputs) for n in _nonfinite_outputs(v, f"{prefix}[{i}]")]
    return []


def _zero_loss(outputs: Any) -> torch.Tensor:
    """0 x every output: a loss whose backward reaches every parameter (DDP's gradient all-reduce stays in step)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().sum() * 0.0 if outputs.is_floating_point() else torch.zeros(())
    items = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (list, tuple)) else ()
    return sum((_zero_loss(v) for v in items), torch.zeros(()))


def _show(progress: str, line: str, final: bool = False) -> None:
    if progress == "off":
        return
    if progress == "auto" and sys.stderr.isatty():  # one line updated in place
        print("\r" + line.ljust(100), end="\n" if final else "", file=sys.stderr, flush=True)
    elif final or progress in ("log", "auto"):
        print(line, flush=True)


def train(preset: str, output_dir: str | Path, data_root: str | Path | None = None, *,
          train_overrides: dict[str, Any] | None = None, model_overrides: dict[str, Any] | None = None,
          loss_overrides: dict[str, Any] | None = None, resume: bool | str = False, progress: str = "auto",
          device: str = "auto", stop_at: int | None = None, on_log: Callable[[list[dict]], None] | None = None,
          compile_options: dict[str, Any] | None = None) -> dict:
    """Train `preset` (see mfcore.presets) into `output_dir`.

    train_overrides / model_overrides / loss_overrides: TrainConfig / ModelConfig / LossConfig fields to change,
        e.g. {"iters": 20}.
    resume: continue the run saved in output_dir/last.pt (its config must match, except RUN_LEVEL fields);
        "auto": continue it if output_dir/last.pt exists, else start (a requeued cluster job runs one command).
    progress: "auto" (in-place line on a terminal, else log lines), "log" (one line per log_period), "off".
    stop_at: stop once this many iterations are done, as an interruption would (checkpoint, then return);
        0 saves the untrained model.
    compile_options: train through torch.compile(model, **compile_options), e.g. {} or {"mode": "max-autotune"}
        (None: eager); evaluation and the saved weights are the eager model's.
    Returns {"status": "finished" | "stopped" | "interrupted", "iteration", "checkpoint", "eval", "config"}.
    The run folder is locked (OUTPUT/.lock) while the run lasts: a second run on it is refused.
    """
    if progress not in ("auto", "log", "off"):
        raise ValueError(f"progress={progress!r}: expected 'auto', 'log' or 'off'")
    if not isinstance(resume, bool) and resume != "auto":
        raise ValueError(f"resume={resume!r}: expected True, False or 'auto'")
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 0):
        raise ValueError(f"stop_at={stop_at!r}: expected an integer >= 0 (0 saves the untrained model)")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output {output_dir} is a file, not a run folder")
    base = get_preset(preset)  # bad values are refused before the run folder is created or locked
    dataset_name(override(base.train, **(train_overrides or {})).dataset)
    override(base.model, **(model_overrides or {}))
    override(base.loss, **(loss_overrides or {}))
    device = du.init_distributed(resolve_device(device))
    with RunLock(output_dir) if du.is_main_process() else nullcontext():
        return _train(preset, output_dir, data_root, train_overrides, model_overrides, loss_overrides, resume,
                      progress, device, stop_at, on_log, compile_options)


def _train(preset: str, output_dir: Path, data_root: str | Path | None, train_overrides: dict[str, Any] | None,
           model_overrides: dict[str, Any] | None, loss_overrides: dict[str, Any] | None, resume: bool | str,
           progress: str, device: torch.device, stop_at: int | None,
           on_log: Callable[[list[dict]], None] | None, compile_options: dict[str, Any] | None) -> dict:
    ckpt_path = output_dir / "last.pt"
    rank, world, main = du.get_rank(), du.get_world_size(), du.is_main_process()
    base = get_preset(preset)
    cfg: TrainConfig = override(base.train, **(train_overrides or {}))
    cfg = override(cfg, dataset=dataset_name(cfg.dataset))  # one spelling (a former one is resolved)
    model_cfg = override(base.model, **(model_overrides or {}))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by {world} process(es) x "
                         f"grad_accum={cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    set_tf32(cfg.tf32, device)
    if device.type == "cpu":
        keep_freed_memory()
    auto = resume == "auto"
    resume = resume_decision(ckpt_path, resume)  # decided under the run lock; every process sees the same folder
    if auto and main:
        what = f"resuming {ckpt_path}" if resume else f"no {ckpt_path} yet, starting"
        _show(progress, f"--resume auto: {what}", final=True)

    transform = train_transform(cfg)
    for turn in (0, 1):  # rank 0 first: it may generate the default synthetic set
        if (rank == 0) == (turn == 0):
            train_set = build_run_dataset(cfg.dataset, data_root, "train", transform)
            val_set = build_run_dataset(cfg.dataset, data_root, "val")
        du.barrier()
    if train_set.ignore_label != cfg.ignore_label:  # crops and batches are padded with cfg.ignore_label
        raise ValueError(f"ignore_label={cfg.ignore_label} but the {cfg.dataset} data marks unlabelled pixels "
                         f"{train_set.ignore_label}: the padding would become a class; set ignore_label="
                         f"{train_set.ignore_label}")
    model_cfg = adapt_to_data(override(base, train=cfg), model_cfg, train_set.num_classes, model_overrides)
    loss_cfg = override(base.loss, **(loss_overrides or {}))
    run_config = config_dict(base.name, model_cfg, loss_cfg, cfg)

    seed_everything(cfg.seed)  # identical initial weights on every process
    # a resumed run takes every weight from its checkpoint: the pretrained backbone file is not read again
    model = fast.accelerate(build_model(override(model_cfg, pretrained=None) if resume else model_cfg).to(device))
    seed_everything(cfg.seed + rank)
    criterion = fast.build_criterion(loss_cfg.matcher, model_cfg.num_classes, model_cfg.num_queries,
                                cost_class=loss_cfg.cost_class, cost_mask=loss_cfg.cost_mask,
                                cost_dice=loss_cfg.cost_dice, eos_coef=loss_cfg.eos_coef,
                                num_points=loss_cfg.num_points, deep_supervision=loss_cfg.deep_supervision,
                                dec_layers=model_cfg.dec_layers, ignore_index=train_set.ignore_label).to(device)
    optimizer = fast.build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start, last_saved = 0, None
    # the data a run was trained on is part of it: resuming on another root of the same K is refused
    data_source = str(Path(data_root if data_root is not None else default_synthetic_root()).resolve())
    if resume:
        start = last_saved = restore_run(ckpt_path, run_config, data_source, model, optimizer, scheduler, scaler,
                                         cfg.seed, rank)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else None
    net = ddp or model
    if compile_options is not None:  # the training forward only; DDP wrapped first, as torch's DDP notes advise
        net = torch.compile(net, **compile_options)

    sampler = ResumableBatchSampler(len(train_set), micro, cfg.seed, rank, world, start=start * cfg.grad_accum)
    # the loader gets its own generator so that creating it never draws from the global (dropout) RNG
    loader = DataLoader(SeededSamples(train_set), batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=partial(collate, ignore_label=cfg.ignore_label), pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals if cfg.num_workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    metrics_path = output_dir / "metrics.jsonl"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            truncate_metrics(metrics_path, start)
        else:
            metrics_path.unlink(missing_ok=True)

    def save(iteration: int) -> None:
        if main:
            bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:  # never replace a good checkpoint by a diverged model
                raise FloatingPointError(f"not saving {ckpt_path} at iteration {iteration}: {len(bad)} weight "
                                         f"tensor(s) hold NaN/inf (first: {bad[0]})")
            batches = iteration * cfg.grad_accum
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "iteration": iteration,
                "rng": capture_rng_state(), "sampler": {"micro_batches": batches, **sampler.position(batches)},
                "config": run_config, "data_root": data_source,
                # what `mfcore predict` names and splits into things/stuff on images without a dataset
                "classes": {"names": list(train_set.class_names), "thing_ids": list(train_set.thing_ids)}})
        du.barrier()

    def run_eval(iteration: int) -> dict:
        result = evaluate_model(model, val_set, cfg, device)
        if main:
            summary = {k: v for k, v in result["semantic"].items() if k != "per_class"}
            if "panoptic" in result:
                summary.update({f"panoptic_{k}": v for k, v in result["panoptic"].items() if k != "per_class"})
            append_metric(metrics_path, {"type": "eval", "iter": iteration, **summary})
            _show(progress, f"eval at iter {iteration}: mIoU {summary['mIoU']:.2f}  PQ^St {summary['PQ_St']:.2f}",
                  final=True)
        return result

    amp = dict(device_type=device.type, dtype=AMP_DTYPES.get(cfg.amp, torch.float32), enabled=cfg.amp != "off")
    it, status, window = start, "finished", []
    tic = time.perf_counter()
    with _batches(loader) as data_iter, StopRequest() as stop:
        while it < cfg.iters:
            if stop_at is not None and it >= stop_at:  # stop_at=0 saves the untrained model
                status = "stopped"
                break
            net.train()
            nonfinite, data_time, terms = [], 0.0, {}
            for m in range(cfg.grad_accum):
                t0 = time.perf_counter()
                images, targets = next(data_iter)
                data_time += time.perf_counter() - t0
                images, targets = images.to(device, non_blocking=True), _targets_to(targets, device)
                # gradients are all-reduced only on the last micro-batch of the step
                sync = ddp.no_sync() if ddp is not None and m < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    with torch.autocast(**amp):
                        outputs = net(images)
                    bad_outputs = _nonfinite_outputs(outputs)
                    if bad_outputs:  # checked before the matcher, which cannot match NaN costs
                        nonfinite.append(f"model outputs {', '.join(bad_outputs[:4])} hold NaN/inf")
                        losses, loss = {}, _zero_loss(outputs)
                    else:
                        losses = criterion(outputs, targets)
                        loss = total_loss(losses, criterion.weight_dict)
                    scaler.scale(loss / cfg.grad_accum).backward()
                if bad_outputs:
                    continue
                if not torch.isfinite(loss):
                    nonfinite.append({k: v.item() for k, v in losses.items() if not torch.isfinite(v)} or loss.item())
                for k in ("loss_ce", "loss_mask", "loss_dice"):
                    if k in losses:
                        terms[k] = terms.get(k, 0.0) + losses[k].item() / cfg.grad_accum
                terms["loss"] = terms.get("loss", 0.0) + loss.item() / cfg.grad_accum
            flags = torch.tensor([float(bool(nonfinite)), float(stop.signum is not None)], device=device)
            if du.is_initialized():
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if flags[0]:
                kept = f"the last good checkpoint {ckpt_path} (iteration {last_saved}) is kept" if last_saved is not \
                    None else "no checkpoint had been written yet"
                raise FloatingPointError(f"non-finite loss at iteration {it + 1} ({nonfinite or 'on another process'}); "
                                         f"training stopped and {kept}. Lower the learning rate, enable gradient "
                                         f"clipping or check the data, then resume.")
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (head group)
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(model, cfg.clip_grad_norm)
            if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's scaler skips such steps itself
                kept = f"the last good checkpoint {ckpt_path} (iteration {last_saved}) is kept" if last_saved is not \
                    None else "no checkpoint had been written yet"
                raise FloatingPointError(f"non-finite gradient norm at iteration {it + 1} (the loss was finite); "
                                         f"training stopped before the update and {kept}. Lower the learning rate "
                                         f"or check the data, then resume.")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            it += 1
            window.append({**terms, "grad_norm": float(grad_norm), "data_sec": data_time})
            if it % cfg.log_period == 0 or it == cfg.iters:  # rank 0's averages over the last log_period steps
                toc = time.perf_counter()
                record = {"type": "train", "iter": it, **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                          "lr": lr, "sec_per_iter": (toc - tic) / len(window)}
                record["eta_sec"] = record["sec_per_iter"] * (cfg.iters - it)
                if device.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                if main:
                    append_metric(metrics_path, record)
                    if on_log is not None:  # e.g. a notebook's live loss plot
                        on_log(read_metrics(metrics_path))
                    _show(progress, f"iter {it}/{cfg.iters}  loss {record['loss']:.4f}  lr {lr:.2e}  "
                                    f"{record['sec_per_iter']:.2f}s/it  eta {record['eta_sec'] / 60:.1f} min")
                window, tic = [], toc
            if cfg.eval_period and it % cfg.eval_period == 0 and it < cfg.iters:
                run_eval(it)
            interrupted = bool(flags[1])
            if it % cfg.checkpoint_period == 0 or it == cfg.iters or interrupted:
                save(it)
                last_saved = it
            if interrupted:
                status = "interrupted"
                break
    result = None
    if status == "finished":
        result = run_eval(it)
        if result["semantic"]["mIoU"] != result["semantic"]["mIoU"]:  # NaN: not one labelled val pixel
            raise ValueError(f"the val split of {cfg.dataset} has no labelled pixels (all ignore): its mIoU is "
                             f"undefined; the trained model is saved in {ckpt_path}")
        if main:
            write_json(output_dir / "eval_val.json", {"iteration": it, "metrics": result, "config": run_config})
    else:
        if last_saved != it:
            save(it)
        _show(progress, f"{status} at iteration {it}; continue with --resume ({ckpt_path})", final=True)
    return {"status": status, "iteration": it, "checkpoint": str(ckpt_path), "eval": result, "config": run_config,
            "signal": stop.signum}


__all__ = ["train", "train_transform"]
