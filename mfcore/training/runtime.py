"""Run plumbing shared by training and evaluation: devices, seeding, datasets by preset name, and a
deterministic, resumable data order.

Exact resumption needs two things from the data side:
  * the order of samples is a pure function of (seed, epoch), and where a run stands in it is a pure
    function of how many micro-batches it has consumed (`ResumableBatchSampler`);
  * the random augmentation of a sample is a pure function of its place in that order, whatever
    worker process loads it (`SeededSamples` seeds the RNGs per sample and restores them afterwards).
Then a run resumed at iteration t sees exactly the batches an uninterrupted run sees after step t.
"""
from __future__ import annotations

import ctypes
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mfcore.data.catalog import SYNTHETIC, dataset_name
from mfcore.files import default_cache_dir


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available on this machine; use --device cpu")
    return device


def set_tf32(enabled: bool, device: torch.device) -> bool:
    """TensorFloat-32 for fp32 matmuls and convolutions (inputs rounded to a 10-bit mantissa, fp32 accumulation,
    on tensor cores) when `device` is a CUDA GPU of compute capability >= 8.0 (Ampere and later); anywhere else
    nothing changes. `enabled=False` there means strict fp32. Returns whether TF32 is now on for `device`."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed blocks below 32 MB in the process instead of returning them to the
    system (mallopt M_MMAP_THRESHOLD = 32 MB, M_TRIM_THRESHOLD = 1 GB; the same as the environment variables
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_). Why: a CPU training step allocates and frees the same
    large activations every step (PerPixelBaseline+'s [B*H*W, K] logits: 16 MB per layer at K = 64); above
    glibc's default threshold each one is a fresh mapping, so every step pays page faults and the kernel's
    zeroing of those pages again. Numbers are unchanged; the process keeps up to its peak memory. Returns
    whether the settings took (False off glibc, e.g. macOS or musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_synthetic_root() -> Path:
    """The default synthetic set (`mfcore train` on a synthetic preset without --data-root)."""
    return default_cache_dir() / "synthetic"


def build_run_dataset(name: str, data_root: str | Path | None, split: str, transform: Any = None) -> Any:
    """Dataset of a preset's `TrainConfig.dataset` name. For the synthetic datasets a missing
    `data_root` means the default generated set (created on first use)."""
    from mfcore.data.datasets import build_dataset

    name = dataset_name(name)
    if data_root is None:
        if name not in SYNTHETIC:
            raise ValueError(f"dataset {name!r} needs --data-root (the folder holding its files; see data/README.md)")
        from mfcore.data import ensure_synthetic
        from mfcore.presets import SMALL_DATASETS

        # the small presets' K, and the sizes data/README.md documents for the default set
        data_root = ensure_synthetic(default_synthetic_root(), num_classes=SMALL_DATASETS["synthetic"][0],
                                     num_train=2000, num_val=300)
    return build_dataset(name, Path(data_root), split, transform)


def checkpoint_dataset(checkpoint: str | Path, model_cfg: Any, train_cfg: Any, data_root: str | Path | None,
                       split: str) -> Any:
    """The `split` of the dataset a checkpoint was trained on, checked to have the classes it predicts."""
    dataset = build_run_dataset(train_cfg.dataset, data_root, split)
    if dataset.num_classes != model_cfg.num_classes:
        raise ValueError(f"{checkpoint} predicts {model_cfg.num_classes} classes but the {split} split of "
                         f"{train_cfg.dataset} has {dataset.num_classes}")
    return dataset


@contextmanager
def forked_rng(seed: int) -> Iterator[None]:
    """Run a block with the CPU RNGs of torch, numpy and Python seeded by `seed`, then restore their previous
    states (so loading data in the main process never disturbs the model's dropout RNG). CUDA's RNG is left
    alone: data transforms run on the CPU, and seeding CUDA before it is initialised records the call with a
    formatted stack trace, which per sample cost a third of the loader's time."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class RunLock:
    """Exclusive use of a run folder by one process: `OUTPUT/.lock` holds "PID HOST", locked with flock.

    A second process gets a RuntimeError naming the holder. The lock dies with its process (flock), so a
    lock file left by a killed run is taken over, never blocking. Use as a context manager."""

    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            text = self.path.read_text().split()
        except OSError:
            return "another process"
        return f"process {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "") if text else "another process"

    def acquire(self) -> RunLock:
        import fcntl
        import socket

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot create run folder {self.path.parent}: {err.strerror or err}") from err
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OSError(err.errno, f"cannot create lock file {self.path}: {err.strerror or err}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RuntimeError(f"run folder {self.path.parent} is in use by {self._holder()} (lock file "
                                   f"{self.path}); wait for that run to end or choose another --output") from None
            try:  # the holder may have removed the file between our open and flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)
        raise RuntimeError(f"could not lock run folder {self.path.parent} (lock file {self.path} keeps changing)")

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT / SIGTERM, so that Ctrl-C or a scheduler's signal
    to the whole process group leaves the decision to the main process (which finishes the step, saves a
    checkpoint and shuts the workers down); a worker whose parent dies still exits (DataLoader's watchdog)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SeededSamples(Dataset):
    """Wraps a dataset: item (index, seed) -> dataset[index] computed under RNGs seeded with `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with forked_rng(seed):
            return self.dataset[index]


class ResumableBatchSampler:
    """Endless micro-batches of (index, sample seed) for one process, starting after `start` micro-batches.

    Epoch e visits a permutation of all indices drawn from (seed, e), wrapped to a multiple of
    world_size; process r takes positions r, r + world_size, ... and cuts them into micro-batches of
    `batch_size` (an incomplete last one is dropped). Every process thus sees the same number of
    batches per epoch, and batch b of the run is fully determined by (seed, b).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, shuffle: bool = True):
        per_rank = -(-num_samples // world_size)
        if num_samples < 1 or per_rank < batch_size:
            raise ValueError(f"dataset of {num_samples} images is too small for {world_size} process(es) x "
                             f"micro-batch {batch_size}; lower the batch size or add images")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start, self.shuffle = rank, world_size, start, shuffle
        self.batches_per_epoch = per_rank // batch_size

    def position(self, batches_done: int) -> dict[str, int]:
        """{"epoch", "batch"} after `batches_done` micro-batches (stored in checkpoints for reference)."""
        return {"epoch": batches_done // self.batches_per_epoch, "batch": batches_done % self.batches_per_epoch}

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Indices process `rank` visits in `epoch`, [batches_per_epoch * batch_size]."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        total = -(-self.num_samples // self.world_size) * self.world_size
        order = order.repeat(-(-total // self.num_samples))[:total]  # wrap so every process gets as many
        return order[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = self.start
        while True:
            epoch, within = divmod(batch, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            for b in range(within, self.batches_per_epoch):
                chunk = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
                base = (epoch * self.batches_per_epoch + b) * self.batch_size * self.world_size
                # seeds unique per (epoch, position, process), independent of the worker that loads it
                yield [(index, self.seed * 1_000_003 + base + self.rank * self.batch_size + j)
                       for j, index in enumerate(chunk)]
                batch += 1


__all__ = ["resolve_device", "set_tf32", "seed_everything", "default_synthetic_root", "checkpoint_dataset",
           "build_run_dataset", "forked_rng", "RunLock", "ignore_stop_signals", "SeededSamples", "ResumableBatchSampler"]
