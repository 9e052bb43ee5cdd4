"""MaskFormer and the two per-pixel baselines of the paper, and `build_model`.

All models take float RGB images in 0..255, `images: [B, 3, H, W]` with H, W multiples of 32, and
normalise them with the config's pixel mean/std (so a checkpoint carries its own preprocessing).

MaskFormer (mask classification):
    per-pixel embeddings   E_pixel = PixelDecoder(Backbone(I))            [B, C_E, H/4, W/4]
    per-segment embeddings Q = TransformerDecoder(queries, res5)          [L, B, N, d]
    class prediction       p_i = softmax(Linear(Q_i))                     [B, N, K+1]
    mask prediction        m_i[h, w] = sigmoid(MLP(Q_i) . E_pixel[:, h, w])  (logits returned)  [B, N, H/4, W/4]
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mfcore.config import ModelConfig
from mfcore.modeling.backbones import build_backbone
from mfcore.modeling.pixel_decoder import EncoderPixelDecoder, FPNPixelDecoder
from mfcore.modeling.transformer import PositionEmbeddingSine, TransformerDecoder


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskProduct(nn.Module):
    """m = MLP(Q) . E_pixel for every layer's queries (paper Sec. 3.3): the mask_features conv turns the
    pixel decoder's output into E_pixel, then every mask embedding takes a dot product with every pixel's.

    embed: [L, B, N, C_E], pixel_features: [B, C, h, w], mask_conv: C -> C_E  ->  mask logits [L, B, N, h, w]
    """

    def forward(self, embed: Tensor, pixel_features: Tensor, mask_conv: nn.Conv2d) -> Tensor:
        mask_features = mask_conv(pixel_features)                                   # E_pixel [B, C_E, h, w]
        return torch.einsum("lbnc,bchw->lbnhw", embed, mask_features)               # m = MLP(Q) . E_pixel


class TransformerPredictor(nn.Module):
    """The transformer module + segmentation module: N queries attend to the memory (res5 or the encoder
    output); shared heads turn every decoder layer's output into class logits and mask embeddings.

    memory: [B, C, h, w]; pixel_features: [B, C, H/4, W/4], which `mask_conv` turns into E_pixel ->
    {"pred_logits": [B,N,K+1], "pred_masks": [B,N,H/4,W/4], "aux_outputs": [...L-1 dicts, training only]}
    """

    def __init__(self, cfg: ModelConfig, memory_channels: int, num_queries: int, class_head: bool = True):
        super().__init__()
        d = cfg.hidden_dim
        # the encoder variant already produces d channels; plain res5 needs a 1x1 projection (with bias)
        self.input_proj = nn.Conv2d(memory_channels, d, 1) if memory_channels != d else nn.Identity()
        if isinstance(self.input_proj, nn.Conv2d):
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.zeros_(self.input_proj.bias)
        self.pe_layer = PositionEmbeddingSine(d // 2)
        self.query_embed = nn.Embedding(num_queries, d)
        self.transformer = TransformerDecoder(cfg.dec_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                              cfg.self_attention)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1) if class_head else None
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)
        self.box_embed = MLP(d, d, 4, 3) if cfg.box_head else None
        self.mask_product = MaskProduct()

    def forward(self, memory: Tensor, pixel_features: Tensor, mask_conv: nn.Conv2d) -> dict:
        src = self.input_proj(memory)
        pos = self.pe_layer(src).flatten(2).transpose(1, 2)               # [B, hw, d]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(src.shape[0], -1, -1)
        # Deep supervision needs every layer's masks in training; at inference only the last layer's
        # are computed (the paper's FLOP count leaves the auxiliary masks out).
        hs = self.transformer(src.flatten(2).transpose(1, 2), pos, query_pos,
                              every_layer=self.training)                   # [L, B, N, d], L = 1 in eval
        masks = self.mask_product(self.mask_embed(hs), pixel_features, mask_conv)  # [L, B, N, h, w]
        per_layer = [{"pred_masks": m} for m in masks.unbind(0)]
        if self.class_embed is not None:
            for out, logits in zip(per_layer, self.class_embed(hs)):
                out["pred_logits"] = logits
        if self.box_embed is not None:
            for out, boxes in zip(per_layer, self.box_embed(hs).sigmoid()):
                out["pred_boxes"] = boxes
        out = per_layer[-1]
        if self.training:
            out["aux_outputs"] = per_layer[:-1]
        return out


class SegmentationModel(nn.Module):
    """Backbone + pixel decoder, shared by the three architectures; subclasses add the head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, drop_path=cfg.drop_path,
                                       grad_checkpointing=cfg.grad_checkpointing)
        channels = self.backbone.out_channels
        if cfg.enc_layers > 0:
            self.pixel_decoder = EncoderPixelDecoder(channels, cfg.conv_dim, cfg.mask_dim, cfg.gn_groups,
                                                     cfg.hidden_dim, cfg.enc_layers, cfg.nheads,
                                                     cfg.dim_feedforward, cfg.dropout)
            self.memory_channels = cfg.hidden_dim
        else:
            self.pixel_decoder = FPNPixelDecoder(channels, cfg.conv_dim, cfg.mask_dim, cfg.gn_groups)
            self.memory_channels = channels[cfg.memory_feature]
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    size_divisibility = 32

    def pixel_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B,3,H,W] 0..255 -> (FPN output [B,C,H/4,W/4], memory [B,C_mem,H/32,W/32]); the pixel
        decoder's `mask_features` conv turns the FPN output into E_pixel."""
        if images.shape[-2] % 32 or images.shape[-1] % 32:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of 32; pad it "
                             "(mfcore.test_time.pad_images)")
        # channels-last (NHWC) activations: oneDNN and cuDNN run convolutions natively in this layout
        # (build_model stores the conv weights the same way), saving a layout reorder per conv.
        images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone((images - self.pixel_mean) / self.pixel_std)
        fpn_out, memory = self.pixel_decoder(features)
        if self.cfg.enc_layers == 0:
            memory = features[self.cfg.memory_feature]
        return fpn_out, memory

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B,3,H,W] 0..255 -> (mask_features E_pixel [B,C_E,H/4,W/4], memory [B,C,H/32,W/32])."""
        fpn_out, memory = self.pixel_features(images)
        return self.pixel_decoder.mask_features(fpn_out), memory


class MaskFormer(SegmentationModel):
    """Mask classification: N (class, mask) pairs per image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.predictor = TransformerPredictor(cfg, self.memory_channels, cfg.num_queries)

    def forward(self, images: Tensor) -> dict:
        fpn_out, memory = self.pixel_features(images)
        return self.predictor(memory, fpn_out, self.pixel_decoder.mask_features)


