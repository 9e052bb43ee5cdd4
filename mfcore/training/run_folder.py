"""A run folder: its metrics log, and how a run continues from the checkpoint it holds.

    OUTPUT/metrics.jsonl   one JSON object per log / eval event ("iter" on every one)
    OUTPUT/last.pt         model, optimiser, schedule, AMP scaler, RNG states, data position, config
    OUTPUT/.lock           held while a run trains in it (mfcore.training.runtime.RunLock)

A run stopped by a signal (`StopRequest`) or killed outright continues from `last.pt`: the records it
logged after that checkpoint are dropped (`truncate_metrics`) and written again by the resumed run, and
a checkpoint of another config or data root is refused (`restore_run`).
"""
from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from mfcore.files import json_safe, write_text
from mfcore.training.checkpoint import config_differences, load_checkpoint, load_model_state, restore_rng_state
from mfcore.training.runtime import seed_everything

# fields that do not change the result: a run may be resumed with other values (TrainConfig's, and
# ModelConfig.grad_checkpointing: switched on after an out-of-memory, the same gradients); tf32 changes only
# the float rounding on a GPU, as moving the run to another GPU would
RUN_LEVEL = ("eval_period", "checkpoint_period", "log_period", "num_workers", "grad_checkpointing", "tf32")


class StopRequest:
    """While active, SIGINT (Ctrl-C) and SIGTERM only set `signum`; the loop then finishes its step,
    saves a checkpoint and returns. A second signal gets the previous behaviour (stop at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers only work in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a `metrics.jsonl`; a last line still being written is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop records a killed run wrote after its last checkpoint (the resumed run writes them again), and a
    last line it was still writing; the file is rewritten atomically. A damaged line elsewhere is an error."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
                raise ValueError("no integer 'iter'")
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            if number == len(lines):  # cut short when the run was killed: written again after resuming
                break
            raise ValueError(f"cannot resume: line {number} of {path} is not a metrics record ({err}); "
                             f"remove or repair that line") from None
        if record["iter"] <= iteration:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def append_metric(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
    except OSError as err:  # full or read-only disk
        raise OSError(err.errno, f"cannot append to {path}: {err.strerror or err}") from err


def resume_decision(ckpt_path: Path, resume: bool | str) -> bool:
    """Whether the run continues from `ckpt_path`: resume=True requires it, False refuses to overwrite it,
    "auto" continues it when it exists (a requeued cluster job runs one command)."""
    if resume == "auto":
        return ckpt_path.is_file()
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.exists():
        raise ValueError(f"{ckpt_path.parent} already holds a run (last.pt): pass --resume to continue it, or choose "
                         f"another --output")
    return bool(resume)


def restore_run(ckpt_path: Path, run_config: dict, data_source: str, model: torch.nn.Module, optimizer: Any,
                scheduler: Any, scaler: Any, seed: int, rank: int) -> int:
    """Load the run saved in `ckpt_path` into the training objects; returns the iteration it reached.

    The checkpoint's config must equal `run_config` but for RUN_LEVEL fields, and its data root `data_source`
    (the data a run was trained on is part of it). Rank 0 restores its RNG states (a resumed CPU run is
    bit-identical to an uninterrupted one); other ranks reseed theirs (their dropout streams are not saved).
    """
    ckpt = load_checkpoint(ckpt_path)
    diffs = config_differences(ckpt["config"], run_config, ignore=RUN_LEVEL)
    if ckpt.get("data_root", data_source) != data_source:
        diffs.append(f"--data-root: {ckpt['data_root']} != {data_source}")
    if diffs:
        raise ValueError(f"cannot resume {ckpt_path}: the run's config differs: " + "; ".join(diffs))
    load_model_state(model, ckpt["model"], str(ckpt_path))
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    start = ckpt["iteration"]
    if rank == 0:
        restore_rng_state(ckpt["rng"])
    else:
        seed_everything(seed + rank + 1000 * start)
    return start
