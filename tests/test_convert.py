"""Importing released detectron2 checkpoints: the released names are generated here independently of
mfcore's code, from the names in the released `model_final.pkl` files, and must map onto mfcore's state dicts."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from mfcore.cli import main
from mfcore.modeling.models import build_model
from mfcore.presets import get_preset
from mfcore.training.checkpoint import load_checkpoint, state_dict_mismatch
from mfcore.training.convert import convert_checkpoint, read_released, rename_released

BN = ("weight", "bias", "running_mean", "running_var")


def resnet_names(depths, bottleneck: bool, deep_stem: bool = False) -> dict[str, tuple]:
    """detectron2 ResNet: backbone.stem.conv1 (+ .norm.*), backbone.res{2..5}.{j}.conv{c} (+ .norm.*),
    backbone.res{s}.0.shortcut (+ .norm.*) when the block changes the width."""
    names: dict[str, tuple] = {}

    def conv_bn(prefix: str, shape: tuple) -> None:
        names[f"backbone.{prefix}.weight"] = shape
        names.update({f"backbone.{prefix}.norm.{n}": (shape[0],) for n in BN})

    if deep_stem:  # "DeepLab stem": 3x3 convs 3->64->64->128
        conv_bn("stem.conv1", (64, 3, 3, 3)), conv_bn("stem.conv2", (64, 64, 3, 3)), conv_bn("stem.conv3", (128, 64, 3, 3))
        c_in = 128
    else:
        conv_bn("stem.conv1", (64, 3, 7, 7))
        c_in = 64
    for s, (n, w) in enumerate(zip(depths, (64, 128, 256, 512)), start=2):
        out = 4 * w if bottleneck else w
        for j in range(n):
            if j == 0 and c_in != out:
                conv_bn(f"res{s}.0.shortcut", (out, c_in, 1, 1))
            if bottleneck:
                convs = [(w, c_in, 1, 1), (w, w, 3, 3), (out, w, 1, 1)]
            else:
                convs = [(w, c_in, 3, 3), (w, w, 3, 3)]
            for c, shape in enumerate(convs, start=1):
                conv_bn(f"res{s}.{j}.conv{c}", shape)
            c_in = out
    return names


def swin_names(embed: int, depths, heads, window: int) -> dict[str, tuple]:
    """Microsoft's Swin layout as released (downsampling at the *end* of stages 0..2, index buffers stored)."""
    names = {"backbone.patch_embed.proj.weight": (embed, 3, 4, 4), "backbone.patch_embed.proj.bias": (embed,),
             "backbone.patch_embed.norm.weight": (embed,), "backbone.patch_embed.norm.bias": (embed,)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2 ** i
        for j in range(depth):
            p = f"backbone.layers.{i}.blocks.{j}."
            names.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "norm2.weight": (c,),
                          p + "norm2.bias": (c,), p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                          p + "attn.relative_position_index": (window ** 2, window ** 2),
                          p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                          p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                          p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                          p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
        if i < len(depths) - 1:
            p = f"backbone.layers.{i}.downsample."
            names.update({p + "reduction.weight": (2 * c, 4 * c), p + "norm.weight": (4 * c,), p + "norm.bias": (4 * c,)})
        names.update({f"backbone.norm{i}.weight": (c,), f"backbone.norm{i}.bias": (c,)})
    return names


def attention(prefix: str, d: int) -> dict[str, tuple]:
    return {prefix + "in_proj_weight": (3 * d, d), prefix + "in_proj_bias": (3 * d,),
            prefix + "out_proj.weight": (d, d), prefix + "out_proj.bias": (d,)}


def transformer_layer(prefix: str, d: int, ff: int, decoder: bool) -> dict[str, tuple]:
    names = {**attention(prefix + "self_attn.", d), prefix + "linear1.weight": (ff, d), prefix + "linear1.bias": (ff,),
             prefix + "linear2.weight": (d, ff), prefix + "linear2.bias": (d,)}
    if decoder:
        names.update(attention(prefix + "multihead_attn.", d))
    for n in range(1, 4 if decoder else 3):
        names.update({f"{prefix}norm{n}.weight": (d,), f"{prefix}norm{n}.bias": (d,)})
    return names


def head_names(k: int, n: int, channels, conv: int = 256, d: int = 256, ff: int = 2048, dec: int = 6,
               enc: int = 0, memory: int = 3) -> dict[str, tuple]:
    """sem_seg_head.* (pixel decoder stored without "pixel_decoder.") and the loss buffer."""
    names: dict[str, tuple] = {}

    def conv_gn(prefix: str, shape: tuple) -> None:
        names.update({f"sem_seg_head.{prefix}.weight": shape, f"sem_seg_head.{prefix}.norm.weight": (shape[0],),
                      f"sem_seg_head.{prefix}.norm.bias": (shape[0],)})

    for i, c in enumerate(channels[:3], start=1):  # adapter_1 / layer_1 belong to res2
        conv_gn(f"adapter_{i}", (conv, c, 1, 1))
        conv_gn(f"layer_{i}", (conv, conv, 3, 3))
    conv_gn("layer_4", (conv, d if enc else channels[3], 3, 3))
    names.update({"sem_seg_head.mask_features.weight": (conv, conv, 3, 3), "sem_seg_head.mask_features.bias": (conv,)})
    pred = "sem_seg_head.predictor."
    if enc:
        names.update({"sem_seg_head.input_proj.weight": (d, channels[3], 1, 1), "sem_seg_head.input_proj.bias": (d,)})
        for i in range(enc):
            names.update(transformer_layer(f"sem_seg_head.transformer.encoder.layers.{i}.", d, ff, decoder=False))
    else:
        # the decoder's memory: res5 in the paper (index 3); the small presets attend to res3 (index 1)
        names.update({pred + "input_proj.weight": (d, channels[memory], 1, 1), pred + "input_proj.bias": (d,)})
    names[pred + "query_embed.weight"] = (n, d)
    for i in range(dec):
        names.update(transformer_layer(f"{pred}transformer.decoder.layers.{i}.", d, ff, decoder=True))
    names.update({pred + "transformer.decoder.norm.weight": (d,), pred + "transformer.decoder.norm.bias": (d,),
                  pred + "class_embed.weight": (k + 1, d), pred + "class_embed.bias": (k + 1,)})
    for i in range(3):
        names.update({f"{pred}mask_embed.layers.{i}.weight": (conv if i == 2 else d, d),
                      f"{pred}mask_embed.layers.{i}.bias": (conv if i == 2 else d,)})
    names["criterion.empty_weight"] = (k + 1,)
    return names


R50 = (3, 4, 6, 3)
BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)


