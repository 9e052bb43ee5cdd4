"""The main job: execute every numbered notebook headless with papermill, in order, on one profile.

    python -m mfcore reproduce --profile quick      (make reproduce; PROFILE=gpu|paper to scale up)

Each notebook gets the same parameters (profile, results_dir, data_root, device, progress="log",
interactive=False, cache_dir) and writes its tables and figures itself (atomically). Executed copies go to
`results/executed/<profile>/` (git-ignored). A failing notebook stops the pipeline with the notebook and
cell named; its executed copy is kept for inspection. Finished training runs are cached, so a rerun
only does what is missing.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from mfcore.companion.experiments import make_context, train_runs
from mfcore.files import REPO, git_commit, write_json

NOTEBOOKS = REPO / "notebooks"


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """The numbered notebooks `NN_name.ipynb`, in order."""
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return found


class _CellOutputOnly(logging.Filter):
    """Keep what the notebooks print (progress lines); drop papermill's per-cell banners."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Executing Cell", "Ending Cell", "Executing notebook",
                                                   "Input Notebook", "Output Notebook", "Executing:"))


def _echo_notebook_output() -> None:
    logger = logging.getLogger("papermill")
    if not any(isinstance(f, _CellOutputOnly) for h in logger.handlers for f in h.filters):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        handler.addFilter(_CellOutputOnly())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def reproduce(profile: str = "quick", results_dir: str = "", data_root: str | None = None, device: str = "auto",
              nproc_per_node: int = 1, only: list[str] | None = None, folder: Path = NOTEBOOKS,
              cache_dir: str | None = None, executed_dir: str | None = None, workers: int | None = None) -> dict:
    """Run the notebooks (all, or those whose name contains one of `only`); returns the timing summary.
    cache_dir: where generated datasets and pretrained backbones go (default data/generated; passed to the
    notebooks as their `cache_dir` parameter). executed_dir: executed copies (default results/executed/<profile>).
    workers: training runs side by side before the notebooks start (default: the profile's parallel_runs;
    1 leaves every run to the notebook that needs it)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    _echo_notebook_output()
    ctx = make_context(profile, results_dir, data_root, device, "log", nproc_per_node, cache_dir=cache_dir or "")
    executed = Path(executed_dir) if executed_dir else REPO / "results" / "executed" / profile
    executed.mkdir(parents=True, exist_ok=True)
    params = dict(profile=profile, results_dir=str(ctx.results_dir), data_root=data_root or "", device=device,
                  progress="log", interactive=False, nproc_per_node=nproc_per_node, cache_dir=str(ctx.cache_dir))
    todo = [nb for nb in notebooks(folder) if not only or any(o in nb.name for o in only)]
    timings, start, trained = {}, time.perf_counter(), None
    workers = workers or ctx.profile.parallel_runs
    if workers > 1 and not only:
        from mfcore.companion.tables import planned_runs

        print(f"[0/{len(todo)}] training every table's runs, {workers} side by side", flush=True)
        train_runs(ctx, planned_runs(ctx), workers)
        trained = round(time.perf_counter() - start, 1)
    for i, nb in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {nb.name} (profile {profile})", flush=True)
        t0 = time.perf_counter()
        out = executed / nb.name
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3", progress_bar=False,
                                log_output=True, cwd=str(nb.parent))
        except PapermillExecutionError as err:
            raise RuntimeError(f"notebook {nb.name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                               f"the executed copy is kept at {out}") from None
        timings[nb.name] = round(time.perf_counter() - t0, 1)
        print(f"[{i}/{len(todo)}] {nb.name} done in {timings[nb.name]:.0f}s", flush=True)
    summary = {"profile": profile, "parallel_training_seconds": trained, "notebooks": timings,
               "wall_seconds": round(time.perf_counter() - start, 1),
               "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not only:
        write_json(Path(ctx.results_dir) / f"reproduce_{profile}.json", summary)
    print(f"all done in {summary['wall_seconds'] / 60:.1f} min; tables in {Path(ctx.results_dir) / 'tables'}")
    return summary
