"""Toy-tensor demos for the teaching notebooks 01-02 (and helpers shared with 03), and their figures and tables.

Everything is small enough for a CPU (paper_models_table builds each paper model on the meta device:
shapes only, no weights or arithmetic). Functions return
tensors, dicts, pandas DataFrames or `matplotlib.figure.Figure`s (built without pyplot, like
mfcore.companion.viz) and never show anything.

    01  toy_example, plot_formulations           one 8x8 image in both formulations
        ambiguous_scene, plot_ambiguous_scene,   why one label per segment helps when K is large
        ambiguity_vs_classes
        plot_scene_designs, separability_table   the scenes the tables train on, and what pooling buys there
    02  shape_table, paper_models_table           shapes through a model; params/FLOPs vs the paper
    01-03  synthetic_batch, loss_table             a batch of synthetic scenes; a criterion's terms as a table
Notebook 03's matching and loss demos are in mfcore.teaching_matching.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from mfcore.companion.viz import bare_axes, class_legend, colorize, present_classes
from mfcore.data import design_classes, render_scene, semantic_targets
from mfcore.inference import semantic_inference

TOY_CLASSES = ("sky", "grass", "cow")


def targets_from_map(sem: Tensor) -> dict:
    labels, masks = semantic_targets(sem, 255)
    return {"labels": labels, "masks": masks}


# ----------------------------------------------------------------------------- 01: the two formulations
def toy_example(seed: int = 0, size: int = 8) -> dict:
    """One size x size image with K=3 classes (sky above grass, a cow across the border), predicted twice:

    - per pixel: "pixel_logits" [1, K, H, W] = 2 * onehot(ground truth) + N(0, 0.8) noise;
    - as N=4 (class, mask) pairs: "outputs" {"pred_logits": [1, 4, K+1], "pred_masks": [1, 4, H, W]};
      query 0 <-> cow, 1 <-> no object, 2 <-> grass, 3 <-> sky, with noisy masks (logits +-4).
    Also "sem_seg" [H, W], "targets" (one {"labels", "masks"} per image) and "class_names".
    """
    if size < 6:
        raise ValueError(f"toy_example: size={size} is too small for the cow; expected >= 6")
    g = torch.Generator().manual_seed(seed)
    sem = torch.zeros(size, size, dtype=torch.int64)
    sem[size // 2:] = 1
    sem[size // 2 - 1:size // 2 + 2, size // 4:size - size // 4] = 2
    k = len(TOY_CLASSES)
    pixel_logits = 2.0 * F.one_hot(sem, k).permute(2, 0, 1).float() + 0.8 * torch.randn(k, size, size, generator=g)
    owners = [2, None, 1, 0]                                    # class each query stands for; None = no object
    pred_logits = torch.zeros(len(owners), k + 1)
    pred_masks = torch.empty(len(owners), size, size)
    for i, c in enumerate(owners):
        pred_logits[i, k if c is None else c] = 3.0
        target = torch.zeros(size, size) if c is None else (sem == c).float()
        pred_masks[i] = 4.0 * (2 * target - 1) + 1.5 * torch.randn(size, size, generator=g)
    return {"class_names": TOY_CLASSES, "sem_seg": sem, "targets": [targets_from_map(sem)],
            "pixel_logits": pixel_logits[None],
            "outputs": {"pred_logits": pred_logits[None], "pred_masks": pred_masks[None]}}


def plot_formulations(toy: dict) -> Figure:
    """Three rows: per-pixel probabilities p(c) and their argmax | the N pairs (sigmoid(m_i), titled with
    argmax p_i) | semantic inference's score maps sum_i p_i(c) sigmoid(m_i) and their argmax."""
    names, k = toy["class_names"], len(toy["class_names"])
    probs = toy["pixel_logits"][0].softmax(0)
    logits, masks = toy["outputs"]["pred_logits"][0], toy["outputs"]["pred_masks"][0]
    scores = semantic_inference(logits, masks)
    p = logits.softmax(-1)
    cols = max(k + 2, len(masks))
    fig = Figure(figsize=(1.7 * cols + 1.6, 5.9), layout="constrained")
    axes = fig.subplots(3, cols)
    for ax in axes.ravel():
        ax.set_axis_off()
    rows = [([colorize(toy["sem_seg"], k)] + [probs[c] for c in range(k)] + [colorize(probs.argmax(0), k)],
             ["ground truth"] + [f"p({n})" for n in names] + ["per-pixel argmax"]),
            ([m.sigmoid() for m in masks],
             [f"q{i}: {(list(names) + ['no object'])[int(p[i].argmax())]} {float(p[i].max()):.2f}"
              for i in range(len(masks))]),
            ([scores[c] for c in range(k)] + [colorize(scores.argmax(0), k)],
             [f"score({n})" for n in names] + ["semantic inference"])]
    for r, (images, titles) in enumerate(rows):
        for ax, image, title in zip(axes[r], images, titles):
            ax.set_axis_on()
            ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=1)
            bare_axes(ax, title, fontsize=8)
    for r, label in enumerate(("per-pixel", "N (p, m) pairs", "marginalised")):
        axes[r, 0].set_ylabel(label, fontsize=9)
    # colour panels use the class palette; grey panels are probabilities (black 0, white 1)
    classes, ignored = present_classes([toy["sem_seg"], probs.argmax(0), scores.argmax(0)], k)
    class_legend(fig, names, classes, ignore=ignored,
                 title="classes\n(grey panels:\nblack 0, white 1)")
    return fig


