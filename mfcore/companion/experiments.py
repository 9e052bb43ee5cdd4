"""Experiment runs for the notebooks and tables: one cached training + evaluation per `RunSpec`.

A run lives in `<results_dir>/runs/<profile>/<name>/` and is finished when `final.json` (written
atomically, last) holds its spec. Finished runs are reused, never repeated; a run interrupted after a
checkpoint resumes from `last.pt`. Synthetic profiles generate their datasets and the pretrained
backbone on first use (cached under `<cache_dir>`); the paper profile reads the real datasets under
`data_root/<dataset>` and launches multi-GPU runs through `torchrun`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mfcore.companion.profiles import Profile
from mfcore.files import REPO, default_cache_dir, write_json
from mfcore.presets import SMALL_SCENE_SIZE, scene_sizes


@dataclass(frozen=True)
class RunSpec:
    name: str                       # folder name, unique within a profile
    preset: str                     # mfcore.presets name
    data_root: str | None           # dataset root handed to the readers
    train: dict = field(default_factory=dict)   # TrainConfig overrides
    model: dict = field(default_factory=dict)   # ModelConfig overrides

    def as_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class Context:
    """Where a notebook's runs go and how they are run (from the notebook's parameters cell)."""
    profile: Profile
    results_dir: Path = Path("results")
    cache_dir: Path = field(default_factory=default_cache_dir)  # generated datasets, pretrained backbones
    data_root: str | None = None    # paper profile: folder holding one sub-folder per dataset
    device: str = "auto"
    progress: str = "log"
    nproc_per_node: int = 1         # >1: each run is launched with torchrun (paper profile)
    check_data: bool = True         # False: paper_spec names the dataset folder without requiring it (planning)

    @property
    def runs_dir(self) -> Path:
        return Path(self.results_dir) / "runs" / self.profile.name


def synthetic_root(ctx: Context, num_classes: int, design: str | None = None) -> Path:
    """The profile's synthetic scenes with K classes (semantic + panoptic layouts), generated once
    (`mfcore.data.ensure_synthetic`); `design` replaces the profile's scene design (the other scene parameters
    stay the profile's). The folder name only keeps sets apart: training reads K from the data."""
    from mfcore.data import ensure_synthetic

    p = ctx.profile
    design = design or p.design
    hue = design == "hue"
    options = dict(num_classes=num_classes, num_train=p.num_train, num_val=p.num_val, image_size=p.image_size,
                   seed=0, kind="both", design=design, class_freq_exponent=p.class_freq_exponent,
                   hue_noise=p.hue_noise if hue else 40.0, hue_context=p.hue_context if hue else 0)
    # every option is in the folder's name (a digest of them), so a changed scene parameter never reads stale scenes
    # and profiles with the same scenes (quick, laptop) share one set
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return ensure_synthetic(Path(ctx.cache_dir) / f"{design}-k{num_classes}-{digest}", **options)


def pretrained_backbone(ctx: Context) -> str:
    """Path of the profile's backbone pretrained on synthetic classification (trained once, cached)."""
    from mfcore.training.pretrain import pretrain_backbone

    cfg = dataclasses.replace(ctx.profile.pretrain, backbone=ctx.profile.backbone)
    classes = f"h{cfg.num_hues}" if cfg.design == "hue" else f"p{cfg.num_primitives}"
    # every field is in the name (a digest of them), so a changed pretraining option never reuses old weights
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    tag = f"{cfg.backbone}-{classes}-s{cfg.image_size}-n{cfg.num_train}-i{cfg.iters}-{digest}"
    out = Path(ctx.cache_dir) / "pretrained" / f"{tag}.pt"
    pretrain_backbone(cfg, out, Path(ctx.cache_dir) / "pretrained" / f"data-{tag}", ctx.device, ctx.progress)
    return str(out)


