"""Plotting for the notebooks, and the paper's query-to-category statistics.

Every plot builds a `matplotlib.figure.Figure` directly (no pyplot, so it works under the Agg backend,
never opens a window and leaks no global figure) and returns it; nothing calls `plt.show`.

Query statistics (the paper's ablations, "Number of queries", and the figure next to it): for each
query, the number of unique categories it predicts over a dataset, sorted in descending order. A query
"predicts" category c_i = argmax_c p_i(c) on an image when c_i is not "no object", optionally only if
p_i(c_i) > a threshold and its mask {sigmoid(m_i) >= 0.5} is non-empty.

The statistics and examples take predictions as `mfcore.predictions` describes them (collected from a
model or loaded from a file); `collect_predictions`, `save_predictions` and `load_predictions` are
re-exported here.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .train import read_metrics  # noqa: F401  (re-exported for the notebooks)
from .predictions import collect_predictions, load_predictions, save_predictions, to_numpy, to_rgb


def __getattr__(name: str) -> Any:
    # `mfcore.viz.QueryExplorer` without a circular import (explorer.py imports this module)
    if name == "QueryExplorer":
        from .explorer import QueryExplorer
        return QueryExplorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` to `path` (format from the suffix) via a temporary file renamed with `os.replace`, so a
    reader never sees a half-written image."""
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"save_figure: {path} needs a suffix (.png, .pdf, .svg) to choose the format")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format=path.suffix[1:], dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over if savefig failed
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


