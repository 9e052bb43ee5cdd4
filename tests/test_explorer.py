"""QueryExplorer without a browser: pixel picking, thresholds, shares of the outputs, widget callbacks,
headless rendering, and the file / checkpoint constructors."""
from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mfcore.companion.explorer import QueryExplorer
from mfcore.companion.predictions import save_predictions
from mfcore.inference import panoptic_inference

K, BIG = 3, 10.0  # classes a, b, c (a is a thing); mask logits +-BIG are ~certain inside / outside


def scene() -> dict:
    """A 4x4 image and five queries (p = e^L / (e^L + 3) for logit L on one class, 0 elsewhere):
    q0: a, p=0.980, mask cols 0-1          q1: b, p=0.948, mask rows 0-1 x cols 2-3
    q2: no object, mask everywhere          q3: c, p=0.711, mask rows 2-3 x col 3
    q4: b, p=0.870, mask cols 0-2 (12 px): it wins only rows 2-3 of col 2 (2 px), elsewhere q0 / q1
        score higher, so it is dropped by the overlap threshold 0.8 (2 < 0.8 * 12).
    """
    logits = np.zeros((5, K + 1), dtype=np.float32)
    for q, (label, high) in enumerate([(0, 5.0), (1, 4.0), (K, 6.0), (2, 2.0), (1, 3.0)]):
        logits[q, label] = high
    masks = np.full((5, 4, 4), -BIG, dtype=np.float32)
    masks[0][:, :2] = BIG
    masks[1][:2, 2:] = BIG
    masks[2][:] = BIG
    masks[3][2:, 3] = BIG
    masks[4][:, :3] = BIG
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    return {"image": image, "pred_logits": logits, "pred_masks": masks, "gt": None, "image_id": "scene"}


def p(high: float) -> float:
    return math.exp(high) / (math.exp(high) + K)


@pytest.fixture
def explorer() -> QueryExplorer:
    return QueryExplorer([scene()], ["a", "b", "c"], thing_ids=[0], interactive=False,
                         object_threshold=0.5, overlap_threshold=0.8)


def test_select_pixel_picks_the_query_owning_the_pixel(explorer):
    assert explorer.state()["kept_queries"] == [0, 1, 3]
    assert explorer.select_pixel(0, 0) == 0 and explorer.state()["pixel_source"] == "panoptic"
    assert explorer.select_pixel(1, 3) == 1
    assert explorer.select_pixel(3, 3) == 3
    # (2, 2) is won by q4 in the argmax, but q4 is dropped: the pixel is VOID in the panoptic output, so
    # the query contributing most to the semantic label there (class b: q4 0.870 vs q1 0.948*sigmoid(-10)) wins
    assert explorer.segmentation[2, 2] == 0
    assert explorer.select_pixel(2, 2) == 4 and explorer.state()["pixel_source"] == "semantic"
    assert explorer.state()["pixel"] == (2, 2) and explorer.state()["query"] == 4
    with pytest.raises(ValueError, match="outside the 4x4 image"):
        explorer.select_pixel(4, 0)


def test_thresholds_change_the_kept_segments(explorer):
    explorer.select_query(3)
    assert explorer.state()["panoptic_status"] == "kept" and explorer.state()["segment_id"] is not None
    explorer.set_thresholds(object_threshold=0.75)  # above q3's p(c) = 0.711
    s = explorer.state()
    assert s["panoptic_status"] == "below object threshold" and s["segment_id"] is None
    assert s["kept_queries"] == [0, 1] and s["panoptic_pixels"] == 0
    # every pixel goes to some kept query, however small its mask there: q0 (the highest score) takes
    # q3's pixels (2, 3), (3, 3), where all masks are ~sigmoid(-10)
    assert explorer.select_pixel(3, 3) == 0 and explorer.state()["pixel_source"] == "panoptic"
    assert explorer.state()["panoptic_pixels"] == 10
    explorer.select_query(4)
    assert explorer.state()["panoptic_status"] == "overlap"
    assert explorer.state()["panoptic_ratio"] == pytest.approx(2 / 12)
    explorer.set_thresholds(overlap_threshold=0.15)  # 2 >= 0.15 * 12: kept now
    assert explorer.state()["panoptic_status"] == "kept" and explorer.state()["panoptic_pixels"] == 2
    explorer.set_thresholds(object_threshold=0.99)
    assert explorer.state()["kept_queries"] == [] and explorer.state()["num_segments"] == 0
    explorer.select_query(2)
    assert explorer.state()["panoptic_status"] == "no object"
    with pytest.raises(ValueError, match="overlap_threshold=1.5"):
        explorer.set_thresholds(overlap_threshold=1.5)