def synthetic_spec(ctx: Context, model: str, num_classes: int | None = None, seed: int = 0, panoptic: bool = False,
                   tag: str = "", design: str | None = None, **model_overrides: Any) -> RunSpec:
    """A run of small preset `synthetic[-panoptic]-<model>-<backbone>` on the profile's scenes with K classes
    (of another scene design than the profile's with `design`)."""
    p = ctx.profile
    k = num_classes or p.base_classes
    dataset = "synthetic-panoptic" if panoptic else "synthetic"
    # one protocol for every model of a table: the same backbone, width, data, lr, schedule and iterations
    overrides = {"pretrained": pretrained_backbone(ctx), **p.model_fields(model), **model_overrides}
    train = {"iters": p.iters, "batch_size": p.batch_size, "lr": p.lr, "seed": seed,
             # the small presets' own backbone multiplier (1.0) is left out of the spec unless the profile changes it
             **({"backbone_lr_mult": p.backbone_lr_mult} if p.backbone_lr_mult != 1.0 else {}),
             # scenes of another size than the presets' 64 train and test at their own resolution
             **(scene_sizes(p.image_size) if p.image_size != SMALL_SCENE_SIZE else {}),
             "checkpoint_period": max(1, p.iters // 4), "num_workers": 0 if p.name == "smoke" else 2,
             "eval_period": max(1, p.iters // p.curve_points) if p.curve_points > 1 else 0}
    other = f"-{design}" if design and design != p.design else ""
    name = f"{dataset}{other}-k{k}-{model}{('-' + tag) if tag else ''}-s{seed}"
    return RunSpec(name, f"{dataset}-{model}-{p.backbone}", str(synthetic_root(ctx, k, design)), train, overrides)


def paper_spec(ctx: Context, preset: str, seed: int = 0, **model_overrides: Any) -> RunSpec:
    """A run of a paper preset on real data under `data_root/<dataset>`."""
    from mfcore.presets import get_preset

    if not ctx.data_root:
        raise ValueError("the paper profile needs data_root: a folder with one sub-folder per dataset "
                         "(e.g. data_root/ade20k/ADEChallengeData2016); see data/README.md")
    dataset = get_preset(preset).train.dataset
    root = Path(ctx.data_root) / dataset
    if ctx.check_data and not root.is_dir():
        raise FileNotFoundError(f"paper profile: dataset {dataset!r} expected at {root} (see data/README.md)")
    tag = "-".join(f"{k}{v}" for k, v in sorted(model_overrides.items()))
    return RunSpec(f"{preset}{('-' + tag) if tag else ''}-s{seed}", preset, str(root), {"seed": seed}, model_overrides)


def run(ctx: Context, spec: RunSpec, on_log: Callable[[list[dict]], None] | None = None) -> dict:
    """Train and evaluate `spec` unless already finished; returns final.json's content.
    on_log: called with the metrics records after each log line (single-process runs)."""
    out = ctx.runs_dir / spec.name
    final = out / "final.json"
    if final.is_file():
        done = json.loads(final.read_text())
        if done.get("spec") == spec.as_dict():
            return {**done, "cached": True}
        raise ValueError(f"{out} holds a finished run of a different spec; delete it or use another results_dir")
    resume = (out / "last.pt").is_file()
    start = time.perf_counter()
    print(f"run {spec.name}: {'resuming' if resume else 'training'} {spec.preset}", flush=True)
    if ctx.nproc_per_node > 1:
        result = _run_torchrun(ctx, spec)
    else:
        from mfcore.training.train import train

        result = train(spec.preset, out, spec.data_root, train_overrides=spec.train, model_overrides=spec.model,
                       resume=resume, progress=ctx.progress, device=ctx.device, on_log=on_log)
        if result["status"] != "finished":
            raise KeyboardInterrupt(f"run {spec.name} {result['status']} at iteration {result['iteration']}; "
                                    f"run again to resume")
        result = {"metrics": result["eval"], "iteration": result["iteration"], "config": result["config"]}
    done = {"spec": spec.as_dict(), **result, "seconds": round(time.perf_counter() - start, 1)}
    write_json(final, done)
    return {**done, "cached": False}


def cached_seconds(result: dict) -> float:
    """The seconds a run's result adds to the wall time of whoever asked for it: its stored training +
    evaluation time when it was finished before (`cached`), 0 when it was trained just now (that time is
    already in the caller's own clock). Summing this over a table's runs counts each run once."""
    return result["seconds"] if result.get("cached", True) else 0.0


def _run_torchrun(ctx: Context, spec: RunSpec) -> dict:
    """Train `spec` through torchrun (`train_command`, which resumes a run it finds), then read its evaluation."""
    cmd = train_command(ctx, spec, progress=ctx.progress)
    print("launching:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    out = ctx.runs_dir / spec.name
    evaluated = json.loads((out / "eval_val.json").read_text())
    return {"metrics": evaluated["metrics"], "iteration": evaluated["iteration"], "config": evaluated["config"]}


def train_command(ctx: Context, spec: RunSpec, progress: str = "log") -> list[str]:
    """The command that trains `spec` into its run folder on its own, e.g. as one task of a cluster job array
    (`tables --print-commands`): `python -m mfcore train` (through torchrun when nproc_per_node > 1) with every
    override of the spec as a typed `--set`, and `--resume auto`, so that a requeued task continues. A later
    `tables` or `reproduce` finds the run trained, evaluates it once more and reuses it."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={ctx.nproc_per_node}"]
                                   if ctx.nproc_per_node > 1 else [])
    cmd = [*launcher, "-m", "mfcore", "train", "--preset", spec.preset, "--output", str(ctx.runs_dir / spec.name),
           "--device", str(ctx.device), "--progress", progress, "--resume", "auto"]
    if spec.data_root:
        cmd += ["--data-root", spec.data_root]
    for section, fields in (("train", spec.train), ("model", spec.model)):
        for key, value in fields.items():
            cmd += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return cmd


def run_seeds(ctx: Context, specs: list[RunSpec]) -> dict:
    """Run every spec (one per seed) and return the median of each semantic/panoptic summary metric,
    plus the per-seed values: {"semantic": {...}, "panoptic": {...}, "runs": [...], "seconds": training +
    evaluation of all of them, "cached_seconds": of those finished before this call (`cached_seconds`)}."""
    results = [run(ctx, s) for s in specs]
    summary: dict = {"runs": [s.name for s in specs], "seconds": sum(r["seconds"] for r in results),
                     "cached_seconds": sum(cached_seconds(r) for r in results)}
    for part in ("semantic", "panoptic"):
        rows = [r["metrics"][part] for r in results if part in r["metrics"]]
        if rows:
            keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
            summary[part] = {k: statistics.median(row[k] for row in rows) for k in keys}
            summary[part + "_per_seed"] = {k: [row[k] for row in rows] for k in keys}
    return summary


def train_runs(ctx: Context, specs: list[RunSpec], workers: int = 1) -> None:
    """Finish every run in `specs`, `workers` at a time (each in its own process when workers > 1).

    Many small runs share one GPU far better side by side than one after the other (each alone is
    bound by kernel launches). The specs were built in this process, so the datasets and the pretrained
    backbone they name already exist; a failed run is reported after the others have finished.
    """
    todo = [s for s in specs if not (ctx.runs_dir / s.name / "final.json").is_file()]
    if ctx.nproc_per_node > 1:
        workers = 1  # each run already spans the node's GPUs through torchrun
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already finished; training {len(todo)}, "
          f"{min(workers, max(len(todo), 1))} at a time", flush=True)
    if workers <= 1 or len(todo) <= 1:
        for spec in todo:
            run(ctx, spec)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    failed = []
    threads = max(1, (os.cpu_count() or 1) // workers)  # side-by-side runs share the CPU instead of oversubscribing it
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_run_in_worker, ctx, spec): spec.name for spec in todo}
        for future in as_completed(futures):
            error = future.exception()
            print(f"run {futures[future]}: {'failed: ' + repr(error) if error else 'finished'}", flush=True)
            if error:
                failed.append(futures[future])
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {failed}; finished runs are kept, run again to retry")


def _worker_start(threads: int) -> None:
    """A pool worker's set-up: its share of the CPU threads, and on Linux SIGTERM when its parent dies
    (prctl PR_SET_PDEATHSIG), so that a killed `tables` / `reproduce` leaves no worker training: the run saves
    its checkpoint and stops (`_run_in_worker`), as it does when the whole process group is signalled."""
    import torch

    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)


def _run_in_worker(ctx: Context, spec: RunSpec) -> dict:
    """`run` in a pool worker. A run stopped by a signal has saved its checkpoint; the worker then exits instead
    of taking the next queued run (its parent is gone or stopping too)."""
    try:
        return run(ctx, spec)
    except KeyboardInterrupt:
        os._exit(130)


def make_context(profile: str = "quick", results_dir: str = "", data_root: str | None = None, device: str = "auto",
                 progress: str = "log", nproc_per_node: int = 1, profile_overrides: dict | None = None,
                 cache_dir: str = "") -> Context:
    """The Context of a notebook's parameters cell. results_dir "" means results/ for the quick profile
    (the committed tables) and results/<profile>/ otherwise, in the source checkout; cache_dir "" means
    `mfcore.files.default_cache_dir()`. profile_overrides: Profile fields to replace, e.g. {"seeds": (0,)}
    (the provenance lines state the values used)."""
    from mfcore.companion.profiles import get_profile

    prof = get_profile(profile)
    if profile_overrides:
        prof = dataclasses.replace(prof, **profile_overrides)
    if not results_dir:
        results_dir = str(REPO / "results") if profile == "quick" else str(REPO / "results" / profile)
    return Context(prof, Path(results_dir), Path(cache_dir) if cache_dir else default_cache_dir(),
                   data_root=data_root or None,
                   device=prof.device if device == "auto" else device, progress=progress,
                   nproc_per_node=nproc_per_node)


class RequirementError(ValueError):
    """A profile cannot run on this machine or with these arguments (`check_requirements`)."""


def check_requirements(ctx: Context, tables: list[str] | None = None) -> None:
    """Refuse, before any work, a profile this machine or these arguments cannot run: a CUDA device without a GPU,
    the paper profile without `data_root` or with a data_root lacking a dataset folder the runs of `tables`
    (default: all, plus the notebooks' reference runs) read. Raises RequirementError (the CLI: one line, exit 2)."""
    p = ctx.profile
    device = str(ctx.device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RequirementError(
                f"no GPU: profile {p.name} runs on {device} and this machine has no CUDA device "
                f"(torch.cuda.is_available() is False); use make reproduce PROFILE={p.name} DEVICE=cpu "
                f"(--device cpu) to run it on the CPU, or PROFILE=quick")
    if p.synthetic:
        return
    if not ctx.data_root:
        raise RequirementError(f"profile {p.name} needs DATA_ROOT=: a folder with one sub-folder per dataset "
                               f"(e.g. make reproduce PROFILE={p.name} DATA_ROOT=/data, with "
                               f"/data/ade20k/ADEChallengeData2016); see data/README.md")
    from mfcore.companion.tables import planned_runs

    planning = dataclasses.replace(ctx, check_data=False)
    specs = planned_runs(planning, tables)
    if tables is None:
        specs += [base_spec(planning, "maskformer"), base_spec(planning, "maskformer", panoptic=True)]
    roots = sorted({s.data_root for s in specs if s.data_root})
    missing = [Path(r).name for r in roots if not Path(r).is_dir()]
    if missing:
        raise RequirementError(f"DATA_ROOT={ctx.data_root} lacks the dataset folder(s) {', '.join(missing)} "
                               f"(expected {Path(ctx.data_root) / missing[0]}, ...; see data/README.md)")


def base_spec(ctx: Context, model: str = "maskformer", panoptic: bool = False) -> RunSpec:
    """The profile's reference run of `model` (seed 0): the run the training, inference, query-statistics
    and explorer notebooks look at, and the base row of the ablations."""
    if ctx.profile.synthetic:
        return synthetic_spec(ctx, model, panoptic=panoptic)
    dataset = "coco-panoptic" if panoptic else "ade20k"
    return paper_spec(ctx, f"{dataset}-{model}-r50")


def notebook_runs(ctx: Context) -> list[RunSpec]:
    """The reference runs notebooks 04, 05, 07 and 08 look at (semantic and panoptic `base_spec`): the batch
    pipeline trains them side by side with the tables' runs instead of one after the other in a notebook."""
    return [base_spec(ctx, "maskformer"), base_spec(ctx, "maskformer", panoptic=True)]


def run_checkpoint(ctx: Context, spec: RunSpec) -> Path:
    """The trained checkpoint of `spec`, training it first if needed."""
    run(ctx, spec)
    return ctx.runs_dir / spec.name / "last.pt"


def val_dataset(spec: RunSpec):
    """The validation split a run is evaluated on (original images and labels)."""
    from mfcore.presets import get_preset
    from mfcore.training.runtime import build_run_dataset

    return build_run_dataset(get_preset(spec.preset).train.dataset, spec.data_root, "val")
