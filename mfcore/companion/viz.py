"""Plotting for the notebooks: segmentations, masks, loss curves (live or static), matchings.

Every plot builds a `matplotlib.figure.Figure` directly (no pyplot, so it works under the Agg backend,
never opens a window and leaks no global figure) and returns it; nothing calls `plt.show`. The paper's
query-to-category statistics and their figures are in `mfcore.companion.query_stats`; the per-query explorer is
`mfcore.companion.explorer.QueryExplorer`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from mfcore.companion.predictions import to_numpy, to_rgb
from mfcore.files import atomic_write


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` to `path` (format from the suffix) atomically (`mfcore.files.atomic_write`), so a
    reader never sees a half-written image."""
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"save_figure: {path} needs a suffix (.png, .pdf, .svg) to choose the format")
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:], dpi=dpi, bbox_inches="tight"))
    return path


# ----------------------------------------------------------------------------- colours
def palette(num_classes: int) -> np.ndarray:
    """[K, 3] uint8 fixed colours: hues stepped by the golden ratio (neighbouring ids look different),
    saturation alternating between two levels and value over a cycle of three; class c's colour does not
    depend on K."""
    k = np.arange(num_classes)
    hsv = np.stack([(k * 0.6180339887) % 1.0, np.where(k % 2, 0.55, 0.85), np.where(k % 3 == 1, 0.7, 0.95)], 1)
    return (hsv_to_rgb(hsv) * 255).round().astype(np.uint8)


def colorize(label_map: Any, num_classes: int, ignore: int = 255) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a label map [H, W]: class c -> palette(K)[c], `ignore` -> black."""
    labels = to_numpy(label_map).astype(np.int64)
    bad = (labels != ignore) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"colorize: label {labels[bad][0]} is outside 0..{num_classes - 1} and not ignore={ignore}")
    colors = np.concatenate([palette(num_classes), np.zeros((1, 3), np.uint8)])  # last row: ignore
    return colors[np.where(labels == ignore, num_classes, labels)]


def overlay(image: Any, label_map: Any, num_classes: int | None = None, alpha: float = 0.5,
            ignore: int = 255) -> np.ndarray:
    """uint8 [H, W, 3]: `image` blended with the colours of `label_map` (ignore pixels left as they are)."""
    rgb, labels = to_rgb(image), to_numpy(label_map).astype(np.int64)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"overlay: label map {labels.shape} and image {rgb.shape[:2]} differ in size")
    k = num_classes if num_classes is not None else int(labels[labels != ignore].max(initial=-1)) + 1
    blend = (1 - alpha) * rgb + alpha * colorize(labels, k, ignore)
    return np.where((labels == ignore)[..., None], rgb, blend.round()).astype(np.uint8)


def bare_axes(ax: Any, title: str = "", fontsize: float = 9) -> None:
    """An image panel: no ticks, a small title."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=fontsize)


def class_legend(fig: Figure, class_names: Sequence[str], classes: Any, ignore: bool = False,
                 ignore_label: str = "black: ignore (unlabelled, not scored)", max_entries: int = 24,
                 **kwargs: Any) -> Any:
    """A figure legend of the class colours (`palette`) of `classes` (the ids present in the panels, in order),
    and, with `ignore`, what black means. Beyond `max_entries` classes the rest are summarised in one entry."""
    k = len(class_names)
    colors = palette(k) / 255.0
    ids = [int(c) for c in classes]
    shown = ids[:max_entries]
    handles = [Patch(facecolor=colors[c], edgecolor="0.3", label=str(class_names[c])) for c in shown]
    if len(ids) > len(shown):
        handles.append(Patch(facecolor="white", edgecolor="0.3", label=f"... {len(ids) - len(shown)} more classes"))
    if ignore:
        handles.append(Patch(facecolor="black", edgecolor="0.3", label=ignore_label))
    options = dict(loc="outside right upper", fontsize=8, frameon=False, title="classes", title_fontsize=8)
    return fig.legend(handles=handles, **{**options, **kwargs})


def present_classes(label_maps: Sequence[Any], num_classes: int, ignore: int = 255) -> tuple[list[int], bool]:
    """The class ids that occur in `label_maps` (sorted) and whether `ignore` occurs."""
    values = np.unique(np.concatenate([to_numpy(m).astype(np.int64).ravel() for m in label_maps]))
    return [int(v) for v in values if 0 <= v < num_classes], bool((values == ignore).any())