def _bare(ax: Any, title: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


# ----------------------------------------------------------------------------- segmentation and masks
def plot_segmentation(image: Any, pred: Any, gt: Any = None, class_names: Sequence[str] | None = None,
                      ignore: int = 255) -> Figure:
    """Image | prediction (| ground truth), colours from `colorize`; a legend of the classes shown when
    `class_names` is given. 2 or 3 axes."""
    maps = [to_numpy(pred)] + ([to_numpy(gt)] if gt is not None else [])
    k = len(class_names) if class_names else max(int(m[m != ignore].max(initial=-1)) for m in maps) + 1
    fig = Figure(figsize=(3.2 * (1 + len(maps)), 3.4))
    axes = fig.subplots(1, 1 + len(maps))
    axes[0].imshow(to_rgb(image))
    _bare(axes[0], "image")
    for ax, m, title in zip(axes[1:], maps, ("prediction", "ground truth")):
        ax.imshow(colorize(m, k, ignore))
        _bare(ax, title)
    if class_names:
        present = sorted(set(np.unique(np.concatenate([m.ravel() for m in maps]))) - {ignore})
        colors = palette(k) / 255
        fig.legend(handles=[Patch(color=colors[c], label=class_names[c]) for c in present], loc="lower center",
                   ncol=min(len(present), 6), fontsize=7, frameon=False)
    return fig


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
        _bare(ax, titles[i] if titles is not None else "")
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


# ----------------------------------------------------------------------------- query statistics
class QueryStats:
    """Per-query category counts over a dataset: counts[i, c] = images on which query i predicts c."""

    def __init__(self, num_queries: int, num_classes: int, prob_threshold: float = 0.0, require_mask: bool = True):
        self.num_queries, self.num_classes = num_queries, num_classes
        self.prob_threshold, self.require_mask = prob_threshold, require_mask
        self.counts = np.zeros((num_queries, num_classes), dtype=np.int64)
        self.num_images = 0

    def update(self, pred_logits: Any, pred_masks: Any = None) -> None:
        """Add one image: pred_logits [N, K+1] (last column "no object"), pred_masks [N, h, w] logits."""
        logits = torch.as_tensor(to_numpy(pred_logits), dtype=torch.float32)
        if tuple(logits.shape) != (self.num_queries, self.num_classes + 1):
            raise ValueError(f"QueryStats.update: pred_logits {tuple(logits.shape)}, expected "
                             f"[N={self.num_queries}, K+1={self.num_classes + 1}]")
        prob, label = logits.softmax(dim=-1).max(dim=-1)
        used = (label < self.num_classes) & (prob > self.prob_threshold)
        if self.require_mask:
            masks = to_numpy(pred_masks) if pred_masks is not None else None
            if masks is None or masks.ndim != 3 or masks.shape[0] != self.num_queries:
                raise ValueError(f"QueryStats.update: require_mask needs pred_masks [N={self.num_queries}, h, w], "
                                 f"got {None if masks is None else masks.shape}")
            used &= torch.from_numpy((masks >= 0).reshape(self.num_queries, -1).any(axis=1))  # sigmoid >= 0.5
        queries = used.nonzero().flatten().numpy()
        np.add.at(self.counts, (queries, label.numpy()[queries]), 1)
        self.num_images += 1

    @classmethod
    def from_predictions(cls, predictions: Sequence[Mapping], num_classes: int, **kwargs: Any) -> QueryStats:
        stats = cls(len(predictions[0]["pred_logits"]), num_classes, **kwargs)
        for p in predictions:
            stats.update(p["pred_logits"], p["pred_masks"])
        return stats

    def matrix(self) -> np.ndarray:
        """[N, K] counts (a copy)."""
        return self.counts.copy()

    def unique_categories_per_query(self) -> np.ndarray:
        """[N] number of distinct categories each query predicted (the paper's figure, unsorted)."""
        return (self.counts > 0).sum(axis=1)


def plot_unique_categories(stats: QueryStats, title: str = "") -> Figure:
    """Bar chart of unique categories per query, sorted in descending order (as in the paper). 1 axes."""
    unique = np.sort(stats.unique_categories_per_query())[::-1]
    fig = Figure(figsize=(6.0, 2.8))
    ax = fig.subplots()
    ax.bar(np.arange(len(unique)), unique, width=1.0, color="tab:blue")
    ax.set(xlabel="queries (sorted)", ylabel="unique categories", xlim=(-0.5, len(unique) - 0.5),
           title=title or f"{(unique > 0).sum()} of {len(unique)} queries used, {stats.num_images} images")
    return fig


def _message_figure(text: str) -> Figure:
    fig = Figure(figsize=(5, 1.5))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    return fig


def plot_query_category_matrix(stats: QueryStats, class_names: Sequence[str] | None = None) -> Figure:
    """Used queries x categories, each row normalised to sum 1 and rows ordered by their most frequent
    category. 2 axes (matrix, colour bar)."""
    counts = stats.matrix()
    used = np.flatnonzero(counts.sum(axis=1))
    if len(used) == 0:  # e.g. a barely trained model: say so rather than fail a batch run
        return _message_figure(f"no query predicted a category in {stats.num_images} images")
    used = used[np.argsort(counts[used].argmax(axis=1), kind="stable")]
    rows = counts[used] / np.maximum(counts[used].sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(max(5.0, 0.18 * stats.num_classes + 2), max(3.0, 0.16 * len(used) + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(rows.reshape(len(used), stats.num_classes), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(used)), [f"q{q}" for q in used], fontsize=6)
    names = class_names or [str(c) for c in range(stats.num_classes)]
    ax.set_xticks(range(stats.num_classes), names, rotation=90, fontsize=6)
    ax.set(xlabel="category", ylabel="query", title="share of each query's predictions per category")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return fig


def query_examples(predictions: Sequence[Mapping], queries: Sequence[int] | None = None, per_query: int = 3,
                   num_queries: int = 4, prob_threshold: float = 0.5) -> dict[int, list[tuple[int, int, float]]]:
    """query -> [(image index, category, probability)] of images where it is confidently used
    (p_i(c_i) > prob_threshold, c_i not "no object", non-empty mask), one per category first so that
    the examples show the different things a query captures. Default queries: the `num_queries` with
    the most confident uses."""
    uses: dict[int, list[tuple[int, int, float]]] = {}
    for index, p in enumerate(predictions):
        probs = torch.as_tensor(to_numpy(p["pred_logits"]), dtype=torch.float32).softmax(dim=-1)
        prob, label = probs.max(dim=-1)
        nonempty = (to_numpy(p["pred_masks"]) >= 0).reshape(len(prob), -1).any(axis=1)
        for q in np.flatnonzero((label < probs.shape[1] - 1).numpy() & (prob > prob_threshold).numpy() & nonempty):
            uses.setdefault(int(q), []).append((index, int(label[q]), float(prob[q])))
    if queries is None:
        queries = sorted(uses, key=lambda q: -len(uses[q]))[:num_queries]
    examples = {}
    for q in queries:
        ranked = sorted(uses.get(q, []), key=lambda u: -u[2])
        best_per_category: dict[int, tuple[int, int, float]] = {}
        for use in ranked:
            best_per_category.setdefault(use[1], use)
        first = list(best_per_category.values())  # still in decreasing probability
        examples[q] = (first + [u for u in ranked if u not in first])[:per_query]
    return examples


def plot_query_examples(predictions: Sequence[Mapping], examples: Mapping[int, Sequence[tuple[int, int, float]]],
                        class_names: Sequence[str] | None = None) -> Figure:
    """Rows = queries, one panel per example: the image with the query's mask (sigmoid >= 0.5) tinted in
    its category's colour. One axes per example."""
    cols = max((len(v) for v in examples.values()), default=0)
    if cols == 0:
        return _message_figure("no confident query to show (lower prob_threshold in query_examples?)")
    fig = Figure(figsize=(2.2 * cols, 2.3 * len(examples)))
    for r, (q, uses) in enumerate(examples.items()):
        for c, (index, category, prob) in enumerate(uses):
            p = predictions[index]
            num_classes = to_numpy(p["pred_logits"]).shape[1] - 1
            mask = to_numpy(p["pred_masks"])[q] >= 0
            ax = fig.add_subplot(len(examples), cols, r * cols + c + 1)
            ax.imshow(overlay(p["image"], np.where(mask, category, 255), num_classes, alpha=0.6))
            name = class_names[category] if class_names else str(category)
            _bare(ax, f"{name} ({prob:.2f})")
            if c == 0:
                ax.set_ylabel(f"query {q}")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- matching
def plot_matching(cost: Any, assignments: Mapping[str, tuple[Any, Any]] | tuple[Any, Any],
                  row_label: str = "query", col_label: str = "ground-truth segment",
                  col_names: Sequence[str] | None = None) -> Figure:
    """Cost matrix [N, M] as a heat map with the matched (row, col) cells outlined; one panel per named
    assignment, e.g. {"Hungarian": (rows, cols), "fixed": (rows, cols)}, titled with its total cost."""
    cost = to_numpy(cost).astype(np.float64)
    if cost.ndim != 2:
        raise ValueError(f"plot_matching expects a cost matrix [N, M], got shape {cost.shape}")
    if not isinstance(assignments, Mapping):
        assignments = {"matching": assignments}
    fig = Figure(figsize=(max(3.0, 0.35 * cost.shape[1] + 1.5) * len(assignments), max(3.0, 0.25 * cost.shape[0] + 1)))
    axes = np.atleast_1d(fig.subplots(1, len(assignments)))
    for ax, (name, (rows, cols)) in zip(axes, assignments.items()):
        rows, cols = to_numpy(rows).astype(int), to_numpy(cols).astype(int)
        ax.imshow(cost, cmap="magma_r", aspect="auto")
        for r, c in zip(rows, cols):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2))
        ax.set(xlabel=col_label, ylabel=row_label, title=f"{name}: total cost {cost[rows, cols].sum():.2f}")
        if col_names is not None:
            ax.set_xticks(range(cost.shape[1]), col_names, rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


__all__ = ["save_figure", "palette", "colorize", "overlay", "plot_segmentation", "plot_masks_grid", "read_metrics",
           "plot_loss_curves", "LiveLossPlot", "QueryStats", "plot_unique_categories", "plot_query_category_matrix",
           "query_examples", "plot_query_examples", "plot_matching", "collect_predictions", "save_predictions",
           "load_predictions", "to_numpy", "to_rgb", "QueryExplorer"]