def ambiguous_scene(num_classes: int = 32, seed: int = 0, size: int = 64, cell: int = 8) -> dict:
    """A stuff-only synthetic scene where every pixel is ambiguous on its own.

    Classes are pairs of primitives {a, b} (mfcore.data.synthetic). A region of class {a, b} is a mosaic
    of cell x cell squares, each showing a or b (one coin per square). The *local* classifier sees one
    primitive q and knows nothing else: p(c | q) is uniform over the classes containing q. Per-pixel
    argmax (ties broken at random per square) picks one of them; pooling p(c | q) over the region's
    mask gives the true class {a, b} twice the evidence of any class sharing one primitive.
    The pooled distributions are fed to `semantic_inference` as N (p_i, m_i) pairs with oracle masks.
    Returns design, sem_seg / primitive / per_pixel / pooled maps [H, W] (255 = void, primitive -1),
    probs [K, H, W], pred_logits [n, K+1], pred_masks [n, H, W], and a per-region DataFrame "regions".
    """
    if cell < 1 or size < cell:
        raise ValueError(f"ambiguous_scene: expected 1 <= cell <= size, got cell={cell}, size={size}")
    design = design_classes(num_classes, num_things=0, seed=0)
    rng = np.random.default_rng(seed)
    _, segments, classes = render_scene(design, rng, size=size, max_things=0)
    sem = np.array([255] + classes)[segments]
    yy, xx = np.mgrid[:size, :size]
    per_row = -(-size // cell)
    square = (yy // cell) * per_row + xx // cell
    coin = rng.integers(0, 2, size=per_row * per_row)[square]
    pairs = np.array(design.class_primitives)
    labelled = sem != 255
    primitive = np.where(labelled, pairs[np.where(labelled, sem, 0), coin], -1)
    contains = np.zeros((design.num_primitives, num_classes))
    contains[pairs[:, 0], np.arange(num_classes)] = contains[pairs[:, 1], np.arange(num_classes)] = 1
    posterior = contains / contains.sum(1, keepdims=True)              # [P, K]: p(c | q)
    probs = np.where(labelled[..., None], posterior[np.maximum(primitive, 0)], 0.0)  # [H, W, K]
    tie_break = rng.uniform(0, 1e-6, size=(per_row * per_row, num_classes))[square]
    per_pixel = np.where(labelled, (probs + tie_break).argmax(-1), 255)
    ids = [j for j in range(1, len(classes) + 1) if (segments == j).any()]
    region = torch.from_numpy(np.stack([segments == j for j in ids]))   # [n, H, W]
    pooled_p = np.stack([probs[segments == j].mean(0) for j in ids])    # [n, K]
    eps = 1e-6                                                          # "no object" gets ~0 probability
    pred_logits = torch.from_numpy(np.log(np.concatenate([pooled_p, np.zeros((len(ids), 1))], 1) + eps)).float()
    pred_masks = torch.where(region, 10.0, -10.0)                      # sigmoid = 1 inside, 0 outside
    scores = semantic_inference(pred_logits, pred_masks)
    pooled = np.where(labelled, scores.argmax(0).numpy(), 255)
    rows = []
    for j, r in zip(ids, region.numpy()):
        c = classes[j - 1]
        a, b = design.class_primitives[c]
        rows.append({"class": c, "primitives": (a, b), "pixels": int(r.sum()),
                     "classes sharing a": int(contains[a].sum()), "classes sharing b": int(contains[b].sum()),
                     "per-pixel accuracy": float((per_pixel[r] == c).mean()),
                     "per-pixel labels": len(np.unique(per_pixel[r])), "pooled label": int(pooled[r][0]),
                     "pooled correct": bool(pooled[r][0] == c)})
    return {"design": design, "sem_seg": sem, "primitive": primitive, "probs": torch.from_numpy(probs).permute(2, 0, 1),
            "per_pixel": per_pixel, "pred_logits": pred_logits, "pred_masks": pred_masks, "pooled": pooled,
            "regions": pd.DataFrame(rows)}


def plot_ambiguous_scene(demo: dict) -> Figure:
    """Primitives seen | ground truth | per-pixel argmax | one label per mask | pooled p of the largest region."""
    k, p = demo["design"].num_classes, demo["design"].num_primitives
    fig = Figure(figsize=(15, 3.2))
    axes = fig.subplots(1, 5)
    prim = np.where(demo["primitive"] < 0, 255, demo["primitive"])
    panels = [(colorize(prim, p), f"what a pixel sees ({p} primitives)"),
              (colorize(demo["sem_seg"], k), f"ground truth ({k} classes)"),
              (colorize(demo["per_pixel"], k), "per-pixel argmax"),
              (colorize(demo["pooled"], k), "one label per mask")]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image)
        bare_axes(ax, title, fontsize=8)
    largest = demo["regions"]["pixels"].idxmax()
    true = int(demo["regions"].loc[largest, "class"])
    pooled = demo["pred_logits"][largest].softmax(-1)[:-1].numpy()
    axes[4].bar(np.arange(k), pooled, color=np.where(np.arange(k) == true, "tab:red", "tab:gray"), width=1.0)
    axes[4].set(xlabel="class", ylabel="mean p(c | q) over the mask")
    axes[4].set_title(f"largest region (class {true}, red)", fontsize=8)
    fig.tight_layout()
    return fig


def ambiguity_vs_classes(class_counts: Sequence[int] = (4, 8, 32, 128), scenes: int = 10,
                         seed: int = 0) -> pd.DataFrame:
    """Pixel accuracy of per-pixel argmax vs one pooled label per mask, over `scenes` scenes per K."""
    rows = []
    for k in class_counts:
        correct_pixel = correct_pooled = total = 0
        for s in range(scenes):
            d = ambiguous_scene(k, seed=seed + s)
            labelled = d["sem_seg"] != 255
            total += int(labelled.sum())
            correct_pixel += int((d["per_pixel"] == d["sem_seg"])[labelled].sum())
            correct_pooled += int((d["pooled"] == d["sem_seg"])[labelled].sum())
        p = d["design"].num_primitives
        rows.append({"K": k, "primitives": p, "classes per primitive": 2 * k / p,
                     "per-pixel accuracy": correct_pixel / total, "pooled accuracy": correct_pooled / total})
    return pd.DataFrame(rows)


def plot_scene_designs(num_classes: int = 32, scenes: int = 6, hue_context: int = 4, seed: int = 0) -> Figure:
    """Sample scenes of the two designs with their label maps: "pairs" (a class = two texture primitives)
    and "hue" (a class = a hue statistic of the segment; the scene's classes hue neighbours)."""
    designs = {"pairs": design_classes(num_classes, round(0.4 * num_classes), seed),
               "hue": design_classes(num_classes, round(0.4 * num_classes), seed, design="hue",
                                     hue_context=hue_context)}
    fig = Figure(figsize=(1.6 * scenes, 6.8))
    axes = fig.subplots(4, scenes)
    for r, (name, design) in enumerate(designs.items()):
        for c in range(scenes):
            image, segments, classes = render_scene(design, np.random.default_rng([seed, 1, c]))
            labels = np.array([255] + classes)[segments]
            axes[2 * r, c].imshow(image)
            axes[2 * r + 1, c].imshow(colorize(labels, num_classes))
            bare_axes(axes[2 * r, c], f"{name}: image" if c == 0 else "")
            bare_axes(axes[2 * r + 1, c], f"{name}: classes" if c == 0 else "")
    fig.suptitle(f"K = {num_classes}: scene designs (labels coloured by class, void black)", fontsize=10)
    fig.tight_layout()
    return fig


def separability_table(class_counts: Sequence[int] = (8, 32, 64), scenes: int = 100, hue_context: int = 4) -> pd.DataFrame:
    """What a class statistic computed over a 9x9 box, over that box among the image's classes, or over the
    whole segment can tell, with no learning (mfcore.data.separability), per K: pixel accuracy and mIoU."""
    from mfcore.data.separability import separability

    rows = []
    for k in class_counts:
        r = separability("hue", k, num_scenes=scenes, boxes=(9,), hue_context=hue_context)
        rows.append({"K": k, **{f"{label} {metric}": r[key][m]
                                for key, label in (("box_9", "9x9 box"), ("box_9_in_image", "9x9 box, image's classes"),
                                                   ("region", "segment"))
                                for metric, m in (("acc", "pixel_acc"), ("mIoU", "mIoU"))}})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- 02: the architecture
STAGES = {"backbone": ("res2", "res3", "res4", "res5"), "pixel_decoder": ("FPN output", "memory"),
          "pixel_decoder.mask_features": ("mask_features",),
          "predictor.input_proj": ("memory projected to d",), "predictor.transformer": ("Q, every layer",),
          "predictor.class_embed": ("class logits",), "predictor.mask_embed": ("mask embeddings",),
          "predictor": None}


def _shapes(label: str, value, names: Sequence[str] | None) -> list[tuple[str, str, list[int]]]:
    """(output name, shape) rows of a module's output: a tensor, a tuple of tensors or a dict."""
    if isinstance(value, Tensor):
        return [(label, names[0] if names else "", list(value.shape))]
    if isinstance(value, dict):
        rows = []
        for key, v in value.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):   # aux_outputs: L-1 dicts alike
                rows += [(label, f"{key}[0..{len(v) - 1}].{n}", s) for _, n, s in _shapes(label, v[0], None)]
            else:
                rows += [(label, key, list(v.shape))]
        return rows
    return [(label, names[i] if names else str(i), list(v.shape)) for i, v in enumerate(value)]