class PerPixelBaseline(SegmentationModel):
    """Per-pixel classification: a 1x1 conv on the per-pixel embeddings -> K logits at stride 4."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.predictor = nn.Conv2d(cfg.mask_dim, cfg.num_classes, 1)

    def forward(self, images: Tensor) -> dict:
        mask_features, _ = self.features(images)
        return {"sem_seg_logits": self.predictor(mask_features)}


class PerPixelBaselinePlus(SegmentationModel):
    """PerPixelBaseline+: the transformer module and mask MLP with N = K queries and no class head; query i's
    mask logits are class i's per-pixel logits (trained with per-pixel CE, with deep supervision)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.predictor = TransformerPredictor(cfg, self.memory_channels, cfg.num_classes, class_head=False)

    def forward(self, images: Tensor) -> dict:
        fpn_out, memory = self.pixel_features(images)
        out = self.predictor(memory, fpn_out, self.pixel_decoder.mask_features)
        result = {"sem_seg_logits": out["pred_masks"]}
        if "aux_outputs" in out:
            result["aux_outputs"] = [{"sem_seg_logits": a["pred_masks"]} for a in out["aux_outputs"]]
        return result


ARCHITECTURES = {"maskformer": MaskFormer, "perpixel": PerPixelBaseline, "perpixelplus": PerPixelBaselinePlus}


def build_model(spec: "str | ModelConfig", **overrides) -> SegmentationModel:
    """Build a model from a preset name (see `mfcore.presets.PRESETS`) or a `ModelConfig`.
    Keyword overrides change config fields, e.g. `build_model("ade20k-maskformer-r50", num_queries=50)`."""
    from mfcore.config import override
    from mfcore.presets import get_preset

    cfg = get_preset(spec).model if isinstance(spec, str) else spec
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a preset name or ModelConfig, got {type(spec).__name__}")
    if overrides:
        cfg = override(cfg, **overrides)
    # conv weights in channels-last, like the activations (see SegmentationModel.features)
    return ARCHITECTURES[cfg.arch](cfg).to(memory_format=torch.channels_last)
