"""Toy-tensor demos of notebook 03 (matching and losses), and their figures and tables.

Everything runs in a fraction of a second on a CPU. Functions return tensors, dicts, pandas DataFrames or
`matplotlib.figure.Figure`s (built without pyplot, like mfcore.companion.viz) and never show anything.

    matching_example                          3 segments, 6 queries: bipartite vs fixed matching
    cost_terms, plot_cost_terms               the class, focal and dice terms of the matching cost
    plot_focal_vs_bce                         focal loss against binary cross-entropy
    dice_cases, dice_table, plot_dice_cases   dice loss on hand-made prediction/target pairs
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from mfcore.companion.teaching import targets_from_map
from mfcore.companion.viz import bare_axes
from mfcore.mask_loss import dice_loss, sigmoid_focal_loss
from mfcore.matcher import HungarianMatcher, assign


def matching_example(seed: int = 0, size: int = 16, num_classes: int = 6) -> dict:
    """K = N = num_classes (so that fixed matching applies) and 3 ground-truth segments of classes 1, 2, 4.

    The queries that predict the segments well are 0 (class 4), 3 (class 1) and 5 (class 2); the
    others say "no object" with weak random masks. Bipartite matching finds the good queries; fixed
    matching must pair segment c with query c, whatever query c predicts.
    Returns "outputs" {"pred_logits": [1, N, K+1], "pred_masks": [1, N, H, W]}, "targets", "sem_seg".
    """
    if num_classes < 6 or size < 8:
        raise ValueError(f"matching_example: expected num_classes >= 6 (queries 0..5 are used) and size >= 8, "
                         f"got num_classes={num_classes}, size={size}")
    g = torch.Generator().manual_seed(seed)
    sem = torch.full((size, size), 1, dtype=torch.int64)
    sem[size // 2:] = 4
    sem[size // 3:size - size // 3, size // 4:size - size // 4] = 2
    owners = {0: 4, 3: 1, 5: 2}
    pred_logits = torch.zeros(num_classes, num_classes + 1)
    pred_masks = torch.randn(num_classes, size, size, generator=g) - 2.0
    for q in range(num_classes):
        c = owners.get(q)
        pred_logits[q, num_classes if c is None else c] = 2.5
        if c is not None:
            pred_masks[q] = 3.0 * (2 * (sem == c).float() - 1) + torch.randn(size, size, generator=g)
    return {"sem_seg": sem, "targets": [targets_from_map(sem)],
            "outputs": {"pred_logits": pred_logits[None], "pred_masks": pred_masks[None]}}


def cost_terms(outputs: dict, targets: list[dict], weights: tuple[float, float, float] = (1.0, 20.0, 1.0),
               image: int = 0) -> dict[str, Tensor]:
    """The weighted terms of the matching cost of one image, each [N, M]: class -p_i(c_j), focal, dice,
    and their sum, each obtained from a HungarianMatcher that weights only that term."""
    names = ("class  -p_i(c_j)", "focal", "dice")
    terms = {}
    for t, (name, w) in enumerate(zip(names, weights)):
        only = [w if i == t else 0.0 for i in range(3)]
        terms[f"{w:g} x {name}"] = HungarianMatcher(*only).cost_matrices(outputs, targets)[image]
    terms["total"] = HungarianMatcher(*weights).cost_matrices(outputs, targets)[image]
    return terms


def plot_cost_terms(terms: dict[str, Tensor], col_names: Sequence[str] | None = None) -> Figure:
    """One annotated heat map per term ([N, M], rows queries, columns segments); the cells of the
    minimum-cost assignment of the last term (the total) are outlined."""
    rows, cols = (x.numpy() for x in assign([list(terms.values())[-1]])[0])
    fig = Figure(figsize=(2.6 * len(terms), 3.6))
    for ax, (name, cost) in zip(fig.subplots(1, len(terms)), terms.items()):
        values = cost.numpy()
        ax.imshow(values, cmap="magma_r", aspect="auto")
        middle = (values.min() + values.max()) / 2
        for (i, j), v in np.ndenumerate(values):  # magma_r is dark at high values: white text there
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > middle else "black")
        for i, j in zip(rows, cols):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2))
        ax.set_title(name, fontsize=9)
        ax.set(xlabel="segment", ylabel="query")
        if col_names is not None:
            ax.set_xticks(range(cost.shape[1]), col_names, fontsize=7)
    fig.tight_layout()
    return fig


def plot_focal_vs_bce(alpha: float = 0.25, gammas: Sequence[float] = (0.0, 1.0, 2.0, 5.0)) -> Figure:
    """Left: loss of one pixel against p_t, the probability given to its true label (target 1), for BCE
    and focal FL = -alpha (1 - p_t)^gamma log p_t (`mfcore.mask_loss.sigmoid_focal_loss`, as the criterion).
    Right: FL / BCE = alpha_t (1 - p_t)^gamma for targets 1 (alpha) and 0 (1 - alpha), log scale."""
    p_t = torch.linspace(0.01, 0.99, 199, dtype=torch.float64)
    logits = torch.logit(p_t)
    ones, zeros = torch.ones_like(p_t), torch.zeros_like(p_t)
    bce = F.binary_cross_entropy_with_logits(logits, ones, reduction="none")
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    x = p_t.numpy()
    left.plot(x, bce.numpy(), "k--", label="BCE")
    for gamma in gammas:
        focal = sigmoid_focal_loss(logits, ones, alpha=alpha, gamma=gamma)
        left.plot(x, focal.numpy(), label=f"focal, gamma={gamma:g}")
        # a negative pixel with p_t = 1 - sigmoid(x): the same curve seen from the other label
        negative = sigmoid_focal_loss(-logits, zeros, alpha=alpha, gamma=gamma)
        line, = right.semilogy(x, (focal / bce).numpy(), label=f"target 1, gamma={gamma:g}")
        right.semilogy(x, (negative / bce).numpy(), ":", color=line.get_color(), label=f"target 0, gamma={gamma:g}")
    left.set(xlabel="p_t (probability of the true label)", ylabel="loss", title=f"alpha={alpha:g}", ylim=(0, 2.5))
    right.set(xlabel="p_t", ylabel="focal / BCE", title="how much each pixel still counts")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _disc(size: int, radius: float, cy: float, cx: float) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2).float()


def dice_cases(size: int = 32) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (mask logits [H, W] (+-6), target [H, W] in {0, 1}): a large (radius 10) and a small
    (radius 3) disc, each predicted perfectly, shifted by 3 pixels, and missed (all "off")."""
    c = size / 2
    cases = {}
    for kind, r in (("large", 10.0), ("small", 3.0)):
        target = _disc(size, r, c, c)
        for how, pred in (("perfect", target), ("shifted 3 px", _disc(size, r, c, c + 3)),
                          ("missed", torch.zeros(size, size))):
            cases[f"{kind}, {how}"] = (6.0 * (2 * pred - 1), target)
    return cases


