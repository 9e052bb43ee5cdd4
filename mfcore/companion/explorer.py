"""`QueryExplorer`: look at what one query of MaskFormer contributes to an image's outputs.

For a chosen image and query i (with p_i = softmax of its class logits, m_i its mask logits) it shows
the query's mask, its class distribution p_i, and its share of the two outputs of paper Sec. 3.4:

* semantic inference, label[h, w] = argmax_c sum_j p_j(c) * sigmoid(m_j[h, w]): the query "wins" a pixel
  when the label there is its own class c_i and it contributes most to that class,
  i = argmax_j p_j(label) * sigmoid(m_j);
* panoptic (general) inference: queries with c_i != no-object and p_i(c_i) > object threshold are kept,
  each pixel goes to argmax_i p_i(c_i) * sigmoid(m_i), and a kept query whose won area is below
  overlap threshold x its own area {sigmoid(m_i) >= 0.5} is dropped (its pixels are VOID).

All logic lives in plain methods (`select_image`, `select_query`, `select_pixel`, `set_thresholds`,
`state`, `render`), so it is testable without a browser; the ipywidgets controls (imported only when
`interactive=True`) and the matplotlib click handler are thin wrappers around them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from mfcore.companion.predictions import (
    collect_predictions,
    load_predictions,
    to_numpy,
    to_rgb,
)
from mfcore.companion.viz import colorize, palette
from mfcore.inference import panoptic_inference, panoptic_queries


class QueryExplorer:
    """Interactive (ipywidgets) or static view of one query's role in an image's predictions.

    predictions: dicts with "image" [H, W, 3], "pred_logits" [N, K+1], "pred_masks" [N, H, W] logits
    (see mfcore.predictions); class_names: K names; thing_ids: classes whose queries stay separate
    segments in the panoptic output (the others are stuff and merge per class).
    """

    def __init__(self, predictions: Sequence[Mapping], class_names: Sequence[str], thing_ids: Sequence[int] = (),
                 interactive: bool = True, object_threshold: float = 0.8, overlap_threshold: float = 0.8):
        if len(predictions) == 0:
            raise ValueError("QueryExplorer needs at least one prediction")
        self.class_names, self.thing_ids = list(class_names), tuple(int(t) for t in thing_ids)
        self.num_classes = len(self.class_names)
        self.num_queries = to_numpy(predictions[0]["pred_logits"]).shape[0]
        for i, p in enumerate(predictions):
            logits, masks, image = (to_numpy(p[k]) for k in ("pred_logits", "pred_masks", "image"))
            if logits.shape != (self.num_queries, self.num_classes + 1) or masks.shape[0] != self.num_queries:
                raise ValueError(f"prediction {i}: pred_logits {logits.shape} / pred_masks {masks.shape}, expected "
                                 f"[N={self.num_queries}, K+1={self.num_classes + 1}] / [N, H, W] ({self.num_classes} "
                                 f"class names)")
            if masks.shape[1:] != to_rgb(image).shape[:2]:
                raise ValueError(f"prediction {i}: masks {masks.shape[1:]} must have the image's size {image.shape}")
        self.predictions = list(predictions)
        self.interactive = interactive
        self.object_threshold = _check_threshold("object_threshold", object_threshold)
        self.overlap_threshold = _check_threshold("overlap_threshold", overlap_threshold)
        self._query, self._pixel, self._source = 0, None, None
        self.select_image(0)
        self.widgets: dict[str, Any] = {}
        self._figure: Figure | None = None  # the live figure of a clickable backend
        self._syncing = False
        self.renders = 0  # figures drawn by widget events (tests check that events redraw)
        if interactive:
            self._build_widgets()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_file(cls, path: str | Path, interactive: bool = True, **thresholds: float) -> QueryExplorer:
        """From an .npz written by `mfcore.companion.predictions.save_predictions`."""
        predictions, meta = load_predictions(path)
        return cls(predictions, meta["class_names"], meta["thing_ids"], interactive, **thresholds)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dataset: Any, num_images: int = 8, device: str = "cpu",
                        interactive: bool = True) -> QueryExplorer:
        """Predict the first `num_images` of `dataset` (with .class_names, .thing_ids) with a trained mfcore
        checkpoint; thresholds start at the checkpoint's panoptic settings."""
        from mfcore.training.checkpoint import (
            configs_from_checkpoint,
            load_trained_model,
        )

        model, ckpt = load_trained_model(path)
        _, model_cfg, _, train_cfg = configs_from_checkpoint(ckpt)
        if model_cfg.arch != "maskformer":
            raise ValueError(f"{path}: QueryExplorer needs a MaskFormer checkpoint, got arch={model_cfg.arch!r}")
        if model_cfg.num_classes != len(dataset.class_names):
            raise ValueError(f"{path} predicts {model_cfg.num_classes} classes, the dataset has "
                             f"{len(dataset.class_names)}")
        predictions = collect_predictions(model, dataset, num_images, device)
        return cls(predictions, dataset.class_names, dataset.thing_ids, interactive,
                   train_cfg.object_mask_threshold, train_cfg.overlap_threshold)

    # ------------------------------------------------------------------ logic
    def select_image(self, index: int) -> None:
        """Show image `index`: its semantic output and who wins each pixel there, then its panoptic output."""
        if not 0 <= index < len(self.predictions):
            raise ValueError(f"image index {index} out of range 0..{len(self.predictions) - 1}")
        p = self.predictions[index]
        self._index, self._pixel, self._source = index, None, None
        self._sync_widgets()
        self.class_logits = torch.as_tensor(to_numpy(p["pred_logits"]), dtype=torch.float32)  # [N, K+1]
        self.probs = self.class_logits.softmax(dim=-1)
        self.logits_masks = torch.as_tensor(to_numpy(p["pred_masks"]), dtype=torch.float32)  # [N, H, W]
        masks = self.logits_masks.sigmoid()
        scores = torch.einsum("nc,nhw->chw", self.probs[:, :-1], masks)  # semantic inference [K, H, W]
        self.semantic = scores.argmax(dim=0)  # [H, W]
        # contribution p_j(label[h, w]) * sigmoid(m_j[h, w]) of every query to the winning class
        contribution = self.probs[:, :-1][:, self.semantic] * masks  # [N, H, W]
        self.semantic_owner = contribution.argmax(dim=0)  # [H, W]
        self._panoptic()

    def select_query(self, query: int) -> None:
        if not 0 <= query < self.num_queries:
            raise ValueError(f"query {query} out of range 0..{self.num_queries - 1}")
        self._query, self._pixel, self._source = query, None, None
        self._sync_widgets()

    def set_thresholds(self, object_threshold: float | None = None, overlap_threshold: float | None = None) -> None:
        """Change the object-mask and/or overlap threshold of panoptic inference (None keeps the value)."""
        if object_threshold is not None:
            self.object_threshold = _check_threshold("object_threshold", object_threshold)
        if overlap_threshold is not None:
            self.overlap_threshold = _check_threshold("overlap_threshold", overlap_threshold)
        self._panoptic()
        self._sync_widgets()

    def _panoptic(self) -> None:
        """Panoptic output and, per query, its mask area, pixels won in the argmax and status under the
        current thresholds (`inference.QUERY_STATUSES`: "no object", "below object threshold", "empty",
        "overlap", "kept"), all from `inference.panoptic_queries`, the rules `panoptic_inference` applies."""
        self.segmentation, self.segments = panoptic_inference(
            self.class_logits, self.logits_masks, self.thing_ids, self.object_threshold, self.overlap_threshold)
        queries = panoptic_queries(self.class_logits, self.logits_masks, self.object_threshold, self.overlap_threshold)
        candidates = queries["candidates"]
        owner = torch.full(self.logits_masks.shape[1:], -1, dtype=torch.int64)  # the candidate winning each pixel
        if queries["winner"] is not None:
            owner = candidates[queries["winner"]]
        self.areas = (self.logits_masks.sigmoid() >= 0.5).flatten(1).sum(dim=1)  # [N] own mask area
        self.won = torch.zeros(self.num_queries, dtype=torch.int64)  # [N] pixels won in the argmax
        self.won[candidates] = queries["won"]
        self.status = queries["status"]
        survives = torch.tensor([s == "kept" for s in self.status] + [False])  # index -1 -> False
        self.panoptic_owner = torch.where(survives[owner], owner, -1)  # [H, W], -1 = VOID

    def select_pixel(self, y: int, x: int) -> int:
        """What a click does: select the query owning pixel (y, x) in the panoptic output or, where that is
        VOID, the query contributing most to the semantic label there. Returns the query."""
        height, width = self.semantic.shape
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"pixel (y={y}, x={x}) is outside the {height}x{width} image")
        query, source = int(self.panoptic_owner[y, x]), "panoptic"
        if query < 0:
            query, source = int(self.semantic_owner[y, x]), "semantic"
        self._query, self._pixel, self._source = query, (y, x), source
        self._sync_widgets()  # the query slider shows the query the pixel selected
        return query

    def state(self) -> dict:
        """Everything the panels show, for the current image / query / thresholds."""
        q = self._query
        label = int(self.probs[q].argmax())
        semantic_won = (self.semantic == label) & (self.semantic_owner == q)
        # where q contributes most to the label, whatever that label (a no-object query can: its p(class) is
        # small but its mask may be the only one there)
        owned = self.semantic_owner == q
        owned_classes = [self._name(int(c)) for c in self.semantic[owned].unique()] if owned.any() else []
        segment = self.segmentation[self.panoptic_owner == q]
        return {
            "image": self._index, "image_id": self.predictions[self._index].get("image_id", str(self._index)),
            "query": q, "pixel": self._pixel, "pixel_source": self._source,
            "object_threshold": self.object_threshold, "overlap_threshold": self.overlap_threshold,
            "query_class": label, "query_class_name": self._name(label), "query_prob": float(self.probs[q, label]),
            "class_probs": self.probs[q].numpy().copy(), "mask_area": int(self.areas[q]),
            "semantic_pixels": int(semantic_won.sum()), "semantic_share": float(semantic_won.float().mean()),
            "no_object": label == self.num_classes, "owned_pixels": int(owned.sum()),
            "owned_share": float(owned.float().mean()), "owned_classes": owned_classes,
            "panoptic_status": self.status[q], "panoptic_pixels": int(self.won[q]) if self.status[q] == "kept" else 0,
            "panoptic_ratio": float(self.won[q] / self.areas[q]) if self.areas[q] else float("nan"),
            "segment_id": int(segment[0]) if len(segment) else None,
            "kept_queries": [i for i, s in enumerate(self.status) if s == "kept"], "num_segments": len(self.segments),
        }

    def _name(self, label: int) -> str:
        return self.class_names[label] if label < self.num_classes else "no object"

    # ------------------------------------------------------------------ drawing
    def render(self) -> Figure:
        """A static figure of the current state (what a headless notebook shows)."""
        fig = Figure(figsize=FIGSIZE, layout="constrained")  # class names keep clear of the image panel
        self._draw(fig)
        return fig

    def _semantic_title(self, s: dict) -> str:
        if s["no_object"]:  # its own class is never a semantic label: say what it does contribute
            if not s["owned_pixels"]:
                return f"semantic: top class no object ({s['query_prob']:.2f}); contributes most nowhere"
            classes = ", ".join(s["owned_classes"][:3]) + (", ..." if len(s["owned_classes"]) > 3 else "")
            return (f"semantic: top class no object ({s['query_prob']:.2f}), yet the largest\n"
                    f"contribution at {100 * s['owned_share']:.1f}% of pixels (to {classes})")
        return f"semantic: query wins {100 * s['semantic_share']:.1f}% of pixels"

    def _draw(self, fig: Figure) -> None:
        s, q = self.state(), self._query
        image = to_rgb(self.predictions[self._index]["image"])
        axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1.2, 1, 1]})
        mask = (self.logits_masks[q] >= 0).numpy()[..., None]  # sigmoid >= 0.5
        axes[0].imshow(np.where(mask, 0.5 * image + 0.5 * np.array([255, 215, 0]), image).astype(np.uint8))
        self._outline(axes[0], self.logits_masks[q] >= 0)
        if s["pixel"] is not None:
            axes[0].plot(s["pixel"][1], s["pixel"][0], "w+", markersize=12, markeredgewidth=2)
        axes[0].set_title(f"image {s['image_id']}: query {q} mask ({s['mask_area']} px)", fontsize=9)
        top = np.argsort(-s["class_probs"])[:8][::-1]  # the 8 most likely classes, best on top
        axes[1].barh(range(len(top)), s["class_probs"][top], color="tab:blue")
        axes[1].set_yticks(range(len(top)), [_short(self._name(int(c))) for c in top], fontsize=7)
        axes[1].set_xlim(0, 1)
        axes[1].set_title(f"p(class): {s['query_class_name']} {s['query_prob']:.2f}", fontsize=9)
        axes[2].imshow(colorize(self.semantic.numpy(), self.num_classes))
        owned = self.semantic_owner == q
        self._outline(axes[2], owned if s["no_object"] else owned & (self.semantic == s["query_class"]))
        axes[2].set_title(self._semantic_title(s), fontsize=9)
        axes[3].imshow(self._panoptic_colors())
        self._outline(axes[3], self.panoptic_owner == q)
        axes[3].set_title(f"panoptic: {s['panoptic_status']}\nwon {int(self.won[q])} px (mask {s['mask_area']} px)",
                          fontsize=9)
        for ax in axes[[0, 2, 3]]:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"object threshold {self.object_threshold:.2f}, overlap threshold {self.overlap_threshold:.2f}, "
                     f"{s['num_segments']} segments from queries {s['kept_queries']}", fontsize=9)

    def _panoptic_colors(self) -> np.ndarray:
        """Segments in their class colour, things of one class told apart by brightness; VOID black."""
        colors = np.zeros((len(self.segments) + 1, 3))
        base = palette(self.num_classes).astype(np.float64)
        for n, segment in enumerate(self.segments):
            colors[segment["id"]] = base[segment["category_id"]] * (1.0 - 0.25 * (n % 3) * segment["isthing"])
        return colors[self.segmentation.numpy()].astype(np.uint8)

    @staticmethod
    def _outline(ax: Any, region: torch.Tensor) -> None:
        if region.any() and not region.all():  # contour needs both values present
            ax.contour(region.numpy().astype(np.float32), levels=[0.5], colors="white", linewidths=1.2)

    # ------------------------------------------------------------------ widgets (thin wrappers)
    def _build_widgets(self) -> None:
        import ipywidgets as w

        ids = [str(p.get("image_id", i)) for i, p in enumerate(self.predictions)]
        slider = dict(min=0.0, max=1.0, step=0.01, continuous_update=False)
        self.widgets = {
            "image": w.Dropdown(options=[(name, i) for i, name in enumerate(ids)], value=self._index,
                                description="image"),
            "query": w.IntSlider(value=self._query, min=0, max=self.num_queries - 1, description="query",
                                 continuous_update=False),
            "object_threshold": w.FloatSlider(value=self.object_threshold, description="object thr", **slider),
            "overlap_threshold": w.FloatSlider(value=self.overlap_threshold, description="overlap thr", **slider),
        }
        actions = {"image": self.select_image, "query": self.select_query,
                   "object_threshold": lambda v: self.set_thresholds(object_threshold=v),
                   "overlap_threshold": lambda v: self.set_thresholds(overlap_threshold=v)}
        for name, action in actions.items():
            self.widgets[name].observe(lambda change, act=action: self._on_change(act, change["new"]), names="value")
        self.output = w.Output()
        children = [w.HBox([self.widgets["image"], self.widgets["query"]]),
                    w.HBox([self.widgets["object_threshold"], self.widgets["overlap_threshold"]]), self.output]
        if _clickable_backend():  # e.g. %matplotlib widget: clicks on the image select a pixel
            import matplotlib.pyplot as plt
            with plt.ioff():  # shown once, inside the widget box, not again by pyplot
                # 80 dpi: the four panels fit a notebook's width (ipympl draws at the figure's pixel size)
                self._figure = plt.figure(figsize=FIGSIZE, dpi=80, layout="constrained")
            if hasattr(self._figure.canvas, "header_visible"):  # ipympl's "Figure 1" title bar says nothing here
                self._figure.canvas.header_visible = False
            self._figure.canvas.mpl_connect("button_press_event", self._on_click)
            if isinstance(self._figure.canvas, w.DOMWidget):
                children.append(self._figure.canvas)
        self.widget = w.VBox(children)

    def _on_change(self, action: Any, value: Any) -> None:
        if self._syncing:  # a value set by _sync_widgets, not by the user
            return
        action(value)
        self._refresh()

    def _on_click(self, event: Any) -> None:
        if event.inaxes is None or event.inaxes is not event.inaxes.figure.axes[0]:  # not on the image panel
            return
        self.select_pixel(int(round(event.ydata)), int(round(event.xdata)))
        self._sync_widgets()
        self._refresh()

    def _sync_widgets(self) -> None:
        """Set the controls to the current selection (a pixel chosen in code or by a click moves the query
        slider) without the redraw a user's change makes."""
        widgets = getattr(self, "widgets", None)
        if not widgets:
            return
        self._syncing = True
        try:
            for name, value in (("image", self._index), ("query", self._query),
                                ("object_threshold", self.object_threshold),
                                ("overlap_threshold", self.overlap_threshold)):
                if widgets[name].value != value:
                    widgets[name].value = value
        finally:
            self._syncing = False

    def _refresh(self) -> None:
        self.renders += 1
        if self._figure is not None:
            self._figure.clear()
            self._draw(self._figure)
            self._figure.canvas.draw_idle()
            return
        from IPython.display import display
        self.output.clear_output(wait=True)
        with self.output:
            display(self.render())

    def _ipython_display_(self) -> None:
        from IPython.display import display
        if self.interactive:
            self._sync_widgets()
            display(self.widget)
            self._refresh()
        else:
            display(self.render())


FIGSIZE = (15, 3.8)


def _short(name: str, width: int = 22) -> str:
    """A class name cut to `width` characters for a tick label."""
    return name if len(name) <= width else name[:width - 1] + "\u2026"


def _check_threshold(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value}: expected a value in [0, 1]")
    return float(value)


def _clickable_backend() -> bool:
    """Whether matplotlib's backend delivers mouse events (ipympl, Qt, Tk...; not Agg or inline)."""
    from matplotlib.backends import BackendFilter, backend_registry

    backend = matplotlib.get_backend()
    static = set(backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE))
    return backend.lower() not in static and "inline" not in backend.lower()


__all__ = ["QueryExplorer"]
