"""Result figures of the notebooks: predictions, the three inference modes side by side, Table 2's trend.

Predictions are the dicts of `mfcore.companion.predictions.collect_predictions` (numpy; masks at image size).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from mfcore.companion.viz import bare_axes, class_legend, colorize, palette, present_classes
from mfcore.inference import (
    general_semantic_inference,
    panoptic_inference,
    semantic_inference,
)


def _semantic(pred: Mapping) -> np.ndarray:
    logits, masks = torch.as_tensor(pred["pred_logits"]), torch.as_tensor(pred["pred_masks"])
    return semantic_inference(logits, masks).argmax(0).numpy()


def plot_predictions(predictions: Sequence[Mapping], class_names: Sequence[str], ignore: int = 255) -> Figure:
    """One row per image: image | semantic prediction | ground truth, and a legend of the classes shown
    (black: the ground truth's ignore label)."""
    k = len(class_names)
    fig = Figure(figsize=(9.8, 2.5 * len(predictions)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(predictions), 3))
    maps = []
    for row, pred in zip(axes, predictions):
        row[0].imshow(pred["image"])
        semantic = _semantic(pred)
        row[1].imshow(colorize(semantic, k, ignore))
        gt = pred.get("gt")
        row[2].imshow(colorize(gt, k, ignore) if gt is not None else np.zeros_like(pred["image"]))
        maps += [semantic] + ([gt] if gt is not None else [])
        middle = "semantic inference"
        if gt is not None and (np.asarray(gt) != ignore).any():  # how good it is, said where a reader looks
            labelled = np.asarray(gt) != ignore
            middle += f"\n{100 * float((semantic == np.asarray(gt))[labelled].mean()):.0f}% of labelled pixels right"
        for ax, title in zip(row, ("image", middle, "ground truth")):
            bare_axes(ax, title)
    classes, ignored = present_classes(maps, k, ignore)
    class_legend(fig, class_names, classes, ignore=ignored)
    return fig


def _panoptic_colors(seg: np.ndarray, segments: list[dict], k: int) -> np.ndarray:
    """Segments coloured by class, instances of one class told apart by brightness; VOID black."""
    out = np.zeros((*seg.shape, 3), np.uint8)
    colors = palette(k).astype(np.float32)
    for n, s in enumerate(segments):
        shade = 1.0 - 0.35 * (n % 3) / 2 if s["isthing"] else 1.0
        out[seg == s["id"]] = (colors[s["category_id"]] * shade).astype(np.uint8)
    return out


def plot_inference_modes(predictions: Sequence[Mapping], class_names: Sequence[str], thing_ids: Sequence[int],
                         general_threshold: float = 0.3, panoptic_threshold: float = 0.8,
                         overlap_threshold: float = 0.8, ignore: int = 255) -> Figure:
    """One row per image: image | semantic | general (Table VII, threshold 0.3) | panoptic | ground truth."""
    k = len(class_names)
    fig = Figure(figsize=(12.5, 2.8 * len(predictions)))
    axes = np.atleast_2d(fig.subplots(len(predictions), 5))
    for row, pred in zip(axes, predictions):
        logits, masks = torch.as_tensor(pred["pred_logits"]), torch.as_tensor(pred["pred_masks"])
        general = general_semantic_inference(logits, masks, general_threshold, overlap_threshold, ignore).numpy()
        seg, segments = panoptic_inference(logits, masks, list(thing_ids), panoptic_threshold, overlap_threshold)
        gt = pred.get("gt")
        panels = [pred["image"], colorize(_semantic(pred), k, ignore), colorize(general, k, ignore),
                  _panoptic_colors(seg.numpy(), segments, k),
                  colorize(gt, k, ignore) if gt is not None else np.zeros_like(pred["image"])]
        kept = len(np.setdiff1d(np.unique(general), [ignore]))
        titles = ["image", "semantic",
                  f"general: {kept} class(es)\nabove threshold {general_threshold}",
                  f"panoptic: {len(segments)} segment(s)\nabove threshold {panoptic_threshold}", "ground truth"]
        empty = [False, False, kept == 0, len(segments) == 0, False]
        for ax, panel, title, nothing in zip(row, panels, titles, empty):
            ax.imshow(panel)
            bare_axes(ax, title)
            if nothing:  # a weak model: no query is confident enough; say so on the (black) panel itself
                ax.text(0.5, 0.5, "nothing kept:\nno query is that\nconfident yet", transform=ax.transAxes,
                        ha="center", va="center", color="white", fontsize=9)
    return fig


def plot_table2_trend(frame: pd.DataFrame) -> Figure:
    """Table 2's trend: ours (mIoU vs K per model) beside the paper's (mIoU vs its dataset's class count)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    fig = Figure(figsize=(10, 3.6))
    ours, theirs = fig.subplots(1, 2)
    ticks: dict = {ours: set(), theirs: set()}
    for model, rows in frame.groupby("model", sort=False):
        ours.plot(rows["K"], rows["mIoU ours"], marker="o", label=model)
        classes = rows["paper setting"].str.extract(r"\((\d+) classes\)")[0].astype(int)
        theirs.plot(classes, rows["mIoU paper"], marker="o", label=model)
        ticks[ours].update(int(k) for k in rows["K"])
        ticks[theirs].update(int(c) for c in classes)
    for ax, title, xlabel in ((ours, "ours (synthetic: K classes)", "K"),
                              (theirs, "paper (datasets)", "classes in the dataset")):
        ax.set_xscale("log")  # ticks at the values used (8 / 32 / 64), not at powers of ten
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted(ticks[ax]), [str(v) for v in sorted(ticks[ax])])
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mIoU")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_learning_curves(curves: Mapping[int, Mapping[str, Sequence[Sequence[dict]]]], metric: str = "mIoU") -> Figure:
    """Val `metric` vs iteration, one panel per K, one colour per model, one line per seed.

    curves[K][model] = [records of one seed's `metrics.jsonl` with "type": "eval", ...]. A curve that is
    still rising at its last point says the run stopped before its plateau."""
    ks = sorted(curves)
    fig = Figure(figsize=(3.6 * len(ks), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(ks), sharey=True))
    colors = {}
    for ax, k in zip(axes, ks):
        for model, seeds in curves[k].items():
            color = colors.setdefault(model, f"C{len(colors)}")
            for i, records in enumerate(seeds):
                points = sorted((r["iter"], r[metric]) for r in records if r.get("type") == "eval" and metric in r)
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, marker="o", markersize=3, color=color, alpha=0.9 if i == 0 else 0.5,
                            label=model if i == 0 else None)
        ax.set_title(f"K = {k}", fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"val {metric}")
    axes[-1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
