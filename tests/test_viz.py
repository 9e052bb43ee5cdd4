"""mfcore.companion.viz, mfcore.query_stats and mfcore.predictions: query statistics on hand-built predictions,
colours, figures, atomic writes, and the pickle-free predictions file."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mfcore.companion import predictions, query_stats, viz
from mfcore.companion.predictions import (
    collect_predictions,
    load_predictions,
    save_predictions,
)
from mfcore.training.run_folder import read_metrics

K = 3  # real classes in the hand-built cases; column K of the logits is "no object"


def logits_for(labels: list[int], high: float = 5.0) -> np.ndarray:
    """[N, K+1] logits: row i has `high` at labels[i] and 0 elsewhere, so p_i(label) = e^high / (e^high + K)."""
    out = np.zeros((len(labels), K + 1), dtype=np.float32)
    out[np.arange(len(labels)), labels] = high
    return out


def masks_for(nonempty: list[bool], size: int = 4) -> np.ndarray:
    """[N, size, size] mask logits: +10 everywhere (non-empty) or -10 everywhere (empty)."""
    return np.stack([np.full((size, size), 10.0 if m else -10.0, dtype=np.float32) for m in nonempty])


def hand_built_images() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three images, three queries.
    image 0: q0 -> class 0, q1 -> class 1, q2 -> no object
    image 1: q0 -> class 2, q1 -> class 1, q2 -> class 0 with an empty mask
    image 2: q0 -> class 1 with p = e/(e+3) = 0.475 (below 0.5), q1 -> no object, q2 -> no object
    """
    return [(logits_for([0, 1, K]), masks_for([True, True, True])),
            (logits_for([2, 1, 0]), masks_for([True, True, False])),
            (logits_for([1, K, K], high=1.0), masks_for([True, True, True]))]


