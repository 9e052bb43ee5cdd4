"""mfcore.companion.teaching: the notebooks' toy demos checked against hand-computed and brute-force values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from mfcore.companion import teaching, teaching_matching
from mfcore.companion.analysis import count_parameters
from mfcore.inference import semantic_inference
from mfcore.losses import build_criterion, total_loss
from mfcore.matcher import FixedMatcher, HungarianMatcher
from mfcore.modeling.models import build_model


# ----------------------------------------------------------------------------- 01
def test_toy_example_semantic_inference_recovers_the_map_and_matching_is_known():
    toy = teaching.toy_example()
    logits, masks = toy["outputs"]["pred_logits"], toy["outputs"]["pred_masks"]
    assert logits.shape == (1, 4, 4) and masks.shape == (1, 4, 8, 8) and toy["pixel_logits"].shape == (1, 3, 8, 8)
    # the pairs are clean enough that marginalising over them gives the ground truth back ...
    assert torch.equal(semantic_inference(logits[0], masks[0]).argmax(0), toy["sem_seg"])
    # ... while the noisy per-pixel logits get some pixels wrong (the point of the figure's first row)
    assert (toy["pixel_logits"][0].argmax(0) != toy["sem_seg"]).any()
    # segments are sorted by class (sky 0, grass 1, cow 2); query 3 is sky, 2 grass, 0 cow, 1 no object
    rows, cols = HungarianMatcher()(toy["outputs"], toy["targets"])[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 2, 2: 0}


def test_plot_formulations_has_three_rows():
    fig = teaching.plot_formulations(teaching.toy_example())
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 5


def test_ambiguous_scene_against_brute_force():
    demo = teaching.ambiguous_scene(num_classes=8, seed=1, size=32, cell=4)
    design, sem, prim = demo["design"], demo["sem_seg"], demo["primitive"]
    pairs = design.class_primitives
    # every labelled pixel shows one of its class's two primitives, void pixels none
    for (y, x), c in np.ndenumerate(sem):
        assert (prim[y, x] in pairs[c]) if c != 255 else prim[y, x] == -1
    # the local posterior: uniform over the classes containing the pixel's primitive
    y, x = np.argwhere(sem != 255)[0]
    sharing = [k for k, pair in enumerate(pairs) if prim[y, x] in pair]
    expected = np.zeros(8)
    expected[sharing] = 1 / len(sharing)
    np.testing.assert_allclose(demo["probs"][:, y, x].numpy(), expected)
    assert demo["per_pixel"][y, x] in sharing
    # pooling: a region showing both of its primitives gets its own class, the only one with both
    for _, row in demo["regions"].iterrows():
        region = sem == row["class"]
        if len(np.unique(prim[region])) == 2:
            assert row["pooled label"] == row["class"] and row["pooled correct"]
        assert row["classes sharing a"] == sum(row["primitives"][0] in p for p in pairs)
        assert row["per-pixel accuracy"] == pytest.approx((demo["per_pixel"][region] == row["class"]).mean())
    assert isinstance(teaching.plot_ambiguous_scene(demo), Figure)


def test_ambiguity_vs_classes_with_four_classes_on_a_ring():
    table = teaching.ambiguity_vs_classes(class_counts=(4,), scenes=3)
    # K=4 uses P=4 primitives on one ring (0,1),(1,2),(2,3),(3,0): every primitive in exactly 2 classes,
    # so the local classifier is a coin flip between two classes
    assert table.loc[0, "classes per primitive"] == 2.0
    assert table.loc[0, "per-pixel accuracy"] == pytest.approx(0.5, abs=0.15)
    assert table.loc[0, "pooled accuracy"] > 0.9


# ----------------------------------------------------------------------------- 02
def test_shape_table_of_the_small_maskformer():
    model = build_model("synthetic-maskformer-tiny").train()
    table = teaching.shape_table(model, torch.zeros(2, 3, 64, 64))
    shapes = dict(zip(table["output"], table["shape"]))
    assert [shapes[f"res{i}"] for i in (2, 3, 4, 5)] == [[2, 16, 16, 16], [2, 32, 8, 8], [2, 64, 4, 4], [2, 128, 2, 2]]
    strides = table.set_index("output").loc[["res2", "res3", "res4", "res5"], "stride"].tolist()
    assert strides == ["1/4", "1/8", "1/16", "1/32"]
    assert shapes["mask_features"] == [2, 64, 16, 16]
    assert shapes["Q, every layer"] == [6, 2, 20, 64]                  # [L, B, N, d]
    assert shapes["class logits"] == [6, 2, 20, 33]                    # K+1 = 33
    assert shapes["pred_masks"] == [2, 20, 16, 16]
    assert shapes["aux_outputs[0..4].pred_logits"] == [2, 20, 33]
    backbone_params = table.loc[table["module"] == "backbone", "params (M)"].item()
    assert backbone_params == pytest.approx(count_parameters(model.backbone) / 1e6, abs=1e-3)
    assert not model.backbone._forward_hooks                          # hooks removed


@pytest.mark.parametrize("preset", ["synthetic-maskformer-tiny", "synthetic-perpixel-tiny"])
def test_shape_table_shows_mask_features_once_in_eval_mode_too(preset):
    model = build_model(preset).eval()
    table = teaching.shape_table(model, torch.zeros(1, 3, 64, 64))
    outputs = table["output"].tolist()
    assert outputs.count("mask_features") == 1 and outputs.index("mask_features") > outputs.index("memory")
    assert dict(zip(table["output"], table["shape"]))["mask_features"] == [1, 64, 16, 16]


def test_shape_table_of_the_per_pixel_baseline():
    model = build_model("synthetic-perpixel-tiny").eval()
    table = teaching.shape_table(model, torch.zeros(1, 3, 64, 64))
    assert table["module"].tolist()[-1] == "predictor"
    assert table["shape"].tolist()[-1] == [1, 32, 16, 16]             # K per-pixel logits at stride 4


def test_paper_models_table_params_and_paper_column():
    table = teaching.paper_models_table(("ade20k-maskformer-r50", "ade20k-perpixel-r50"), flops=False)
    assert table.loc["ade20k-maskformer-r50", "params (M)"] == pytest.approx(41.25, abs=0.01)
    assert table.loc["ade20k-maskformer-r50", "paper params (M)"] == 41
    assert table.loc["ade20k-perpixel-r50", "paper params (M)"] == 31.03
    assert table.loc["ade20k-maskformer-r50", "crop"] == "512x512"


# ----------------------------------------------------------------------------- 03
def test_matching_example_hungarian_vs_fixed():
    ex = teaching_matching.matching_example()
    rows, cols = HungarianMatcher()(ex["outputs"], ex["targets"])[0]
    assert ex["targets"][0]["labels"].tolist() == [1, 2, 4]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 2, 3: 0, 5: 1}   # the queries built to fit
    fixed_rows, fixed_cols = FixedMatcher()(ex["outputs"], ex["targets"])[0]
    assert fixed_rows.tolist() == [1, 2, 4] and fixed_cols.tolist() == [0, 1, 2]
    total = teaching_matching.cost_terms(ex["outputs"], ex["targets"])["total"]
    assert total[rows, cols].sum() < total[fixed_rows, fixed_cols].sum()


def test_cost_terms_sum_to_the_total_and_class_term_is_minus_p():
    ex = teaching_matching.matching_example()
    terms = teaching_matching.cost_terms(ex["outputs"], ex["targets"])
    parts = [v for k, v in terms.items() if k != "total"]
    torch.testing.assert_close(sum(parts), terms["total"])
    prob = ex["outputs"]["pred_logits"][0].softmax(-1)
    torch.testing.assert_close(terms["1 x class  -p_i(c_j)"], -prob[:, [1, 2, 4]])
    # the focal term is 20 x the per-pixel mean focal loss, brute force for one pair
    logits, target = ex["outputs"]["pred_masks"][0, 0].flatten(), ex["targets"][0]["masks"][2].flatten().float()
    p = logits.sigmoid()
    focal = -(0.25 * target * (1 - p) ** 2 * p.log() + 0.75 * (1 - target) * p ** 2 * (1 - p).log()).mean()
    assert terms["20 x focal"][0, 2].item() == pytest.approx(20 * focal.item(), rel=1e-3)
    fig = teaching_matching.plot_cost_terms(terms, ["c1", "c2", "c4"])
    assert len(fig.axes) == 4 and all(len(ax.patches) == 3 for ax in fig.axes)


def test_focal_with_gamma_zero_is_alpha_times_bce():
    fig = teaching_matching.plot_focal_vs_bce(alpha=0.25, gammas=(0.0, 2.0))
    left = fig.axes[0]
    bce, focal0, focal2 = (np.asarray(line.get_ydata()) for line in left.lines)
    np.testing.assert_allclose(focal0, 0.25 * bce, rtol=1e-5)
    p_t = np.asarray(left.lines[0].get_xdata())
    np.testing.assert_allclose(focal2, 0.25 * (1 - p_t) ** 2 * bce, rtol=1e-4)


def test_dice_cases_by_hand():
    cases = teaching_matching.dice_cases(size=32)
    table = teaching_matching.dice_table(cases)
    logits, target = cases["small, missed"]
    q, t, n = torch.sigmoid(torch.tensor(-6.0)).item(), target.sum().item(), target.numel()
    assert table.loc["small, missed", "dice"] == pytest.approx(1 - (2 * q * t + 1) / (q * n + t + 1), rel=1e-5)
    assert table.loc["small, missed", "BCE (mean)"] == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-5)
    # dice scores a missed object the same whatever its size; the per-pixel mean does not
    assert table.loc["small, missed", "dice"] > 0.9 and table.loc["large, missed", "dice"] > 0.9
    assert table.loc["small, missed", "BCE (mean)"] < table.loc["large, missed", "BCE (mean)"] / 5
    assert table.loc["large, perfect", "dice"] < 0.01
    assert len(teaching_matching.plot_dice_cases(cases).axes) == 6


def test_synthetic_batch_targets_partition_the_labelled_pixels():
    images, targets = teaching.synthetic_batch(num_classes=8, batch_size=2, size=32)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and images.max() <= 255
    for t in targets:
        assert t["masks"].shape[1:] == (32, 32) and len(t["labels"]) == len(t["masks"])
        assert t["masks"].sum(0).max() <= 1                            # one class per pixel
        assert t["labels"].tolist() == sorted(set(t["labels"].tolist()))


def test_loss_table_layers_and_deep_supervision_terms():
    losses = {"loss_ce": torch.tensor(1.0), "loss_mask": torch.tensor(2.0), "loss_ce_0": torch.tensor(3.0),
              "loss_mask_0": torch.tensor(4.0)}
    weights = {"loss_ce": 1.0, "loss_mask": 20.0, "loss_ce_0": 1.0, "loss_mask_0": 20.0}
    table = teaching.loss_table(losses, weights)
    assert table["key"].tolist() == ["loss_ce_0", "loss_mask_0", "loss_ce", "loss_mask"]
    assert table["layer"].tolist() == [1, 1, 2, 2]
    assert table["weighted"].sum() == pytest.approx(1 + 40 + 3 + 80)

    torch.manual_seed(0)
    model = build_model("synthetic-maskformer-tiny", num_classes=8, num_queries=10).train()
    images, targets = teaching.synthetic_batch(num_classes=8, batch_size=1, size=32)
    criterion = build_criterion("hungarian", 8, 10)
    losses = criterion(model(images), targets)
    table = teaching.loss_table(losses, criterion.weight_dict)
    assert len(table) == 18 and table["layer"].max() == 6               # 3 terms x 6 decoder layers
    assert table["weighted"].sum() == pytest.approx(total_loss(losses, criterion.weight_dict).item(), rel=1e-5)
