"""What a regenerated table is: the `Table` record, its atomic files, the `trained` marker of tables a profile may
skip, and the provenance line that says what was run."""
from __future__ import annotations

import datetime as dt
import functools
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from mfcore.companion.experiments import Context
from mfcore.files import git_commit, write_text


@dataclass
class Table:
    name: str                     # file stem under results/tables
    title: str
    frame: pd.DataFrame
    provenance: str
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        body = self.frame.to_markdown(index=False, floatfmt=".1f") if not self.frame.empty else "(no rows)"
        notes = "".join(f"\n- {n}" for n in self.notes)
        return f"### {self.title}\n\n{body}\n\n_Provenance: {self.provenance}_\n{notes}\n"


def write_table(table: Table, results_dir: str | Path) -> list[Path]:
    """Write `<results_dir>/tables/<name>.csv` and `.md` atomically (never a half-written table); a table
    this profile does not train (no rows) writes nothing."""
    if table.frame.empty:
        return []
    folder = Path(results_dir) / "tables"
    buf = io.StringIO()
    table.frame.to_csv(buf, index=False)
    buf.write(f"# provenance: {table.provenance}\n")
    paths = [folder / f"{table.name}.csv", folder / f"{table.name}.md"]
    for path, text in zip(paths, (buf.getvalue(), table.markdown())):
        write_text(path, text)
    return paths


def trained(name: str, title: str) -> Callable[[Callable[[Context], Table]], Callable[[Context], Table]]:
    """A trained table: run only where the profile trains it (`Profile.tables`); elsewhere an empty table that
    says which profiles do."""
    def wrap(make: Callable[[Context], Table]) -> Callable[[Context], Table]:
        @functools.wraps(make)
        def table(ctx: Context) -> Table:
            if ctx.profile.runs_table(name):
                return make(ctx)
            return Table(name, title, pd.DataFrame(), f"not run in profile {ctx.profile.name}",
                         [f"Profile {ctx.profile.name} does not train this table (its budget goes to Tables 2 and 4); "
                          f"the laptop profile runs it: results/laptop/tables/{name}.md"])
        return table
    return wrap


def provenance(ctx: Context, start: float, runs_seconds: float, extra: str = "") -> str:
    """The provenance line. Its time is this table's own clock since `start` (which holds the runs it trained)
    plus `runs_seconds`, the stored times of the runs it found finished (`cached_seconds`): each run once. Runs
    trained side by side overlap, so the sum can exceed the wall time of the batch run (reproduce_<profile>.json)."""
    wall = time.perf_counter() - start + runs_seconds
    return (f"{ctx.profile.describe()}{'; ' + extra if extra else ''}; git {git_commit()[:12]}; "
            f"{dt.date.today().isoformat()}; {wall / 60:.1f} min of training + evaluation (its runs' times summed)")
