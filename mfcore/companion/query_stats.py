"""The paper's query-to-category statistics (its ablations, "Number of queries", and the figure next to it).

For each query, the number of unique categories it predicts over a dataset, sorted in descending order.
A query "predicts" category c_i = argmax_c p_i(c) on an image when c_i is not "no object", optionally only
if p_i(c_i) > a threshold and its mask {sigmoid(m_i) >= 0.5} is non-empty. Also: the query x category
matrix and examples of what each query captures. All take predictions as `mfcore.companion.predictions` describes
them (collected from a model or loaded from a file); figures are built as in `mfcore.companion.viz`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from mfcore.companion.predictions import to_numpy
from mfcore.companion.viz import bare_axes, to_rgb


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


def _uses(predictions: Sequence[Mapping], prob_threshold: float,
          real_class: bool = False) -> dict[int, list[tuple[int, int, float]]]:
    """query -> [(image index, category, probability)] where its top class is a category (not "no object")
    with p > prob_threshold and its mask is non-empty. real_class: the best category instead of the top class
    (a weak model's queries mostly say "no object": their most likely category is the best there is)."""
    uses: dict[int, list[tuple[int, int, float]]] = {}
    for index, p in enumerate(predictions):
        probs = torch.as_tensor(to_numpy(p["pred_logits"]), dtype=torch.float32).softmax(dim=-1)
        prob, label = (probs[:, :-1] if real_class else probs).max(dim=-1)
        nonempty = (to_numpy(p["pred_masks"]) >= 0).reshape(len(prob), -1).any(axis=1)
        for q in np.flatnonzero((label < probs.shape[1] - 1).numpy() & (prob > prob_threshold).numpy() & nonempty):
            uses.setdefault(int(q), []).append((index, int(label[q]), float(prob[q])))
    return uses


def query_examples(predictions: Sequence[Mapping], queries: Sequence[int] | None = None, per_query: int = 3,
                   num_queries: int = 4, prob_threshold: float = 0.5) -> dict[int, list[tuple[int, int, float]]]:
    """query -> [(image index, category, probability)] of images where it is confidently used
    (p_i(c_i) > prob_threshold, c_i not "no object", non-empty mask), one per category first so that
    the examples show the different things a query captures. Default queries: the `num_queries` with
    the most confident uses; when no query is that confident (a weak model), the queries with the highest
    category probabilities, whatever their value (`plot_query_examples` says so in its title)."""
    uses = _uses(predictions, prob_threshold)
    if queries is None and not uses:
        uses = _uses(predictions, 0.0, real_class=True)
        queries = sorted(uses, key=lambda q: -max(u[2] for u in uses[q]))[:num_queries]
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
                        class_names: Sequence[str] | None = None, prob_threshold: float = 0.5) -> Figure:
    """Rows = queries, one panel per example: the image with the query's mask (sigmoid >= 0.5) outlined in
    white and everything outside it dimmed (a tint would vanish on the scenes' own colours). One axes per example. Examples at or below `prob_threshold` (query_examples' fallback
    for a weak model) are called what they are in the title."""
    cols = max((len(v) for v in examples.values()), default=0)
    if cols == 0:
        return _message_figure("no query has a non-empty mask in these images:\nthe model is too weak to show "
                               "what its queries capture")
    fig = Figure(figsize=(max(2.2 * cols, 4.4), 2.3 * len(examples) + 0.5), layout="constrained")
    weak = all(prob <= prob_threshold for uses in examples.values() for _, _, prob in uses)
    for r, (q, uses) in enumerate(examples.items()):
        for c, (index, category, prob) in enumerate(uses):
            p = predictions[index]
            mask = to_numpy(p["pred_masks"])[q] >= 0
            ax = fig.add_subplot(len(examples), cols, r * cols + c + 1)
            ax.imshow(np.where(mask[..., None], to_rgb(p["image"]), to_rgb(p["image"]) // 4))
            ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)
            name = class_names[category] if class_names else str(category)
            bare_axes(ax, f"{name} (p={prob:.2f})")
            if c == 0:
                ax.set_ylabel(f"query {q}")
    if weak:
        fig.suptitle(f"weak model: no query reaches p > {prob_threshold:g}; its {len(examples)} most confident "
                     f"queries shown", fontsize=9)
    return fig


__all__ = ["QueryStats", "plot_unique_categories", "plot_query_category_matrix", "query_examples",
           "plot_query_examples"]
