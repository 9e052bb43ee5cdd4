"""The main job: execute every numbered notebook headless with papermill, in order, on one profile.

    python -m mfcore reproduce --profile quick      (make reproduce; PROFILE=gpu|paper to scale up)

Each notebook gets the same parameters (profile, results_dir, data_root, device, progress="log",
interactive=False, cache_dir) and writes its tables and figures itself (atomically). Executed copies go to
`results/executed/<profile>/` (git-ignored). A failing notebook stops the pipeline with the notebook and
cell named; its executed copy is kept for inspection. Finished training runs are cached, so a rerun
only does what is missing.

Before any work the profile's requirements are checked (`experiments.check_requirements`: a GPU for a cuda
profile, DATA_ROOT and its dataset folders for paper). The log is the notebooks' own output, one line per printed
line (`log_lines`), with the kernel's harmless warnings dropped (`is_kernel_noise`), and starts with an estimate
(`estimate`). `results/reproduce_<profile>.json` is written only by a full run that trained every run itself.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from mfcore.companion.experiments import check_requirements, make_context, notebook_runs, train_runs
from mfcore.files import REPO, git_commit, write_json

NOTEBOOKS = REPO / "notebooks"


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """The numbered notebooks `NN_name.ipynb`, in order."""
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return found


# papermill's own chatter, and the kernel's: not what a reader of the batch log wants
_PAPERMILL_BANNERS = ("Executing Cell", "Ending Cell", "Executing notebook", "Input Notebook", "Output Notebook",
                      "Executing:", "Working directory:", "Passed unknown parameter:")
_KERNEL_NOISE = (
    re.compile(r"Kernel is running over TCP without encryption"),  # ipykernel >= 7: the kernel is local, on loopback
    re.compile(r"All communication \(including code and outputs\)"),  # the same warning, wrapped
    re.compile(r"KeyboardInterrupt caught in kernel"),  # the kernel manager interrupts before every shutdown
)
_FIGURE_REPR = re.compile(r"^<Figure size \d+(\.\d+)?x\d+(\.\d+)? with \d+ Axes>$")
_OBJECT_REPR = re.compile(r"^<[\w.]+ object(?: at 0x[0-9a-f]+)?>$")


def log_lines(message: str) -> list[str]:
    """What the batch log prints for one message papermill logs from a notebook: its lines without the trailing
    newline (a progress line is one line, not two), or nothing for papermill's banners and for outputs that only
    have a repr (`<Figure size 640x480 with 1 Axes>`, `<... object>`: the figure is in the executed copy and on
    disk)."""
    text = message.rstrip("\n")
    if not text.strip() or text.startswith(_PAPERMILL_BANNERS):
        return []
    lines = text.split("\n")
    kept = [line.rstrip() for line in lines if not _FIGURE_REPR.match(line.strip())
            and not _OBJECT_REPR.match(line.strip())]
    return kept if any(line.strip() for line in kept) else []


def is_kernel_noise(line: str) -> bool:
    """Whether a line the kernel process writes to stderr is one of the known harmless warnings (dropped)."""
    return any(p.search(line) for p in _KERNEL_NOISE)


class _CellOutputOnly(logging.Filter):
    """Keep what the notebooks print (progress lines), one log line per printed line; drop papermill's per-cell
    banners and repr-only outputs (`log_lines`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        lines = log_lines(record.getMessage())
        if not lines:
            return False
        record.msg, record.args = "\n    ".join(lines), None
        return True


def _forward_kernel_stderr(stream) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if not is_kernel_noise(line):
            sys.stderr.write(line)
            sys.stderr.flush()
    stream.close()


def _quiet_kernel_manager():
    """A kernel manager whose kernel's stderr goes through `is_kernel_noise` (the rest is passed on)."""
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["stderr"] = subprocess.PIPE
            await super()._async_launch_kernel(kernel_cmd, **kw)
            process = getattr(self.provisioner, "process", None)
            if process is not None and process.stderr is not None:
                threading.Thread(target=_forward_kernel_stderr, args=(process.stderr,), daemon=True).start()

        _launch_kernel = _async_launch_kernel

    return QuietKernelManager


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler on `sys.stdout` as it is when a record is emitted, not as it was when the handler was made
    (a later caller may have replaced it, e.g. to capture the log)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _echo_notebook_output() -> None:
    logger = logging.getLogger("papermill")
    if not any(isinstance(f, _CellOutputOnly) for h in logger.handlers for f in h.filters):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("    %(message)s"))
        handler.addFilter(_CellOutputOnly())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _finished_runs(ctx) -> int:
    return len(list(Path(ctx.runs_dir).glob("*/final.json")))