def test_query_shares_of_the_semantic_and_panoptic_outputs(explorer):
    explorer.select_query(0)
    s = explorer.state()
    assert (s["query_class"], s["query_class_name"], s["mask_area"]) == (0, "a", 8)
    assert s["query_prob"] == pytest.approx(p(5.0)) and s["class_probs"].sum() == pytest.approx(1.0)
    assert s["semantic_pixels"] == 8 and s["semantic_share"] == pytest.approx(0.5)  # cols 0-1 are class a
    assert s["panoptic_pixels"] == 8 and s["panoptic_ratio"] == pytest.approx(1.0)
    explorer.select_query(4)  # class b wins (2, 2) and (3, 2) semantically, where q4 contributes most
    assert explorer.state()["semantic_pixels"] == 2


def test_query_ownership_agrees_with_panoptic_inference_on_random_predictions():
    rng = np.random.default_rng(1)
    pred = {"image": rng.integers(0, 255, (12, 10, 3), dtype=np.uint8),
            "pred_logits": (3 * rng.normal(size=(8, 6))).astype(np.float32),
            "pred_masks": (3 * rng.normal(size=(8, 12, 10))).astype(np.float32)}
    ex = QueryExplorer([pred], list("abcde"), thing_ids=[0, 1], interactive=False, object_threshold=0.3,
                       overlap_threshold=0.4)
    segmentation, segments = panoptic_inference(torch.from_numpy(pred["pred_logits"]),
                                                torch.from_numpy(pred["pred_masks"]), [0, 1], 0.3, 0.4)
    assert len(segments) > 0
    assert torch.equal((ex.panoptic_owner >= 0), segmentation > 0)
    for q in ex.state()["kept_queries"]:  # each kept query lies inside one segment of its class
        ids = segmentation[ex.panoptic_owner == q].unique()
        assert len(ids) == 1 and segments[int(ids[0]) - 1]["category_id"] == int(ex.probs[q].argmax())
    # semantic owner: brute force argmax_j p_j(label) * sigmoid(m_j) at every pixel
    probs = torch.from_numpy(pred["pred_logits"]).softmax(-1)
    sig = torch.from_numpy(pred["pred_masks"]).sigmoid()
    label = torch.einsum("nc,nhw->chw", probs[:, :-1], sig).argmax(0)
    for y in range(12):
        for x in range(10):
            assert ex.semantic_owner[y, x] == int((probs[:, label[y, x]] * sig[:, y, x]).argmax())


def test_render_headless_returns_a_figure_without_ipywidgets(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # importing it would fail
    ex = QueryExplorer([scene()], ["a", "b", "c"], interactive=False)
    ex.select_pixel(0, 0)
    fig = ex.render()
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert "no object" in [t.get_text() for t in fig.axes[1].get_yticklabels()]
    with pytest.raises(ValueError, match="expected \\[N=5, K\\+1=3\\]"):
        QueryExplorer([scene()], ["a", "b"], interactive=False)


def test_widget_changes_call_the_methods():
    second = {**scene(), "image_id": "second", "pred_logits": scene()["pred_logits"][[1, 0, 2, 3, 4]]}
    ex = QueryExplorer([scene(), second], ["a", "b", "c"], thing_ids=[0], interactive=True,
                       object_threshold=0.5, overlap_threshold=0.8)
    w = ex.widgets
    w["query"].value = 3
    assert ex.state()["query"] == 3 and ex.renders == 1
    w["object_threshold"].value = 0.75
    assert ex.object_threshold == 0.75 and ex.state()["panoptic_status"] == "below object threshold"
    w["overlap_threshold"].value = 0.3
    assert ex.overlap_threshold == 0.3 and ex.renders == 3
    w["image"].value = 1
    assert ex.state()["image"] == 1 and ex.state()["image_id"] == "second"
    assert ex.state()["query_class"] == 2  # query 3 of the second image
    # a click on the image axes selects the pixel's query and moves the query slider without a second redraw
    fig = ex.render()
    ex._on_click(SimpleNamespace(inaxes=fig.axes[0], xdata=0.2, ydata=1.4))
    assert ex.state()["pixel"] == (1, 0) and w["query"].value == ex.state()["query"] == 0  # q0: b, cols 0-1
    assert ex.renders == 5
    for outside in (None, fig.axes[2]):  # outside the axes, or on another panel: ignored
        ex._on_click(SimpleNamespace(inaxes=outside, xdata=1.0, ydata=1.0))
    assert ex.renders == 5 and ex.state()["pixel"] == (1, 0)


def test_from_file(tmp_path):
    path = save_predictions(tmp_path / "p.npz", [scene()], ["a", "b", "c"], thing_ids=[0])
    ex = QueryExplorer.from_file(path, interactive=False, object_threshold=0.5)
    assert ex.class_names == ["a", "b", "c"] and ex.thing_ids == (0,)
    assert ex.select_pixel(3, 3) == 3 and ex.state()["image_id"] == "scene"


def test_from_checkpoint(tmp_path):
    from mfcore.modeling.models import build_model
    from mfcore.presets import get_preset
    from mfcore.training import checkpoint as ck

    preset = get_preset("synthetic-maskformer-tiny")
    torch.manual_seed(0)
    model = build_model(preset.model)
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"model": model.state_dict(), "iteration": 0,
                              "config": ck.config_dict(preset.name, preset.model, preset.loss, preset.train)})

    class Data:
        class_names, thing_ids = [f"c{i}" for i in range(32)], (0, 1)

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.full((3, 32, 32), 40.0 * i), "sem_seg": torch.zeros(32, 32, dtype=torch.long)}

    ex = QueryExplorer.from_checkpoint(path, Data(), num_images=2, interactive=False)
    assert len(ex.predictions) == 2 and ex.num_queries == 20
    assert ex.object_threshold == preset.train.object_mask_threshold
    model.eval()
    with torch.no_grad():
        logits = model(torch.full((1, 3, 32, 32), 40.0))["pred_logits"][0]
    np.testing.assert_allclose(ex.predictions[1]["pred_logits"], logits.numpy(), atol=1e-5)
    assert isinstance(ex.render(), Figure)
    Data.class_names = Data.class_names[:5]
    with pytest.raises(ValueError, match="predicts 32 classes"):
        QueryExplorer.from_checkpoint(path, Data(), num_images=1, interactive=False)


