"""Parity with an independent implementation end to end: a random transformers MaskFormer (its own ResNet-50,
and its MaskFormer Swin-T) saved as a Hugging Face snapshot, converted by `convert-checkpoint`, must give
mfcore's model the same class and mask logits on the same image.

Every norm scale, bias, BatchNorm statistic and Swin bias table is randomised before saving, so a tensor
placed in the wrong slot (or left out, or a q/k/v block in the wrong order) changes the outputs."""
from __future__ import annotations

import json
import os

import pytest
import torch

tf = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

from mfcore.cli import main  # noqa: E402
from mfcore.modeling.models import build_model  # noqa: E402
from mfcore.training.checkpoint import configs_from_checkpoint, load_checkpoint  # noqa: E402
from mfcore.training.convert import convert_checkpoint  # noqa: E402
from mfcore.training.convert_hf import model_config_from_hf  # noqa: E402

PRESETS = {"resnet": "ade20k-maskformer-r50", "swin": "ade20k-maskformer-swin-t"}
STAGES = ["stage1", "stage2", "stage3", "stage4"]
H, W = 64, 96  # not square: a transposed map would not line up


def hf_maskformer(backbone: str, seed: int = 0) -> torch.nn.Module:
    """A small random `MaskFormerForInstanceSegmentation` (K=7, N=5, d=32, 2 decoder layers, FPN 32) on
    transformers' ResNet-50 (bottleneck) or Swin-T, built from config objects only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    bb = tf.ResNetConfig(layer_type="bottleneck", out_features=STAGES) if backbone == "resnet" else \
        tf.MaskFormerSwinConfig(out_features=STAGES)
    # transformers 5 has a MaskFormer copy of DETR's config; 4.x uses DetrConfig itself
    detr_config = getattr(tf, "MaskFormerDetrConfig", None) or tf.DetrConfig
    decoder = detr_config(num_queries=5, decoder_layers=2, d_model=32, decoder_attention_heads=4,
                          decoder_ffn_dim=64, backbone_config=None, use_timm_backbone=False)
    config = tf.MaskFormerConfig(backbone_config=bb, decoder_config=decoder, num_labels=7, fpn_feature_size=32,
                                 mask_feature_size=32)
    model = tf.MaskFormerForInstanceSegmentation(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # state_dict() tensors share storage with the model
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name.startswith("criterion."):
                continue
            if "relative_position_bias_table" in name:
                t.normal_(0, 0.5, generator=g)
            elif t.dim() == 1 and name.endswith((".weight", "running_var")):  # norm scales, variances
                t.uniform_(0.5, 1.5, generator=g)
            elif t.dim() == 1:  # biases, shifts, means
                t.normal_(0, 0.1, generator=g)
    return model


@pytest.fixture(scope="module", params=["resnet", "swin"])
def snapshot(request, tmp_path_factory):
    """(backbone kind, transformers model, its save_pretrained folder)."""
    model = hf_maskformer(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)  # config.json + model.safetensors
    return request.param, model, folder


def _logits(hf: torch.nn.Module, checkpoint) -> tuple:
    """(class, mask) logits of transformers' model and of the converted mfcore model on one image."""
    ckpt = load_checkpoint(checkpoint)
    _, model_cfg, _, _ = configs_from_checkpoint(ckpt)
    model = build_model(model_cfg).eval()
    model.load_state_dict(ckpt["model"])
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1)) * 255  # RGB 0..255
    # transformers takes what its image processor makes (x / 255 - mean) / std; mfcore normalises inside
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = hf(pixel_values=(image / 255 - mean) / std)
        ours = model(image)
    return theirs.class_queries_logits, theirs.masks_queries_logits, ours["pred_logits"], ours["pred_masks"], model