def shape_table(model: nn.Module, images: Tensor) -> pd.DataFrame:
    """Output shape of every stage of `model` on `images` [B, 3, H, W] (forward hooks, call order), its
    stride relative to the image for 4-D maps, and the stage's parameters. Works on the meta device."""
    modules = dict(model.named_modules())
    rows: list[dict] = []

    def record(module, inputs, output, name, names) -> None:
        params = sum(p.numel() for p in module.parameters())
        for i, (_, out, shape) in enumerate(_shapes(name, output, names)):
            stride = f"1/{images.shape[-1] // shape[-1]}" if len(shape) == 4 and shape[0] == len(images) else ""
            rows.append({"module": name if i == 0 else "", "output": out, "shape": shape,
                         "stride": stride, "params (M)": round(params / 1e6, 3) if i == 0 else ""})

    hooks = [modules[name].register_forward_hook(functools.partial(record, name=name, names=names))
             for name, names in STAGES.items() if name in modules]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return pd.DataFrame(rows)


PAPER_MODELS = (*(f"ade20k-maskformer-{b}" for b in ("r50", "r101", "r101c", "swin-t", "swin-s", "swin-b", "swin-l")),
                "ade20k-perpixel-r50", "ade20k-perpixelplus-r50", "coco-panoptic-maskformer-r50")
