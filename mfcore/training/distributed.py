"""Multi-process helpers for runs launched with `torchrun` (nothing home-made for launching).

`torchrun --nproc_per_node P -m mfcore train ...` starts P processes and sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them and joins the process group
(gloo on CPU, NCCL on GPU). Without those variables everything here degrades to a single process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"environment variable WORLD_SIZE={value!r}: expected a positive integer")
    return int(value)


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group when WORLD_SIZE > 1 and return this process's device.

    On CUDA each process takes GPU LOCAL_RANK; the backend is NCCL there and gloo on CPU.
    Calling it again in an initialised process is a no-op.
    """
    if env_world_size() == 1 or is_initialized():
        if device.type == "cuda" and is_initialized():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {missing} are not set: launch with torchrun "
                         f"(torchrun --nproc_per_node N -m mfcore train ...)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over processes (a copy; the input is unchanged)."""
    value = value.detach().clone()
    if is_initialized():
        dist.all_reduce(value)
        value /= get_world_size()
    return value


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


__all__ = ["env_world_size", "init_distributed", "is_initialized", "get_rank", "get_world_size", "is_main_process",
           "barrier", "all_reduce_mean", "cleanup"]
