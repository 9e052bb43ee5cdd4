"""Model assembly: parameter counts and FLOPs against the paper, output shapes, deep supervision."""
import math

import pytest
import torch

from mfcore.companion.analysis import analyze, count_parameters, semantic_forward
from mfcore.config import LossConfig
from mfcore.losses import build_criterion, total_loss
from mfcore.modeling.models import build_model
from mfcore.modeling.transformer import PositionEmbeddingSine
from mfcore.presets import BACKBONES, DATASETS, MODELS, PRESETS, get_preset


def meta_model(name, **overrides):
    with torch.device("meta"):
        return build_model(get_preset(name).model, **overrides)


# the released models' parameter counts (Table 1 rounds them: R50 41M, R101 60M; Table 3: R50 + 6 Enc 45M):
# within 0.5%
@pytest.mark.parametrize("preset, millions", [
    ("ade20k-maskformer-r50", 41.25), ("ade20k-maskformer-r101", 60.19), ("coco-panoptic-maskformer-r50", 45.01),
    ("ade20k-perpixel-r50", 31.03), ("ade20k-perpixelplus-r50", 41.23)])
def test_parameter_counts_match_the_paper(preset, millions):
    assert count_parameters(meta_model(preset)) / 1e6 == pytest.approx(millions, rel=0.005)


def test_r50_breakdown_matches_the_paper():
    parts = {k: v / 1e6 for k, v in analyze("ade20k-maskformer-r50", flops=False)["params_by_module"].items()}
    assert parts["backbone"] == pytest.approx(23.45, abs=0.01)
    assert parts["pixel_decoder"] == pytest.approx(7.54, abs=0.01)
    assert parts["predictor"] == pytest.approx(10.26, abs=0.01)


@pytest.mark.parametrize("backbone, millions", [("swin-t", 42), ("swin-s", 63), ("swin-b", 102), ("swin-l", 212)])
def test_swin_parameter_counts(backbone, millions):
    assert count_parameters(meta_model(f"ade20k-maskformer-{backbone}")) / 1e6 == pytest.approx(millions, rel=0.02)


# Table 1's FLOPs at the crop size (fvcore's count: one multiply-add = one flop): within 3%
@pytest.mark.parametrize("preset, gflops", [
    ("ade20k-maskformer-r50", 53), ("ade20k-maskformer-r101", 73), ("ade20k-maskformer-r101c", 80),
    ("ade20k-maskformer-swin-t", 55), ("ade20k-maskformer-swin-s", 79), ("ade20k-maskformer-swin-b", 195),
    ("ade20k-maskformer-swin-l", 375)])
def test_flops_match_the_paper(preset, gflops):
    result = analyze(preset)
    expected_size = [640, 640] if preset.endswith(("swin-b", "swin-l")) else [512, 512]
    assert result["size"] == expected_size
    assert result["flops"] / 1e9 == pytest.approx(gflops, rel=0.03)


def test_semantic_forward_equals_per_image_reference(one_thread):
    """Batched, channels-last, pixel-major semantic_forward = upsample each image's masks, then
    einsum("nc,nhw->chw") of class probabilities and mask probabilities."""
    torch.manual_seed(0)
    model = build_model("synthetic-maskformer-r18").eval()
    images = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        scores = semantic_forward(model, images)
        out = model(images)
    masks = torch.nn.functional.interpolate(out["pred_masks"], size=(64, 96), mode="bilinear", align_corners=False)
    expected = torch.stack([torch.einsum("nc,nhw->chw", logits.softmax(-1)[:, :-1], m.sigmoid())
                            for logits, m in zip(out["pred_logits"], masks)])
    torch.testing.assert_close(scores, expected)


def test_aux_masks_are_not_computed_at_inference():
    model = build_model("synthetic-maskformer-tiny").eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert set(out) == {"pred_logits", "pred_masks"}
    model.train()
    out = model(torch.zeros(1, 3, 64, 64))
    assert len(out["aux_outputs"]) == 5 and out["pred_masks"].shape == (1, 20, 16, 16)


def _representative_presets():
    names = [f"{d}-maskformer-r50" for d in DATASETS] + [f"ade20k-{m}-r50" for m in MODELS]
    names += [f"ade20k-maskformer-{b}" for b in BACKBONES]
    return sorted(set(names))


@pytest.mark.parametrize("name", _representative_presets())
def test_output_shapes_of_paper_presets(name):
    preset = get_preset(name)
    model = meta_model(name).train()
    out = model(torch.zeros(2, 3, 64, 96, device="meta"))
    k, n = preset.model.num_classes, preset.model.num_queries
    if preset.model.arch == "maskformer":
        assert out["pred_logits"].shape == (2, n, k + 1) and out["pred_masks"].shape == (2, n, 16, 24)
        assert ("pred_boxes" in out) == preset.model.box_head
    else:
        assert out["sem_seg_logits"].shape == (2, k, 16, 24)
    assert len(out.get("aux_outputs", [])) == (5 if preset.model.arch != "perpixel" else 0)


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("synthetic")))
def test_small_presets_run_forward(name):
    preset = get_preset(name)
    model = build_model(preset.model).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64) * 255)
    key = "pred_masks" if preset.model.arch == "maskformer" else "sem_seg_logits"
    assert out[key].shape[-2:] == (16, 16) and torch.isfinite(out[key]).all()