def _check_full_size(preset: str, released: dict[str, tuple]) -> None:
    with torch.device("meta"):
        model = build_model(preset)
    weights = {k: torch.empty(shape, device="meta") for k, shape in released.items()}
    state, unknown = rename_released(weights, model.backbone, get_preset(preset).model.backbone)
    assert unknown == []
    assert state_dict_mismatch(model.state_dict(), state) == []


def test_released_r50_ade20k_names_all_map():
    released = {**resnet_names(R50, bottleneck=True), **head_names(150, 100, BOTTLENECK_CHANNELS)}
    assert len(released) == 410  # the released MaskFormer R50 ADE20K file has 410 entries
    _check_full_size("ade20k-maskformer-r50", released)


@pytest.mark.parametrize("preset,released", [
    ("ade20k-maskformer-r101c", {**resnet_names((3, 4, 23, 3), True, deep_stem=True),
                                 **head_names(150, 100, BOTTLENECK_CHANNELS)}),
    ("coco-panoptic-maskformer-r50", {**resnet_names(R50, True), **head_names(133, 100, BOTTLENECK_CHANNELS, enc=6)}),
    ("ade20k-maskformer-swin-t", {**swin_names(96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
                                  **head_names(150, 100, (96, 192, 384, 768))}),
])
def test_released_names_of_other_models_map(preset, released):
    _check_full_size(preset, released)


TINY = "synthetic-maskformer-r18"  # real ResNet naming, small head: K=32, N=20, d=64, FFN 256, memory res3


def _tiny_released(rng: np.random.Generator) -> dict[str, np.ndarray]:
    names = {**resnet_names((2, 2, 2, 2), bottleneck=False), **head_names(32, 20, (64, 128, 256, 512), conv=64,
                                                                          d=64, ff=256, memory=1)}
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in names.items()}


