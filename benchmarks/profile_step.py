"""Where one training step of a small preset spends its time: torch.profiler over a few steps (batch 16, 64x64),
the operators by self CPU time and the step's phases (forward, matching, losses, backward, optimiser).

    python -m benchmarks.profile_step --preset synthetic-perpixelplus-tiny --threads 1 [--no-fast]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.fast_paths import train_step
from mfcore import fast

PHASES = ("forward", "criterion", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="synthetic-maskformer-tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--no-fast", action="store_true", help="the plain core")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = None if args.no_fast else tuple(fast.MODEL_PATHS) + tuple(fast.CRITERION_PATHS)
    step = train_step(args.preset, paths, batch=16, size=64, phases=True)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                step()
    events = prof.key_averages()
    total = sum(e.cpu_time_total for e in events if e.key == "step") / args.steps
    print(f"{args.preset}, {'plain' if args.no_fast else 'fast'}, {args.threads} thread(s): "
          f"{total / 1000:.1f} ms per step (profiled)")
    for phase in PHASES:
        spent = sum(e.cpu_time_total for e in events if e.key == phase) / args.steps
        print(f"  {phase:10s} {spent / 1000:7.1f} ms  {100 * spent / total:5.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