# The baselines' parameter counts: the released models counted (the paper gives no FLOPs for them).
BASELINE_PARAMS_M = {"ade20k-perpixel-r50": 31.03, "ade20k-perpixelplus-r50": 41.23}
# MaskFormer R50 (150 classes) per module, same source; "predictor" is the paper's transformer module.
R50_PARAMS_BY_MODULE_M = {"backbone": 23.45, "pixel_decoder": 7.54, "predictor": 10.26, "total": 41.25}


def paper_models_table(presets: Sequence[str] = PAPER_MODELS, flops: bool = True) -> pd.DataFrame:
    """Params (M) and FLOPs (G, at the preset's crop) from mfcore.companion.analysis.analyze next to the paper's."""
    from mfcore.companion.analysis import analyze
    from mfcore.companion.paper_numbers import TABLE1, TABLE3

    rows = []
    for name in presets:
        ours = analyze(name, flops=flops)
        paper = TABLE1.get(name) or TABLE3.get(name) or {}
        rows.append({"preset": name, "crop": "x".join(map(str, ours["size"])), "params (M)": ours["params"] / 1e6,
                     "paper params (M)": paper.get("params", BASELINE_PARAMS_M.get(name)),
                     "FLOPs (G)": ours["flops"] / 1e9 if flops else None, "paper FLOPs (G)": paper.get("flops")})
    return pd.DataFrame(rows).set_index("preset")


