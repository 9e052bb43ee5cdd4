"""What every notebook does first and after every table: one call each instead of a copied cell.

    ctx, figures = notebook.setup(profile, results_dir, data_root, device, progress, nproc_per_node, interactive,
                                  cache_dir)
    notebook.show_table(tables.table2(ctx), ctx)
"""
from __future__ import annotations

from pathlib import Path

from mfcore.companion.experiments import Context, make_context
from mfcore.companion.table import Table, write_table


def setup(profile: str, results_dir: str, data_root: str, device: str, progress: str, nproc_per_node: int,
          interactive: bool, cache_dir: str = "") -> tuple[Context, Path]:
    """The notebook's run context (from its parameters cell) and its figures folder. cache_dir: where
    generated datasets and pretrained backbones go ("" : mfcore.files.default_cache_dir()).

    Batch runs (`interactive=False`) draw with the Agg backend: figures are written to files and shown
    inline once, never in a window."""
    import matplotlib

    if not interactive:
        matplotlib.use("Agg")
    ctx = make_context(profile, results_dir, data_root, device, progress, nproc_per_node, cache_dir=cache_dir)
    print(ctx.profile.describe())
    return ctx, Path(ctx.results_dir) / "figures"


def use_widget_backend() -> bool:
    """In a notebook front end, draw with ipympl's widget backend (`%matplotlib widget`): live figures that take
    clicks (QueryExplorer selects the pixel's query). Returns False, leaving the backend as it is (inline or the
    batch runs' Agg: static figures), outside IPython or without ipympl installed."""
    import importlib.util

    if importlib.util.find_spec("ipympl") is None:  # found, not imported: importing it switches the backend
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":  # a plain interpreter or terminal IPython
        return False
    shell.run_line_magic("matplotlib", "widget")
    return True


def show_table(table: Table, ctx: Context) -> None:
    """Write `table` (CSV + Markdown under the results folder) and display it: as Markdown in a notebook
    front end, as plain text in a batch log. Returns nothing, so that a cell ending with it shows the table
    once (a returned Table would also print its repr)."""
    from IPython.display import display

    write_table(table, ctx.results_dir)
    text = table.markdown()
    # the front end renders the Markdown; a batch log (papermill prints text/plain) gets the same pipe table as text
    display({"text/markdown": text, "text/plain": text}, raw=True)
