"""Multi-process helpers for runs launched with `torchrun` or SLURM's `srun` (nothing home-made for launching).

`torchrun --nproc_per_node P -m mfcore train ...` starts P processes and sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT. `srun` (one task per GPU, without torchrun) sets SLURM_PROCID,
SLURM_LOCALID and SLURM_NTASKS instead; MASTER_ADDR and MASTER_PORT then come from the job script's
environment. `launch_env` reads either, `init_distributed` joins the process group (gloo on CPU, NCCL on
GPU). Without those variables everything here degrades to a single process.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

SLURM_HINT = ("in the sbatch script: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) "
              "MASTER_PORT=29500")


def _count(environ: Mapping[str, str], name: str, low: int) -> int:
    value = environ[name]
    if not value.strip().isdigit() or int(value) < low:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer >= {low}")
    return int(value)


def launch_env(environ: Mapping[str, str] | None = None) -> dict:
    """Who this process is: {"launcher": "torchrun" | "slurm" | None, "rank", "local_rank", "world_size"}.

    torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK) win when present (torchrun started by srun, one task
    per node). Otherwise a process started by `srun` (SLURM_STEP_ID set: a job step, not the batch script
    itself, which also carries SLURM_PROCID=0) takes SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS.
    Neither: one process, rank 0.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        world = _count(env, "WORLD_SIZE", 1)
        rank = _count(env, "RANK", 0) if "RANK" in env else 0
        local = _count(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in env else 0
        return {"launcher": "torchrun", "rank": rank, "local_rank": local, "world_size": world}
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world, rank = _count(env, "SLURM_NTASKS", 1), _count(env, "SLURM_PROCID", 0)
        local = _count(env, "SLURM_LOCALID", 0) if "SLURM_LOCALID" in env else 0
        if rank >= world:
            raise ValueError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}")
        return {"launcher": "slurm", "rank": rank, "local_rank": local, "world_size": world}
    return {"launcher": None, "rank": 0, "local_rank": 0, "world_size": 1}


def env_world_size() -> int:
    """The number of processes of this launch: WORLD_SIZE (torchrun), SLURM_NTASKS (srun), else 1."""
    return launch_env()["world_size"]


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group when the launch has more than one process and return this process's device.

    On CUDA each process takes GPU LOCAL_RANK (SLURM_LOCALID under srun); the backend is NCCL there and gloo
    on CPU. Under srun, RANK, LOCAL_RANK and WORLD_SIZE are set from the SLURM variables for torch's env://
    rendezvous. Calling it again in an initialised process is a no-op.
    """
    launch = launch_env()
    if launch["world_size"] == 1 or is_initialized():
        if device.type == "cuda" and is_initialized():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if launch["launcher"] == "slurm":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"launched by srun with SLURM_NTASKS={launch['world_size']} but {missing} are not set: "
                             + SLURM_HINT)
        os.environ.update(RANK=str(launch["rank"]), LOCAL_RANK=str(launch["local_rank"]),
                          WORLD_SIZE=str(launch["world_size"]))
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {missing} are not set: launch with torchrun "
                         f"(torchrun --nproc_per_node N -m mfcore train ...)")
    if device.type == "cuda":
        device = torch.device("cuda", launch["local_rank"])
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


__all__ = ["launch_env", "env_world_size", "init_distributed", "is_initialized", "get_rank", "get_world_size",
           "is_main_process", "barrier", "all_reduce_mean", "cleanup"]