def dice_table(cases: dict[str, tuple[Tensor, Tensor]]) -> pd.DataFrame:
    """Per case: object pixels, dice loss, mean per-pixel BCE and focal (alpha .25, gamma 2), 20 x focal."""
    rows = []
    for name, (logits, target) in cases.items():
        x, t = logits.flatten()[None], target.flatten()[None]
        focal = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0).mean()
        rows.append({"case": name, "object pixels": int(t.sum()), "dice": float(dice_loss(x, t)[0]),
                     "BCE (mean)": float(F.binary_cross_entropy_with_logits(x, t)), "focal (mean)": float(focal),
                     "20 x focal": 20 * float(focal)})
    return pd.DataFrame(rows).set_index("case")


def plot_dice_cases(cases: dict[str, tuple[Tensor, Tensor]]) -> Figure:
    """One panel per case: target in green, prediction (sigmoid >= 0.5) in red, overlap yellow (a legend says
    so)."""
    from matplotlib.patches import Patch

    fig = Figure(figsize=(1.9 * len(cases), 2.7), layout="constrained")
    for ax, (name, (logits, target)) in zip(np.atleast_1d(fig.subplots(1, len(cases))), cases.items()):
        pred = (logits >= 0).float()
        ax.imshow(torch.stack([pred, target, torch.zeros_like(target)], -1).numpy())
        bare_axes(ax, name, fontsize=8)
    handles = [Patch(color=(1, 1, 0), label="predicted and in the target (overlap)"),
               Patch(color=(0, 1, 0), label="target only (missed pixels)"),
               Patch(color=(1, 0, 0), label="predicted only (false positives)"),
               Patch(facecolor="black", label="neither")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return fig
