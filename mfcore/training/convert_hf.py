"""Import a Hugging Face `transformers` MaskFormer snapshot into an mfcore checkpoint.

A snapshot is a folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`) of
`MaskFormerForInstanceSegmentation`, e.g. what `huggingface-cli download facebook/maskformer-swin-base-ade`
leaves on disk. transformers converted the authors' detectron2 files by renaming and by splitting fused
attention matrices, so going back is the same kind of list (prefixes shortened: `PLM.` is
`model.pixel_level_module.`, `ENC.` is `PLM.encoder.`, `RES.` is `ENC.encoder.stages.`, `SW.` is
`ENC.model.encoder.layers.`, `TM.` is `model.transformer_module.`, `DL.` is `TM.decoder.layers.`):

    transformers                                              mfcore
    ENC.embedder.embedder.convolution / .normalization        backbone.conv1 / backbone.bn1
    RES.{s}.layers.{j}.layer.{c}.convolution / .normalization backbone.layer{s+1}.{j}.conv{c+1} / .bn{c+1}
    RES.{s}.layers.0.shortcut.convolution / .normalization    backbone.layer{s+1}.0.downsample.0 / .1
    ENC.model.embeddings.patch_embeddings.projection / .norm  backbone.patch_embed.proj / .norm
    SW.{i}.blocks.{j}.layernorm_before / layernorm_after      backbone.layers.{i}.blocks.{j}.norm1 / norm2
    SW.{i}.blocks.{j}.attention.self.{query,key,value}        backbone.layers.{i}.blocks.{j}.attn.qkv (rows q; k; v)
    SW.{i}.blocks.{j}.attention.self.relative_position_bias_table   ...attn.relative_position_bias_table
    SW.{i}.blocks.{j}.attention.output.dense                  backbone.layers.{i}.blocks.{j}.attn.proj
    SW.{i}.blocks.{j}.intermediate.dense / output.dense       backbone.layers.{i}.blocks.{j}.mlp.fc1 / mlp.fc2
    SW.{i}.downsample                                         backbone.layers.{i+1}.downsample
    ENC.hidden_states_norms.{i}                               backbone.norm{i}
    PLM.decoder.fpn.stem.{0,1}                                pixel_decoder.layer_4.{0,1}
    PLM.decoder.fpn.layers.{t}.proj / .block                  pixel_decoder.adapter_{3-t} / layer_{3-t}
    PLM.decoder.mask_projection                               pixel_decoder.mask_features
    TM.input_projection / TM.queries_embedder                 predictor.input_proj / predictor.query_embed
    DL.{l}.self_attn.{q,k,v}_proj                             predictor.transformer.layers.{l}.self_attn.in_proj_*
    DL.{l}.encoder_attn.{q,k,v}_proj                          predictor.transformer.layers.{l}.multihead_attn.in_proj_*
    DL.{l}.self_attn.out_proj / encoder_attn.out_proj         ...layers.{l}.self_attn.out_proj / multihead_attn.out_proj
    DL.{l}.{self_attn,encoder_attn,final}_layer_norm          predictor.transformer.layers.{l}.norm1 / norm2 / norm3
    DL.{l}.fc1 / fc2                                          predictor.transformer.layers.{l}.linear1 / linear2
    TM.decoder.layernorm                                      predictor.transformer.norm
    class_predictor / mask_embedder.{i}.0                     predictor.class_embed / predictor.mask_embed.layers.{i}
    (skipped) criterion.empty_weight, *.num_batches_tracked, *.relative_position_index, ENC.model.layernorm.*

Files that transformers writes store the decoder's `out_proj` / `fc1` / `fc2` under these legacy names;
its modules in memory call them `o_proj` / `mlp.fc1` / `mlp.fc2`. Both spellings are read.
Weights are read without unpickling: `safetensors` for `.safetensors`, `torch.load(weights_only=True)` for
`.bin`. Large hub checkpoints are sharded: `model.safetensors.index.json` (or `pytorch_model.bin.index.json`)
maps every tensor name to one of several files (`model-00001-of-00002.safetensors`, ...), read the same way.
`model_config_from_hf` turns `config.json` into the mfcore ModelConfig of the same network, and refuses settings
that would make the two compute different functions (no renaming could fix those).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from mfcore.config import ModelConfig, override
from mfcore.modeling.backbones import SWIN_SPECS
from mfcore.modeling.models import build_model
from mfcore.presets import get_preset
from mfcore.training.convert import apply_rules, save_converted

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # read in this order
ENCODER = "model.pixel_level_module.encoder."
# names that are not weights of mfcore's model: the loss's class weights, BatchNorm's step counter (mfcore's
# BN is frozen), the Swin index table (recomputed from the window size), and the final LayerNorm of
# transformers' Swin classifier, which MaskFormer's backbone never applies (it uses norm0..norm3)
SKIPPED = re.compile(r"^criterion\.empty_weight$|\.num_batches_tracked$|\.relative_position_index$|"
                     + re.escape(ENCODER) + r"model\.layernorm\.")

_DEC = r"^model\.transformer_module\.decoder\.layers\.(\d+)\."
_FPN = r"^model\.pixel_level_module\.decoder\."
HEAD_RULES = [
    (_FPN + r"fpn\.stem\.", "pixel_decoder.layer_4."),
    # fpn.layers run top-down: layers.0 fuses res4 (adapter_3 / layer_3), layers.2 res2 (adapter_1 / layer_1)
    (_FPN + r"fpn\.layers\.(\d)\.proj\.", lambda m: f"pixel_decoder.adapter_{3 - int(m[1])}."),
    (_FPN + r"fpn\.layers\.(\d)\.block\.", lambda m: f"pixel_decoder.layer_{3 - int(m[1])}."),
    (_FPN + r"mask_projection\.", "pixel_decoder.mask_features."),
    (r"^model\.transformer_module\.input_projection\.", "predictor.input_proj."),
    (r"^model\.transformer_module\.queries_embedder\.", "predictor.query_embed."),
    (r"^model\.transformer_module\.decoder\.layernorm\.", "predictor.transformer.norm."),
    (_DEC + r"self_attn\.(?:out|o)_proj\.", r"predictor.transformer.layers.\1.self_attn.out_proj."),
    (_DEC + r"encoder_attn\.(?:out|o)_proj\.", r"predictor.transformer.layers.\1.multihead_attn.out_proj."),
    (_DEC + r"self_attn_layer_norm\.", r"predictor.transformer.layers.\1.norm1."),
    (_DEC + r"encoder_attn_layer_norm\.", r"predictor.transformer.layers.\1.norm2."),
    (_DEC + r"final_layer_norm\.", r"predictor.transformer.layers.\1.norm3."),
    (_DEC + r"(?:mlp\.)?fc1\.", r"predictor.transformer.layers.\1.linear1."),
    (_DEC + r"(?:mlp\.)?fc2\.", r"predictor.transformer.layers.\1.linear2."),
    (r"^class_predictor\.", "predictor.class_embed."),
    (r"^mask_embedder\.(\d)\.0\.", r"predictor.mask_embed.layers.\1."),
]
# transformers' ResNet (without the ENCODER prefix) -> timm/torchvision ResNet (without "backbone.")
RESNET_RULES = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
]
_BLOCK = r"^model\.encoder\.layers\.(\d)\.blocks\.(\d+)\."
# transformers' MaskFormer Swin (without the ENCODER prefix) -> timm's Swin (without "backbone.")
SWIN_RULES = [
    (r"^model\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^model\.embeddings\.norm\.", "patch_embed.norm."),
    (_BLOCK + r"layernorm_before\.", r"layers.\1.blocks.\2.norm1."),
    (_BLOCK + r"layernorm_after\.", r"layers.\1.blocks.\2.norm2."),
    (_BLOCK + r"attention\.self\.relative_position_bias_table$",
     r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (_BLOCK + r"attention\.output\.dense\.", r"layers.\1.blocks.\2.attn.proj."),
    (_BLOCK + r"intermediate\.dense\.", r"layers.\1.blocks.\2.mlp.fc1."),
    (_BLOCK + r"output\.dense\.", r"layers.\1.blocks.\2.mlp.fc2."),
    # patch merging closes stage i in transformers (as in Microsoft's code) and opens stage i+1 in timm
    (r"^model\.encoder\.layers\.(\d)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample."),
    (r"^hidden_states_norms\.(\d)\.", r"norm\1."),
]
# the q, k, v projections are three matrices in transformers and row blocks q; k; v of one fused matrix in
# mfcore (nn.MultiheadAttention's in_proj, timm's qkv): (pattern, fused name, the group naming the part)
QKV = {"q": 0, "k": 1, "v": 2, "query": 0, "key": 1, "value": 2}
HEAD_QKV = [(_DEC + r"self_attn\.(q|k|v)_proj\.(weight|bias)$",
             r"predictor.transformer.layers.\1.self_attn.in_proj_\3"),
            (_DEC + r"encoder_attn\.(q|k|v)_proj\.(weight|bias)$",
             r"predictor.transformer.layers.\1.multihead_attn.in_proj_\3")]
SWIN_QKV = [(_BLOCK + r"attention\.self\.(query|key|value)\.(weight|bias)$", r"layers.\1.blocks.\2.attn.qkv.\4")]

# transformers' defaults for fields that config.json leaves out (it stores only values that differ)
DETR_DEFAULTS = dict(num_queries=100, decoder_layers=6, d_model=256, decoder_attention_heads=8,
                     decoder_ffn_dim=2048, dropout=0.1, activation_function="relu", auxiliary_loss=False)
RESNET_DEFAULTS = dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                       layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
                       downsample_in_bottleneck=False)
SWIN_DEFAULTS = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, patch_size=4,
                     mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu", use_absolute_embeddings=False,
                     layer_norm_eps=1e-5)
RESNET_DEPTHS = {(3, 4, 6, 3): "r50", (3, 4, 23, 3): "r101"}


def _qkv_part(rules: list, name: str) -> tuple[str, int] | None:
    """(fused mfcore name, row block 0/1/2) of a q/k/v projection, or None."""
    for pattern, fused in rules:
        m = re.match(pattern, name)
        if m:
            part = next(QKV[g] for g in m.groups() if g in QKV)
            return m.expand(fused), part
    return None


def rename_hf(weights: dict[str, Tensor], backbone: str) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """transformers names -> mfcore names for a model with backbone `backbone` (r50, r101, swin-*).

    Returns (mfcore state dict, transformers names no rule covers, names skipped on purpose).
    """
    backbone_rules = (SWIN_RULES, SWIN_QKV) if backbone.startswith("swin") else (RESNET_RULES, [])
    out, unknown, skipped = {}, [], []
    parts: dict[str, dict[int, Tensor]] = {}  # fused name -> {row block: tensor}
    for name, value in weights.items():
        if SKIPPED.search(name):
            skipped.append(name)
            continue
        if name.startswith(ENCODER):  # backbone rules see names without the prefix, as in convert.py
            local, prefix, (rules, qkv_rules) = name.removeprefix(ENCODER), "backbone.", backbone_rules
        else:
            local, prefix, rules, qkv_rules = name, "", HEAD_RULES, HEAD_QKV
        new = apply_rules(rules, local)
        qkv = _qkv_part(qkv_rules, local) if new is None else None
        if new is not None:
            out[prefix + new] = value
        elif qkv is not None:
            parts.setdefault(prefix + qkv[0], {})[qkv[1]] = value
        else:
            unknown.append(name)
    for fused, blocks in parts.items():
        if sorted(blocks) != [0, 1, 2]:
            raise ValueError(f"{fused}: the file holds only the {[('q', 'k', 'v')[i] for i in sorted(blocks)]} "
                             "projection(s) of this attention; expected q, k and v")
        out[fused] = torch.cat([blocks[0], blocks[1], blocks[2]])
    return out, unknown, skipped


def _fields(section: dict, defaults: dict) -> dict:
    return {k: section.get(k, v) for k, v in defaults.items()}


def _backbone_name(backbone: dict) -> str:
    """mfcore's name of the backbone described by config.json's backbone_config; ValueError if mfcore has
    no backbone that computes the same function."""
    kind = backbone.get("model_type")
    if kind == "resnet":
        r = _fields(backbone, RESNET_DEFAULTS)
        depths = tuple(r["depths"])
        # mfcore's ResNets are detectron2's: stride in the 3x3 conv (MaskFormer's STRIDE_IN_1X1: False),
        # no stride in res2, a 7x7 stem of 64 channels, ReLU; anything else is another network
        wanted = dict(layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
                      downsample_in_bottleneck=False, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048])
        for key, value in wanted.items():
            if r[key] != value:
                raise ValueError(f"backbone_config.{key}={r[key]!r}: mfcore's ResNets need {value!r}")
        if depths not in RESNET_DEPTHS:
            raise ValueError(f"backbone_config.depths={list(depths)}: mfcore has ResNets of depths "
                             f"{[list(d) for d in RESNET_DEPTHS]} (r50, r101)")
        return RESNET_DEPTHS[depths]
    if kind in ("swin", "maskformer-swin"):  # older snapshots store a plain SwinConfig; transformers converts it
        s = _fields(backbone, SWIN_DEFAULTS)
        wanted = dict(patch_size=4, mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu", use_absolute_embeddings=False,
                      layer_norm_eps=1e-5)
        for key, value in wanted.items():
            if s[key] != value:
                raise ValueError(f"backbone_config.{key}={s[key]!r}: mfcore's Swin needs {value!r}")
        spec = (s["embed_dim"], tuple(s["depths"]), tuple(s["num_heads"]), s["window_size"])
        for name, known in SWIN_SPECS.items():
            if known == spec:
                return name
        raise ValueError(f"backbone_config (embed_dim, depths, num_heads, window_size)={spec} is none of "
                         f"mfcore's Swin models {SWIN_SPECS}")
    raise ValueError(f"backbone_config.model_type={kind!r}: mfcore reads transformers' own ResNet ('resnet') and "
                     "Swin ('swin', 'maskformer-swin') backbones")


def model_config_from_hf(hf_config: dict, base_preset: str, preprocessor: dict | None = None) -> ModelConfig:
    """The ModelConfig of `base_preset` with the sizes of the transformers MaskFormer described by
    `hf_config` (config.json as a dict, or `config.to_dict()`), so that the two compute the same function.

    preprocessor: preprocessor_config.json as a dict, if any: its image_mean / image_std (after the
    rescale by rescale_factor, 1/255) become mfcore's pixel_mean / pixel_std in 0..255.
    Raises ValueError for what mfcore's MaskFormer cannot compute (naming the field).
    """
    base = get_preset(base_preset).model
    if base.arch != "maskformer" or base.enc_layers or base.box_head:
        raise ValueError(f"preset {base_preset} is not the plain MaskFormer of transformers (arch={base.arch}, "
                         f"enc_layers={base.enc_layers}, box_head={base.box_head}); pick a <dataset>-maskformer-"
                         "<backbone> preset without the pixel-decoder encoder")
    if hf_config.get("backbone_config") is None:
        raise ValueError("config.json has no backbone_config; expected a ResNet or Swin backbone description")
    backbone = _backbone_name(hf_config["backbone_config"])
    if backbone != base.backbone:
        raise ValueError(f"the snapshot's backbone is {backbone} but preset {base_preset} uses {base.backbone}; "
                         f"pick a preset with {backbone}")
    dec = _fields(hf_config.get("decoder_config") or {}, DETR_DEFAULTS)
    if dec["activation_function"] != "relu":
        raise ValueError(f"decoder_config.activation_function={dec['activation_function']!r}: mfcore's decoder "
                         "uses relu")
    if dec["auxiliary_loss"]:
        # transformers then feeds the shared final LayerNorm's output into the next decoder layer (DETR and
        # mfcore only read it out for the heads): another function at inference
        raise ValueError("decoder_config.auxiliary_loss=true: transformers' decoder then normalises every layer's "
                         "input with the shared final LayerNorm, which MaskFormer's decoder does not do")
    id2label = hf_config.get("id2label") or {}
    fields = dict(backbone=backbone, num_classes=len(id2label) if id2label else hf_config.get("num_labels", 2),
                  num_queries=dec["num_queries"], conv_dim=hf_config.get("fpn_feature_size", 256),
                  mask_dim=hf_config.get("mask_feature_size", 256), hidden_dim=dec["d_model"],
                  nheads=dec["decoder_attention_heads"], dim_feedforward=dec["decoder_ffn_dim"],
                  dropout=float(dec["dropout"]), dec_layers=dec["decoder_layers"], memory_feature="res5",
                  gn_groups=32,  # transformers' FPN hard-codes GroupNorm(32, ...)
                  self_attention=True)
    if preprocessor and "image_mean" in preprocessor:
        scale = preprocessor.get("rescale_factor", 1 / 255) if preprocessor.get("do_rescale", True) else 1.0
        fields["pixel_mean"] = tuple(round(m / scale, 6) for m in preprocessor["image_mean"])  # to 0..255
        fields["pixel_std"] = tuple(round(s / scale, 6) for s in preprocessor["image_std"])
    return override(base, **fields)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_hf_weights(folder: str | Path) -> tuple[dict[str, Tensor], Path]:
    """The {name: tensor} of a snapshot folder and the file read (a sharded snapshot's index), without
    unpickling anything."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _read_weight_file(folder / name), folder / name
        if (folder / (name + ".index.json")).is_file():
            return _read_shards(folder / (name + ".index.json")), folder / (name + ".index.json")
    raise FileNotFoundError(f"{folder} holds no weights: expected {' or '.join(WEIGHT_FILES)} in it, or the "
                            "sharded form's .index.json and shards (a Hugging Face snapshot of "
                            "MaskFormerForInstanceSegmentation)")


def _read_shards(index: Path) -> dict[str, Tensor]:
    """The tensors of a sharded snapshot: its index's "weight_map" names the shard file of every tensor. A
    shard that is not in the folder is named in the error (a partial download is the usual cause)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: expected a \"weight_map\" {{tensor name: shard file}}")
    weights: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:  # shards sit beside their index
            raise ValueError(f"{index}: shard {shard!r} is not a file name in {index.parent}")
        if not (index.parent / shard).is_file():
            raise FileNotFoundError(f"{index.parent} lacks shard {shard}, which {index.name} lists")
        weights.update(_read_weight_file(index.parent / shard))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise ValueError(f"{index}: {len(missing)} tensor(s) it lists are in no shard, e.g. {missing[:3]}")
    return weights


def _read_weight_file(path: Path) -> dict[str, Tensor]:
    """One weights file: safetensors as such, .bin with torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"cannot read {path} as safetensors: {err}") from err
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only
    except Exception as err:  # the restricted unpickler raises many types; all mean "not plain weights"
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True), which refuses anything but "
                         f"tensors: {reason}") from err
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ValueError(f"{path}: expected a state dict {{name: tensor}}")
    return weights


def convert_hf_folder(folder: str | Path, output: str | Path, preset: str) -> dict:
    """Convert a transformers MaskFormer snapshot `folder` into an mfcore checkpoint at `output`, as a model of
    `preset` with the snapshot's sizes (`model_config_from_hf`). Returns the same summary as
    `convert_checkpoint`: {"output", "converted", "skipped", "unexpected"}."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: expected a Hugging Face snapshot folder with "
                                f"config.json and {' or '.join(WEIGHT_FILES)} (or their shards)")
    weights, path = read_hf_weights(folder)
    preprocessor = folder / "preprocessor_config.json"
    model_cfg = model_config_from_hf(_read_json(folder / "config.json"), preset,
                                     _read_json(preprocessor) if preprocessor.is_file() else None)
    with torch.device("meta"):  # only names and shapes are needed to check the mapping
        model = build_model(model_cfg)
    state, unknown, skipped = rename_hf(weights, model_cfg.backbone)
    summary = save_converted(state, unknown, model.state_dict(), path, output, preset, model_cfg)
    return {**summary, "skipped": skipped}


__all__ = ["convert_hf_folder", "model_config_from_hf", "read_hf_weights", "rename_hf"]