def test_convert_cli_places_every_tensor(tmp_path):
    released = _tiny_released(np.random.default_rng(0))
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(pickle.dumps({"model": released, "__author__": "test"}))
    main(["convert-checkpoint", str(pkl), str(tmp_path / "out.pt"), "--preset", TINY, "--allow-pickle"])
    ckpt = load_checkpoint(tmp_path / "out.pt")
    assert ckpt["config"]["preset"] == TINY
    model = build_model(get_preset(TINY).model)
    model.load_state_dict(ckpt["model"])  # strict: every weight present with its shape
    pairs = {
        "backbone.stem.conv1.weight": model.backbone.conv1.weight,
        "backbone.stem.conv1.norm.running_mean": model.backbone.bn1.running_mean,
        "backbone.res3.0.shortcut.norm.running_var": model.backbone.layer2[0].downsample[1].running_var,
        "backbone.res3.0.shortcut.weight": model.backbone.layer2[0].downsample[0].weight,
        "backbone.res5.1.conv2.norm.bias": model.backbone.layer4[1].bn2.bias,
        "sem_seg_head.adapter_1.weight": model.pixel_decoder.adapter_1[0].weight,  # res2's lateral
        "sem_seg_head.layer_4.norm.weight": model.pixel_decoder.layer_4[1].weight,
        "sem_seg_head.mask_features.bias": model.pixel_decoder.mask_features.bias,
        "sem_seg_head.predictor.input_proj.weight": model.predictor.input_proj.weight,
        "sem_seg_head.predictor.transformer.decoder.layers.3.multihead_attn.in_proj_weight":
            model.predictor.transformer.layers[3].multihead_attn.in_proj_weight,
        "sem_seg_head.predictor.transformer.decoder.layers.5.norm3.weight":
            model.predictor.transformer.layers[5].norm3.weight,
        "sem_seg_head.predictor.transformer.decoder.norm.bias": model.predictor.transformer.norm.bias,
        "sem_seg_head.predictor.mask_embed.layers.2.weight": model.predictor.mask_embed.layers[2].weight,
        "sem_seg_head.predictor.class_embed.weight": model.predictor.class_embed.weight,
    }
    for name, tensor in pairs.items():
        assert torch.equal(tensor, torch.from_numpy(released[name])), name
    # every released tensor lands somewhere, unchanged: the multisets of tensor bytes agree
    given = sorted(v.tobytes() for k, v in released.items() if k != "criterion.empty_weight")
    assert given == sorted(v.numpy().tobytes() for k, v in ckpt["model"].items()
                           if not k.endswith("num_batches_tracked"))


def test_convert_reports_unused_and_rejects_wrong_shapes(tmp_path):
    released = _tiny_released(np.random.default_rng(1))
    released["sem_seg_head.extra.weight"] = np.zeros(3, np.float32)
    pkl = tmp_path / "a.pkl"
    pkl.write_bytes(pickle.dumps({"model": released}))
    summary = convert_checkpoint(pkl, tmp_path / "a.pt", TINY, allow_pickle=True)
    assert summary["unexpected"] == ["sem_seg_head.extra.weight"]
    assert summary["skipped"] == ["criterion.empty_weight"]
    released["sem_seg_head.predictor.class_embed.weight"] = np.zeros((5, 64), np.float32)
    pkl.write_bytes(pickle.dumps({"model": released}))
    with pytest.raises(ValueError, match=r"class_embed\.weight: checkpoint \(5, 64\) vs model \(33, 64\)"):
        convert_checkpoint(pkl, tmp_path / "b.pt", TINY, allow_pickle=True)
    assert not (tmp_path / "b.pt").exists()


def test_refuses_to_unpickle_without_permission(tmp_path, capsys):
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(SystemExit) as exc:
        main(["convert-checkpoint", str(pkl), str(tmp_path / "out.pt"), "--preset", TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "arbitrary code" in err and "--allow-pickle" in err
    assert not (tmp_path / "out.pt").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


def test_even_allowed_unpickling_only_rebuilds_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"x": _Exploit()}}))
    with pytest.raises(ValueError, match="not a numpy array type"):
        read_released(pkl, allow_pickle=True)
    assert not (tmp_path / "hacked").exists()