def test_preset_variants_follow_the_paper():
    assert get_preset("ade20k-maskformer-fixed-r50").model.num_queries == 150
    assert get_preset("ade20k-maskformer-fixed-r50").loss.matcher == "fixed"
    assert get_preset("ade20k-perpixelplus-r50").model.num_queries == 150
    assert get_preset("coco-panoptic-maskformer-r101").model.enc_layers == 6
    assert get_preset("coco-panoptic-maskformer-swin-t").model.enc_layers == 0  # Swin panoptic: plain FPN
    assert get_preset("ade20k-panoptic-maskformer-r50").train.object_mask_threshold == 0.7
    swin = get_preset("ade20k-maskformer-swin-t")
    assert (swin.train.lr, swin.train.weight_decay, swin.train.warmup_iters, swin.model.drop_path) == (6e-5, 0.01, 1500, 0.3)
    assert get_preset("ade20k-maskformer-r50").train.short_sides[:3] == (256, 307, 358)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("ade20k-maskformer-r51")


def test_no_self_attention_variant_has_no_self_attention_weights():
    with_sa = count_parameters(meta_model("ade20k-maskformer-r50"))
    without = meta_model("ade20k-maskformer-r50", self_attention=False)
    assert not any("self_attn" in n for n, _ in without.named_parameters())
    assert with_sa - count_parameters(without) == 6 * (4 * 256 * 256 + 4 * 256 + 2 * 256)


def test_sine_positions_follow_the_formula():
    pos = PositionEmbeddingSine(num_pos_feats=8)(torch.zeros(1, 1, 3, 5))
    h, w, eps = 3, 5, 1e-6
    y, x = 2, 4  # a pixel; normalised coordinates are (index + 1) / size * 2*pi
    y_n, x_n = (y + 1) / (h + eps) * 2 * math.pi, (x + 1) / (w + eps) * 2 * math.pi
    for i in range(8):
        f = math.sin if i % 2 == 0 else math.cos
        t = 10000 ** (2 * (i // 2) / 8)
        assert pos[0, i, y, x].item() == pytest.approx(f(y_n / t), abs=1e-5)
        assert pos[0, 8 + i, y, x].item() == pytest.approx(f(x_n / t), abs=1e-5)


def test_sine_positions_are_kept_per_size_and_batch():
    layer = PositionEmbeddingSine(num_pos_feats=8)
    with torch.inference_mode():
        first = layer(torch.zeros(2, 1, 3, 5)).clone()
    weight = torch.ones((), requires_grad=True)
    (layer(torch.zeros(1, 1, 3, 5)) * weight).sum().backward()  # a training forward may save them for backward
    again = layer(torch.zeros(1, 1, 3, 5, dtype=torch.float64))
    assert again.dtype == torch.float64 and torch.equal(again[0].float(), first[1])
    other = layer(torch.zeros(1, 1, 4, 5))  # another size: computed anew
    assert torch.equal(other, PositionEmbeddingSine(num_pos_feats=8).positions(4, 5, torch.device("cpu")))
    assert not layer._last[1].is_inference()


@pytest.mark.parametrize("name", ["synthetic-maskformer-tiny", "synthetic-perpixelplus-tiny", "synthetic-perpixel-tiny",
                                  "synthetic-maskformer-boxmatch-tiny", "synthetic-maskformer-fixed-tiny"])
def test_gradients_reach_every_trainable_parameter(name):
    torch.manual_seed(0)
    preset = get_preset(name)
    model = build_model(preset.model).train()
    loss_cfg: LossConfig = preset.loss
    criterion = build_criterion(loss_cfg.matcher, preset.model.num_classes, preset.model.num_queries,
                                eos_coef=loss_cfg.eos_coef, dec_layers=preset.model.dec_layers)
    images = torch.rand(2, 3, 64, 64) * 255
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, :32], masks[1, 32:, :40], masks[2, 32:, 40:] = True, True, True
    targets = [{"labels": torch.tensor([0, 3, 5]), "masks": masks}, {"labels": torch.tensor([1]), "masks": masks[:1]}]
    losses = criterion(model(images), targets)
    total_loss(losses, criterion.weight_dict).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # Known and faithful to DETR: the first decoder layer's target is all zeros, so its self-attention
    # values are zero and only the out-projection bias matters; its weights (and norm1's scale, which sees
    # the still-zero bias) get no gradient at this first step.
    first_layer_self_attn = {"predictor.transformer.layers.0.self_attn.in_proj_weight",
                             "predictor.transformer.layers.0.self_attn.out_proj.weight",
                             "predictor.transformer.layers.0.norm1.weight"}
    assert not set(missing) - first_layer_self_attn, f"no gradient reaches {missing}"