# ----------------------------------------------------------------------------- shared by 01-03
def synthetic_batch(num_classes: int = 8, batch_size: int = 2, size: int = 64,
                    seed: int = 0) -> tuple[Tensor, list[dict]]:
    """images [B, 3, S, S] float 0..255 of synthetic scenes (mfcore.data.render_scene, a quarter of the
    classes things) and their semantic targets, one {"labels": [n], "masks": [n, S, S]} per image."""
    design = design_classes(num_classes, num_things=num_classes // 4, seed=0)
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(batch_size):
        image, segments, classes = render_scene(design, rng, size=size)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float())
        targets.append(targets_from_map(torch.from_numpy(np.array([255] + classes)[segments])))
    return torch.stack(images), targets


def loss_table(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> pd.DataFrame:
    """One row per loss term of a criterion's output: decoder layer (aux terms "_i" are layer i, the
    unsuffixed ones the last layer), term, value, weight and weighted value; sorted by layer."""
    num_layers = 1 + len({k.rsplit("_", 1)[1] for k in losses if k.rsplit("_", 1)[1].isdigit()})
    rows = []
    for key, value in losses.items():
        base, _, suffix = key.rpartition("_")
        layer, term = (int(suffix) + 1, base) if suffix.isdigit() else (num_layers, key)
        rows.append({"layer": layer, "term": term, "key": key, "value": float(value.detach()),
                     "weight": weight_dict[key], "weighted": weight_dict[key] * float(value.detach())})
    return pd.DataFrame(rows).sort_values(["layer", "term"], kind="stable").reset_index(drop=True)