def test_query_stats_counts_hand_built_predictions():
    stats = query_stats.QueryStats(num_queries=3, num_classes=K)
    for logits, masks in hand_built_images():
        stats.update(logits, torch.from_numpy(masks))  # tensors and arrays both accepted
    assert stats.num_images == 3
    np.testing.assert_array_equal(stats.matrix(), [[1, 1, 1], [0, 2, 0], [0, 0, 0]])
    np.testing.assert_array_equal(stats.unique_categories_per_query(), [3, 1, 0])
    # a probability threshold drops image 2's q0 (0.475); counting empty masks adds image 1's q2
    strict = query_stats.QueryStats.from_predictions(
        [{"pred_logits": l, "pred_masks": m} for l, m in hand_built_images()], K, prob_threshold=0.5,
        require_mask=False)
    np.testing.assert_array_equal(strict.matrix(), [[1, 0, 1], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(strict.unique_categories_per_query(), [2, 1, 1])
    stats.matrix()[0, 0] = 99  # matrix() is a copy
    assert stats.counts[0, 0] == 1


def test_query_stats_rejects_wrong_shapes():
    stats = query_stats.QueryStats(num_queries=3, num_classes=K)
    with pytest.raises(ValueError, match="K\\+1=4"):
        stats.update(np.zeros((3, K)), masks_for([True] * 3))
    with pytest.raises(ValueError, match="require_mask"):
        stats.update(logits_for([0, 1, 2]), None)


def test_colorize_is_deterministic_and_marks_ignore_black():
    labels = np.array([[0, 1, 2], [255, 19, 0]])
    a, b = viz.colorize(labels, 20), viz.colorize(torch.from_numpy(labels), 20)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == (2, 3, 3)
    np.testing.assert_array_equal(a[1, 0], [0, 0, 0])
    np.testing.assert_array_equal(a[0, 0], viz.palette(20)[0])
    np.testing.assert_array_equal(a[0, 0], a[1, 2])
    assert len({tuple(c) for c in viz.palette(20)}) == 20  # every class its own colour
    np.testing.assert_array_equal(viz.palette(5), viz.palette(20)[:5])  # a class keeps its colour
    with pytest.raises(ValueError, match="label 20"):
        viz.colorize(np.array([[20]]), 20)


def test_overlay_blends_only_labelled_pixels():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    out = viz.overlay(torch.full((3, 2, 2), 100.0), np.array([[0, 255], [255, 255]]), num_classes=2, alpha=0.5)
    expected = np.round(0.5 * 100 + 0.5 * viz.palette(2)[0].astype(float))
    np.testing.assert_array_equal(out[0, 0], expected)
    np.testing.assert_array_equal(out[1:, :], image[1:, :])


def test_plots_return_figures_with_expected_axes():
    rng = np.random.default_rng(0)
    assert len(viz.plot_masks_grid(rng.random((7, 8, 8)), [f"m{i}" for i in range(7)], ncols=3).axes) == 7
    records = [{"type": "train", "iter": 10, "loss": 3.0}, {"type": "eval", "iter": 10, "mIoU": 5.0},
               {"type": "train", "iter": 20, "loss": 2.0}]
    fig = viz.plot_loss_curves(records, keys=("loss", "mIoU"))
    assert len(fig.axes) == 2
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xydata(), [[10, 3.0], [20, 2.0]])
    with pytest.raises(ValueError, match="iter"):
        viz.plot_loss_curves([{"loss": 1.0}])


def test_query_statistics_plots():
    stats = query_stats.QueryStats(num_queries=3, num_classes=K)
    for logits, masks in hand_built_images():
        stats.update(logits, masks)
    fig = query_stats.plot_unique_categories(stats)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert [p.get_height() for p in fig.axes[0].patches] == [3, 1, 0]  # sorted, descending
    matrix = query_stats.plot_query_category_matrix(stats, ["a", "b", "c"])
    assert len(matrix.axes) == 2  # matrix + colour bar
    # rows: the used queries q0, q1 ordered by their most frequent class, each normalised to sum 1
    np.testing.assert_allclose(matrix.axes[0].images[0].get_array(), [[1 / 3, 1 / 3, 1 / 3], [0, 1, 0]])


def test_query_examples_prefer_distinct_categories():
    rng = np.random.default_rng(0)
    preds = [{"image": rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), "pred_logits": l, "pred_masks": m}
             for l, m in hand_built_images()]
    # image 3: q1 -> class 1 again, more confident than in image 0/1 (high 8 vs 5)
    preds.append({**preds[0], "pred_logits": logits_for([K, 1, K], high=8.0)})
    examples = query_stats.query_examples(preds, per_query=2, prob_threshold=0.5)
    assert list(examples) == [1, 0]  # q1 used 3 times, q0 twice (image 2's q0 is below 0.5)
    assert [(i, c) for i, c, _ in examples[1]] == [(3, 1), (0, 1)]
    assert sorted((i, c) for i, c, _ in examples[0]) == [(0, 0), (1, 2)]
    assert examples[1][0][2] == pytest.approx(math.exp(8) / (math.exp(8) + K))
    fig = query_stats.plot_query_examples(preds, examples, ["a", "b", "c"])
    assert len(fig.axes) == 4


def test_plot_matching_outlines_assignments():
    cost = np.array([[1.0, 5.0], [4.0, 2.0], [0.5, 0.5]])
    fig = viz.plot_matching(cost, {"Hungarian": ([0, 1], [0, 1]), "fixed": ([2, 1], [0, 1])})
    assert len(fig.axes) == 3  # two panels and one colour bar
    assert fig.axes[0].get_title() == "Hungarian\ntotal cost 3.00"
    assert fig.axes[1].get_title() == "fixed\ntotal cost 2.50"
    assert fig.axes[2].get_ylabel().startswith("matching cost")
    assert [(p.get_x(), p.get_y()) for p in fig.axes[1].patches] == [(-0.5, 1.5), (0.5, 0.5)]


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "plots" / "fig.png"
    viz.save_figure(viz.plot_masks_grid(np.zeros((1, 4, 4))), path)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and list(path.parent.iterdir()) == [path]
    fig = viz.plot_masks_grid(np.ones((2, 4, 4)))

    def crash(target, **kwargs):  # a process killed half-way through writing
        target.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", crash)
    with pytest.raises(KeyboardInterrupt):
        viz.save_figure(fig, path)
    assert path.read_bytes() == first and list(path.parent.iterdir()) == [path]
    with pytest.raises(ValueError, match="suffix"):
        viz.save_figure(fig, tmp_path / "nosuffix")