def test_converted_model_matches_transformers(snapshot, tmp_path, capsys):
    kind, hf, folder = snapshot
    torch.set_num_threads(1)
    main(["convert-checkpoint", str(folder), str(tmp_path / "out.pt"), "--preset", PRESETS[kind]])
    assert "unused released names: none" in capsys.readouterr().out
    cls_hf, masks_hf, cls, masks, model = _logits(hf, tmp_path / "out.pt")
    assert cls.shape == cls_hf.shape == (1, 5, 8) and masks.shape == masks_hf.shape == (1, 5, H // 4, W // 4)
    assert (cls - cls_hf).abs().max() < 1e-4
    assert (masks - masks_hf).abs().max() < 1e-4
    assert masks_hf.std() > 0.1  # the comparison is not between near-constant maps
    # a fused tensor: transformers' separate q, k, v are the row blocks of mfcore's in_proj
    attn = hf.model.transformer_module.decoder.layers[1].encoder_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(model.predictor.transformer.layers[1].multihead_attn.in_proj_weight, fused)
    # the config built from transformers' is the one the checkpoint carries
    assert model.cfg == model_config_from_hf(hf.config.to_dict(), PRESETS[kind])


def test_convert_reports_skipped_and_unused(snapshot, tmp_path):
    kind, _, folder = snapshot
    summary = convert_checkpoint(folder, tmp_path / "out.pt", PRESETS[kind])
    assert summary["unexpected"] == []
    assert "criterion.empty_weight" in summary["skipped"]
    if kind == "swin":  # the Swin classifier's final norm is not part of MaskFormer's backbone
        assert "model.pixel_level_module.encoder.model.layernorm.weight" in summary["skipped"]
    assert all(k.endswith(("num_batches_tracked", "relative_position_index", "empty_weight"))
               or ".model.layernorm." in k for k in summary["skipped"])


def test_bin_is_read_with_weights_only(snapshot, tmp_path):
    kind, hf, folder = snapshot
    if kind != "swin":
        pytest.skip("one backbone is enough for the file format")
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    # the names of the modules in memory (o_proj, mlp.fc1), not the legacy ones save_pretrained writes
    torch.save(hf.state_dict(), bin_folder / "pytorch_model.bin")
    convert_checkpoint(bin_folder, tmp_path / "bin.pt", PRESETS[kind])
    convert_checkpoint(folder, tmp_path / "safe.pt", PRESETS[kind])
    from_bin, from_safe = load_checkpoint(tmp_path / "bin.pt")["model"], load_checkpoint(tmp_path / "safe.pt")["model"]
    assert from_bin.keys() == from_safe.keys()
    assert all(torch.equal(from_bin[k], from_safe[k]) for k in from_bin)
    assert len(load_file(folder / "model.safetensors")) == len(hf.state_dict())


def test_sharded_snapshot_converts_as_the_single_file(snapshot, tmp_path, capsys):
    """Hub checkpoints above a size come in shards named by an index's weight_map: safetensors shards, and
    .bin shards, give the checkpoint and the outputs of the single-file snapshot; a missing shard is named."""
    kind, hf, folder = snapshot
    if kind != "resnet":
        pytest.skip("one backbone is enough for the file format")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40MB")  # ~95 MB of weights: 3 shards
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2 and not (sharded / "model.safetensors").exists()
    bins = tmp_path / "bins"  # the same shards as .bin files, as older sharded snapshots hold them
    bins.mkdir()
    (bins / "config.json").write_text((folder / "config.json").read_text())
    as_bin = {s: s.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for s in shards}
    for shard in shards:
        torch.save(load_file(sharded / shard), bins / as_bin[shard])
    (bins / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: as_bin[v] for k, v in weight_map.items()}}))
    convert_checkpoint(folder, tmp_path / "single.pt", PRESETS[kind])
    want = load_checkpoint(tmp_path / "single.pt")["model"]
    _, _, cls_want, masks_want, _ = _logits(hf, tmp_path / "single.pt")
    for source in (sharded, bins):
        summary = convert_checkpoint(source, tmp_path / f"{source.name}.pt", PRESETS[kind])
        assert summary["unexpected"] == []
        got = load_checkpoint(tmp_path / f"{source.name}.pt")["model"]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        _, _, cls, masks, _ = _logits(hf, tmp_path / f"{source.name}.pt")
        assert torch.equal(cls, cls_want) and torch.equal(masks, masks_want)
    (sharded / shards[-1]).unlink()  # a partial download
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exc:
        main(["convert-checkpoint", str(sharded), str(tmp_path / "out.pt"), "--preset", PRESETS[kind]])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"lacks shard {shards[-1]}" in err
    assert not (tmp_path / "out.pt").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


def test_bin_with_objects_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"model.x": _Exploit()}, folder / "pytorch_model.bin")
    with pytest.raises(SystemExit) as exc:
        main(["convert-checkpoint", str(folder), str(tmp_path / "out.pt"), "--preset", PRESETS["swin"]])
    assert exc.value.code == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "hacked").exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("files,expected", [({}, "has no config.json"),
                                            ({"config.json": "{}"}, "model.safetensors or pytorch_model.bin")])
def test_folder_without_snapshot_files(tmp_path, capsys, files, expected):
    folder = tmp_path / "snap"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["convert-checkpoint", str(folder), str(tmp_path / "out.pt"), "--preset", PRESETS["resnet"]])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err and expected in err


@pytest.mark.parametrize("change,field", [
    ({"backbone_config": {"model_type": "resnet", "downsample_in_bottleneck": True}}, "downsample_in_bottleneck"),
    ({"backbone_config": {"model_type": "maskformer-swin", "embed_dim": 64}}, "embed_dim"),
    ({"backbone_config": {"model_type": "resnet"}, "decoder_config": {"auxiliary_loss": True}}, "auxiliary_loss"),
    ({"backbone_config": {"model_type": "timm_backbone"}}, "timm_backbone"),
])
def test_configs_mfcore_cannot_compute_are_refused(change, field):
    with pytest.raises(ValueError, match=field):
        model_config_from_hf(change, PRESETS["resnet"])