# ----------------------------------------------------------------------------- masks
def plot_masks_grid(masks: Any, titles: Sequence[str] | None = None, ncols: int = 5) -> Figure:
    """One grey-scale panel per mask of `masks` [M, H, W] (binary or probabilities); M axes."""
    masks = to_numpy(masks)
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise ValueError(f"plot_masks_grid expects masks [M, H, W] with M >= 1, got shape {masks.shape}")
    if titles is not None and len(titles) != masks.shape[0]:
        raise ValueError(f"plot_masks_grid: {len(titles)} titles for {masks.shape[0]} masks")
    rows, cols = -(-masks.shape[0] // ncols), min(ncols, masks.shape[0])
    fig = Figure(figsize=(2.0 * cols, 2.0 * rows))
    for i, mask in enumerate(masks):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(mask.astype(np.float32), cmap="gray", vmin=0, vmax=1)
        bare_axes(ax, titles[i] if titles is not None else "")
    return fig


# ----------------------------------------------------------------------------- training curves
def plot_loss_curves(records: Sequence[Mapping], keys: Sequence[str] = ("loss",)) -> Figure:
    """One axes per key: its value against "iter" over the records (train or eval lines of metrics.jsonl)
    that have it."""
    if not keys:
        raise ValueError("plot_loss_curves needs at least one key")
    if any("iter" not in r for r in records):
        raise ValueError("plot_loss_curves: every record needs an 'iter' field (as metrics.jsonl lines have)")
    fig = Figure(figsize=(3.6 * len(keys), 3.0))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys):
        points = [(r["iter"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set(title=key, xlabel="iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class LiveLossPlot:
    """Loss curves that redraw in place in a notebook (one display handle, updated); headless (no IPython
    kernel, or `live=False`) nothing is drawn until `finish()` returns the final figure."""

    def __init__(self, keys: Sequence[str] = ("loss",), live: bool | None = None):
        self.keys, self.live = tuple(keys), _in_notebook() if live is None else live
        self.records: list[dict] = []
        self._handle: Any = None

    def update(self, records: Sequence[Mapping]) -> None:
        self.records = [dict(r) for r in records]
        if self.live:
            self._show(plot_loss_curves(self.records, self.keys))

    def _show(self, fig: Figure) -> None:
        from IPython.display import display
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)

    def finish(self) -> Figure:
        fig = plot_loss_curves(self.records, self.keys)
        if self.live:
            self._show(fig)
        return fig


def plot_matching(cost: Any, assignments: Mapping[str, tuple[Any, Any]] | tuple[Any, Any],
                  row_label: str = "query", col_label: str = "ground-truth segment",
                  col_names: Sequence[str] | None = None) -> Figure:
    """Cost matrix [N, M] as a heat map with the matched (row, col) cells outlined; one panel per named
    assignment, e.g. {"Hungarian": (rows, cols), "fixed": (rows, cols)}, titled with its name and total cost
    on two lines; one colour bar (the cost) for all panels."""
    cost = to_numpy(cost).astype(np.float64)
    if cost.ndim != 2:
        raise ValueError(f"plot_matching expects a cost matrix [N, M], got shape {cost.shape}")
    if not isinstance(assignments, Mapping):
        assignments = {"matching": assignments}
    n, m = cost.shape
    width = max(3.2, 0.7 * m + 1.6)
    fig = Figure(figsize=(width * len(assignments) + 1.0, max(3.2, 0.3 * n + 1.8)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(assignments), sharey=True))
    image = None
    for i, (ax, (name, (rows, cols))) in enumerate(zip(axes, assignments.items())):
        rows, cols = to_numpy(rows).astype(int), to_numpy(cols).astype(int)
        image = ax.imshow(cost, cmap="magma_r", aspect="auto", vmin=cost.min(), vmax=cost.max())
        for r, c in zip(rows, cols):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2.5))
        ax.set_title(f"{name}\ntotal cost {cost[rows, cols].sum():.2f}", fontsize=10)
        ax.set_xlabel(col_label, fontsize=9)
        if i == 0:
            ax.set_ylabel(row_label, fontsize=9)
        ax.set_yticks(range(n), [str(r) for r in range(n)], fontsize=9)
        names = list(col_names) if col_names is not None else [str(c) for c in range(m)]
        long = max(len(s) for s in names) * m > 8 * width  # rotate only when horizontal labels would collide
        ax.set_xticks(range(m), names, fontsize=9, rotation=45 if long else 0, ha="right" if long else "center")
    fig.colorbar(image, ax=list(axes), label="matching cost (low = good match)", shrink=0.9)
    return fig