def test_live_loss_plot_draws_only_at_the_end_when_headless():
    live = viz.LiveLossPlot(keys=("loss", "lr"), live=False)
    live.update([{"iter": 1, "loss": 2.0, "lr": 0.1}])
    live.update([{"iter": 1, "loss": 2.0, "lr": 0.1}, {"iter": 2, "loss": 1.0, "lr": 0.1}])
    assert live._handle is None
    fig = live.finish()
    assert len(fig.axes) == 2 and len(fig.axes[0].lines[0].get_xdata()) == 2


def test_live_loss_plot_updates_one_display_in_a_notebook(monkeypatch):
    import IPython.display

    shown, updates = [], []
    handle = SimpleNamespace(update=updates.append)
    monkeypatch.setattr(IPython.display, "display", lambda fig, display_id: shown.append(fig) or handle)
    live = viz.LiveLossPlot(keys=("loss",), live=True)
    live.update([{"iter": 1, "loss": 2.0}])
    live.update([{"iter": 1, "loss": 2.0}, {"iter": 2, "loss": 1.0}])
    final = live.finish()
    assert len(shown) == 1 and updates[-1] is final and len(updates) == 2  # one output, redrawn in place


def test_read_metrics_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 1.5}\n{"iter": 3, "lo')
    assert read_metrics(path) == [{"iter": 1, "loss": 2.0}, {"iter": 2, "loss": 1.5}]


def test_predictions_round_trip_through_npz_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    preds = [{"image": rng.integers(0, 255, (4, 5, 3), dtype=np.uint8), "pred_logits": logits_for([0, 1, K]),
              "pred_masks": rng.normal(size=(3, 4, 5)).astype(np.float32), "gt": rng.integers(0, K, (4, 5)),
              "image_id": "a"},
             {"image": torch.rand(3, 4, 5) * 255, "pred_logits": torch.from_numpy(logits_for([2, 2, 2])),
              "pred_masks": torch.zeros(3, 4, 5), "gt": None, "image_id": "b"}]
    path = save_predictions(tmp_path / "preds.npz", preds, ["a", "b", "c"], thing_ids=[1])
    with np.load(path, allow_pickle=False) as data:  # readable without pickle: no object arrays
        assert all(data[k].dtype != object for k in data.files)
    loaded, meta = load_predictions(path)
    assert meta == {"class_names": ["a", "b", "c"], "thing_ids": [1]}
    assert [p["image_id"] for p in loaded] == ["a", "b"] and loaded[1]["gt"] is None
    for before, after in zip(preds, loaded):
        np.testing.assert_array_equal(after["image"], predictions.to_rgb(before["image"]))
        np.testing.assert_array_equal(after["pred_logits"], predictions.to_numpy(before["pred_logits"]))
        np.testing.assert_array_equal(after["pred_masks"], predictions.to_numpy(before["pred_masks"]))
    np.testing.assert_array_equal(loaded[0]["gt"], preds[0]["gt"])
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not an mfcore predictions file"):
        load_predictions(tmp_path / "other.npz")


class TinyDataset:
    """Two samples: one whose image has the label's size, one whose image was resized by a transform."""
    class_names = [f"c{i}" for i in range(32)]
    thing_ids = (0, 1, 2)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        size = (64, 64) if index == 0 else (32, 48)
        return {"image": torch.rand(3, *size, generator=g) * 255,
                "sem_seg": torch.randint(0, 32, (64, 64), generator=g), "image_id": f"img{index}"}


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from mfcore.modeling.models import build_model
    torch.manual_seed(0)
    return build_model("synthetic-maskformer-tiny")


def test_collect_predictions_matches_the_model_and_restores_its_mode(tiny_model):
    from mfcore.training.evaluate import mask_predictions

    tiny_model.train()
    preds = collect_predictions(tiny_model, TinyDataset(), num_images=5, device="cpu")
    assert tiny_model.training and len(preds) == 2  # capped at the dataset size
    for p in preds:
        assert p["image"].shape == (64, 64, 3) and p["image"].dtype == np.uint8
        assert p["pred_logits"].shape == (20, 33) and p["pred_masks"].shape == (20, 64, 64)
        assert p["gt"].shape == (64, 64)
    tiny_model.eval()
    logits, masks = mask_predictions(tiny_model, TinyDataset()[0]["image"], (64, 64))
    np.testing.assert_allclose(preds[0]["pred_logits"], logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(preds[0]["pred_masks"], masks.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="num_images"):
        collect_predictions(tiny_model, TinyDataset(), num_images=0)


def _text_fits(fig) -> None:
    """Every title and tick label lies inside the figure and no two titles overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    for box in titles:
        assert box.x0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1
    for i, a in enumerate(titles):
        for b in titles[i + 1:]:
            assert not a.overlaps(b), "titles overlap"


def test_matching_titles_fit_with_long_names():
    rng = np.random.default_rng(0)
    fig = viz.plot_matching(rng.random((6, 3)), {"Hungarian": ([0, 3, 5], [2, 0, 1]),
                                                 "fixed (query i = class i)": ([1, 2, 4], [0, 1, 2])},
                            col_names=["class 1", "class 2", "class 4"])
    _text_fits(fig)
    assert [t.get_rotation() for t in fig.axes[0].get_xticklabels()] == [0, 0, 0]  # short names stay level


def test_class_legend_names_the_classes_shown_and_black():
    labels = np.array([[0, 2], [255, 2]])
    classes, ignored = viz.present_classes([labels], 3)
    assert classes == [0, 2] and ignored
    fig = Figure(layout="constrained")
    fig.subplots()
    legend = viz.class_legend(fig, ["sky", "grass", "cow"], classes, ignore=ignored)
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:2] == ["sky", "cow"] and texts[-1].startswith("black: ignore")


def test_table2_trend_ticks_at_the_k_values():
    import pandas as pd

    from mfcore.companion.figures import plot_table2_trend

    frame = pd.DataFrame({"K": [8, 32, 64] * 2, "model": ["A"] * 3 + ["B"] * 3,
                          "paper setting": ["Cityscapes (19 classes)", "ADE20K (150 classes)",
                                            "ADE20K-Full (847 classes)"] * 2,
                          "mIoU ours": [70, 50, 30, 60, 40, 20], "mIoU paper": [80, 45, 17, 78, 42, 14]})
    fig = plot_table2_trend(frame)
    ours, theirs = fig.axes[:2]
    assert [t.get_text() for t in ours.get_xticklabels()] == ["8", "32", "64"]
    assert [t.get_text() for t in theirs.get_xticklabels()] == ["19", "150", "847"]
    assert not ours.xaxis.get_minor_ticks()


def test_query_examples_of_a_weak_model_show_the_most_confident_queries():
    rng = np.random.default_rng(0)
    preds = [{"image": rng.integers(0, 255, (4, 4, 3), dtype=np.uint8),
              "pred_logits": logits_for([K, K, K], high=4.0), "pred_masks": np.full((3, 4, 4), 1.0, np.float32)}]
    preds[0]["pred_logits"][1, 2] = 2.0  # q1's best category: c, still far below "no object"
    assert query_stats.query_examples(preds, prob_threshold=0.5, num_queries=1) == {
        1: [(0, 2, pytest.approx(float(torch.tensor(preds[0]["pred_logits"][1]).softmax(-1)[2])))]}
    fig = query_stats.plot_query_examples(preds, query_stats.query_examples(preds, num_queries=2), ["a", "b", "c"])
    assert "weak model" in fig.get_suptitle() and len(fig.axes) == 2


def test_empty_inference_panels_say_what_the_threshold_left():
    from mfcore.companion.figures import plot_inference_modes

    rng = np.random.default_rng(0)
    pred = {"image": rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), "pred_logits": logits_for([K, K, K]),
            "pred_masks": np.full((3, 4, 4), 1.0, np.float32), "gt": np.zeros((4, 4), np.int64)}
    fig = plot_inference_modes([pred], ["a", "b", "c"], [0])
    assert fig.axes[3].get_title() == "panoptic: 0 segment(s)\nabove threshold 0.8"
    assert "general: 0 class(es)" in fig.axes[2].get_title()
    assert any("nothing kept" in t.get_text() for t in fig.axes[3].texts)


def test_query_examples_outline_the_query_mask_and_dim_the_rest():
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    masks = np.full((1, 4, 4), -5.0, np.float32)
    masks[0, :, :2] = 5.0                                   # the query covers the left half
    preds = [{"image": image, "pred_logits": logits_for([0]), "pred_masks": masks}]
    fig = query_stats.plot_query_examples(preds, {0: [(0, 0, 0.99)]}, ["a", "b", "c"])
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert (shown[:, :2] == 200).all() and (shown[:, 2:] == 50).all()
    assert fig.axes[0].collections                          # the outline
