"""Files every part of mfcore writes: one atomic write, strict JSON, the source checkout and its git commit.

An atomic write puts the bytes in a temporary file next to the target, flushes them to disk and renames the
file over the target (`os.replace`): a reader, or a run killed mid-write, sees the old file or the new one,
never half of one. The temporary name carries the process id, so two processes never share it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, BinaryIO, Callable

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent  # the source checkout (pyproject.toml, notebooks/, results/) when run from one


def default_cache_dir() -> Path:
    """Where generated datasets and pretrained backbones are cached unless a caller names another folder
    (`Context.cache_dir`, `--cache-dir`): data/generated in the source checkout, or in the working
    directory when mfcore is installed elsewhere."""
    base = REPO if (REPO / "pyproject.toml").is_file() else Path.cwd()
    return base / "data" / "generated"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(f)` on a temporary binary file, then rename it over `path` (parents created)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except OSError as err:  # read-only or full disk, a parent that is a file, a target that is a folder
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    finally:
        try:
            tmp.unlink(missing_ok=True)  # only left over if writing failed
        except OSError:
            pass
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def json_safe(obj: Any) -> Any:
    """`obj` with NaN/inf floats replaced by None and tuples by lists (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, compact: bool = False) -> Path:
    """Write `obj` as strict JSON (NaN -> null) to `path` atomically: indented, or with sorted keys and no
    spaces when `compact` (dataset annotations, byte-identical when regenerated)."""
    if compact:
        text = json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    else:
        text = json.dumps(json_safe(obj), indent=2, allow_nan=False)
    return write_text(path, text)


def git_commit() -> str:
    """Commit of the mfcore source tree (with "-dirty" if files outside results/ have local changes), or "unknown".
    MFCORE_GIT_COMMIT names it for a copy of the tree without .git (e.g. a job shipped to a GPU machine)."""
    if os.environ.get("MFCORE_GIT_COMMIT"):
        return os.environ["MFCORE_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # results/ is written by the runs themselves: changes there do not make the source dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=REPO, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