def test_clicks_on_a_live_figure_select_the_pixel(monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import MouseEvent

    import mfcore.companion.explorer

    monkeypatch.setattr(mfcore.companion.explorer, "_clickable_backend", lambda: True)  # as under %matplotlib widget
    ex = QueryExplorer([scene()], ["a", "b", "c"], interactive=True, object_threshold=0.5)
    try:
        ex._refresh()
        canvas = ex._figure.canvas
        x, y = ex._figure.axes[0].transData.transform((3.0, 1.0))  # data x = column 3, y = row 1
        canvas.callbacks.process("button_press_event", MouseEvent("button_press_event", canvas, x, y, button=1))
        assert ex.state()["pixel"] == (1, 3) and ex.state()["query"] == 1 and ex.widgets["query"].value == 1
        assert len(ex._figure.axes) == 4 and ex.renders == 2  # redrawn in place
    finally:
        plt.close(ex._figure)


def test_a_pixel_selected_before_display_moves_the_query_slider():
    ex = QueryExplorer([scene()], ["a", "b", "c"], thing_ids=[0], interactive=True, object_threshold=0.5)
    assert ex.select_pixel(3, 3) == 3
    assert ex.widgets["query"].value == 3 and ex.renders == 0  # set, not redrawn: display draws once
    ex.select_query(1)
    ex.set_thresholds(object_threshold=0.6)
    assert ex.widgets["query"].value == 1 and ex.widgets["object_threshold"].value == 0.6 and ex.renders == 0


def test_class_names_keep_clear_of_the_image_panel():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = ["a class with a rather long name", "another very long class name indeed", "c"]
    ex = QueryExplorer([scene()], names, interactive=False, object_threshold=0.5)
    fig = ex.render()
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    image_right = fig.axes[0].get_window_extent(renderer).x1
    labels = [t for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert labels and all(t.get_window_extent(renderer).x0 >= image_right for t in labels)
    assert max(len(t.get_text()) for t in labels) <= 22  # long names are cut


def test_a_no_object_query_owning_a_pixel_is_described_as_such():
    """q2 (no object, mask everywhere) is the only query with a mask at (3, 0) once q0 and q4 are gone: it
    contributes most to the semantic label there although its own top class is never a label."""
    pred = scene()
    pred["pred_masks"][0][:] = -BIG
    pred["pred_masks"][4][:] = -BIG
    ex = QueryExplorer([pred], ["a", "b", "c"], thing_ids=[0], interactive=False, object_threshold=0.5)
    assert ex.select_pixel(3, 0) == 2 and ex.state()["pixel_source"] == "semantic"
    s = ex.state()
    assert s["no_object"] and s["query_class_name"] == "no object"
    assert s["owned_pixels"] > 0 and s["owned_classes"]
    title = ex.render().axes[2].get_title()
    assert "no object" in title and "0.0%" not in title and f"{100 * s['owned_share']:.1f}%" in title


def test_widget_backend_only_in_a_notebook_front_end(monkeypatch):
    import matplotlib

    from mfcore.companion import notebook

    backend = matplotlib.get_backend()
    assert notebook.use_widget_backend() is False  # no IPython kernel here: the backend stays
    monkeypatch.setitem(sys.modules, "ipympl", None)
    assert notebook.use_widget_backend() is False
    assert matplotlib.get_backend() == backend