def estimate(profile: str, names: list[str], results_dir: Path, cached_runs: int) -> str:
    """One line: how long the job should take, from the last uncached run of this profile
    (`reproduce_<profile>.json`), or that there is nothing to estimate from."""
    path = Path(results_dir) / f"reproduce_{profile}.json"
    try:
        last = json.loads(path.read_text())
        times = last["notebooks"]
    except (OSError, ValueError, KeyError):
        return f"estimate: none yet for profile {profile} (no {path.name} from an earlier full run)"
    known = [times[n] for n in names if n in times]
    seconds = sum(known) + (last.get("parallel_training_seconds") or 0) * (len(known) == len(times))
    where = f"git {str(last.get('git_commit', ''))[:7]}, {last.get('date', '?')}"
    cached = (f"; {cached_runs} training run(s) already finished here, so less" if cached_runs else "")
    missing = len(names) - len(known)
    more = f" + {missing} notebook(s) not timed before" if missing else ""
    about = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    return (f"estimate: about {about} for {len(names)} notebook(s){more} (the last uncached run of "
            f"profile {profile}: {where}, on its machine{cached})")


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

    ctx = make_context(profile, results_dir, data_root, device, "log", nproc_per_node, cache_dir=cache_dir or "")
    check_requirements(ctx)  # a GPU profile without a GPU, paper data missing: refused before notebook 01
    _echo_notebook_output()
    executed = Path(executed_dir) if executed_dir else REPO / "results" / "executed" / profile
    executed.mkdir(parents=True, exist_ok=True)
    params = dict(profile=profile, results_dir=str(ctx.results_dir), data_root=data_root or "", device=device,
                  progress="log", interactive=False, nproc_per_node=nproc_per_node, cache_dir=str(ctx.cache_dir))
    todo = [nb for nb in notebooks(folder) if not only or any(o in nb.name for o in only)]
    cached_runs = _finished_runs(ctx)
    print(estimate(profile, [nb.name for nb in todo], Path(ctx.results_dir), cached_runs), flush=True)
    timings, start, trained = {}, time.perf_counter(), None
    workers = workers or ctx.profile.parallel_runs
    if workers > 1 and not only:
        from mfcore.companion.tables import planned_runs

        print(f"[0/{len(todo)}] training every table's and notebook's runs, {workers} side by side", flush=True)
        specs = {s.name: s for s in planned_runs(ctx) + notebook_runs(ctx)}
        train_runs(ctx, list(specs.values()), workers)
        trained = round(time.perf_counter() - start, 1)
    for i, nb in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {nb.name} (profile {profile})", flush=True)
        t0 = time.perf_counter()
        out = executed / nb.name
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3", progress_bar=False,
                                log_output=True, cwd=str(nb.parent), kernel_manager_class=_quiet_kernel_manager())
        except PapermillExecutionError as err:
            raise RuntimeError(f"notebook {nb.name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                               f"the executed copy is kept at {out}") from None
        timings[nb.name] = round(time.perf_counter() - t0, 1)
        print(f"[{i}/{len(todo)}] {nb.name} done in {timings[nb.name]:.0f}s", flush=True)
    summary = {"profile": profile, "parallel_training_seconds": trained, "notebooks": timings,
               "wall_seconds": round(time.perf_counter() - start, 1), "cached_runs": cached_runs,
               "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    # the committed timings are those of a run that trained everything: a rerun that reused finished runs
    # (minutes instead of a quarter of an hour) writes its own timings next to the executed copies instead
    timing_file = Path(ctx.results_dir) / f"reproduce_{profile}.json"
    if only or cached_runs:
        timing_file = executed / f"reproduce_{profile}.json"
    write_json(timing_file, summary)
    why = f" ({cached_runs} runs were cached; timings in {timing_file})" if cached_runs and not only else ""
    print(f"all done in {summary['wall_seconds'] / 60:.1f} min; tables in {Path(ctx.results_dir) / 'tables'}{why}")
    return summary
