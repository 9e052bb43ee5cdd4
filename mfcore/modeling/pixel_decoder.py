"""Pixel decoders: turn backbone features res2..res5 into per-pixel embeddings E_pixel [B, C_E, H/4, W/4].

A decoder returns its FPN output; its `mask_features` conv, which makes E_pixel of it, is applied by the
model, in its `MaskProduct` (m = MLP(Q) . E_pixel).

`FPNPixelDecoder` is the light FPN of the paper (all 256 channels, GroupNorm(32), no conv bias where GN
follows). The final `mask_features` conv is 3x3 with bias and no norm, as in the released code (the
paper's text says 1x1). `EncoderPixelDecoder` is the panoptic "R50/R101 + 6 Enc" variant: res5 first goes
through a 1x1 projection and 6 DETR encoder layers; their output is the transformer decoder's memory and
replaces res5 at the top of the FPN.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from mfcore.modeling.transformer import PositionEmbeddingSine, TransformerEncoder

LEVELS = ("res2", "res3", "res4", "res5")


def conv_gn(in_ch: int, out_ch: int, kernel: int, groups: int, relu: bool) -> nn.Sequential:
    """conv (no bias: GN re-centres) + GroupNorm (+ ReLU), initialised like detectron2's c2_xavier_fill."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # "c2_xavier": uniform with std 1/sqrt(fan_in)
    layers = [conv, nn.GroupNorm(groups, out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FPNPixelDecoder(nn.Module):
    """features: {"res2": [B,C2,H/4,W/4], ..., "res5": [B,C5,H/32,W/32]}
    forward -> (FPN output [B, conv_dim, H/4, W/4], memory [B, C_mem, H/32, W/32]) where memory is the
    map the transformer decoder attends to: raw res5 here (the predictor projects it to d);
    mask_features(FPN output) = E_pixel [B, mask_dim, H/4, W/4]."""

    def __init__(self, in_channels: dict[str, int], conv_dim: int = 256, mask_dim: int = 256, gn_groups: int = 32,
                 top_in_channels: int | None = None):
        super().__init__()
        top = in_channels["res5"] if top_in_channels is None else top_in_channels
        self.layer_4 = conv_gn(top, conv_dim, 3, gn_groups, relu=True)
        # index 1 <-> res2, 2 <-> res3, 3 <-> res4 (the released checkpoints' naming)
        self.adapter_1 = conv_gn(in_channels["res2"], conv_dim, 1, gn_groups, relu=False)
        self.adapter_2 = conv_gn(in_channels["res3"], conv_dim, 1, gn_groups, relu=False)
        self.adapter_3 = conv_gn(in_channels["res4"], conv_dim, 1, gn_groups, relu=False)
        self.layer_1 = conv_gn(conv_dim, conv_dim, 3, gn_groups, relu=True)
        self.layer_2 = conv_gn(conv_dim, conv_dim, 3, gn_groups, relu=True)
        self.layer_3 = conv_gn(conv_dim, conv_dim, 3, gn_groups, relu=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def fpn(self, features: dict[str, Tensor], top: Tensor) -> Tensor:
        y = self.layer_4(top)
        for level, adapter, layer in (("res4", self.adapter_3, self.layer_3), ("res3", self.adapter_2, self.layer_2),
                                      ("res2", self.adapter_1, self.layer_1)):
            lateral = adapter(features[level])
            # top-down path: nearest upsampling of the coarser map, added to the lateral 1x1 projection
            y = layer(lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
        return y

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.fpn(features, features["res5"]), features["res5"]


class EncoderPixelDecoder(FPNPixelDecoder):
    """FPN whose top is res5 -> 1x1 conv (with bias) -> `enc_layers` post-norm encoder layers with sine
    positions. forward -> (FPN output [B, conv_dim, H/4, W/4], memory [B, d, H/32, W/32])."""

    def __init__(self, in_channels: dict[str, int], conv_dim: int = 256, mask_dim: int = 256, gn_groups: int = 32,
                 hidden_dim: int = 256, enc_layers: int = 6, nheads: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1):
        super().__init__(in_channels, conv_dim, mask_dim, gn_groups, top_in_channels=hidden_dim)
        self.input_proj = nn.Conv2d(in_channels["res5"], hidden_dim, 1)
        nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
        nn.init.zeros_(self.input_proj.bias)
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.encoder = TransformerEncoder(enc_layers, hidden_dim, nheads, dim_feedforward, dropout)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = self.input_proj(features["res5"])
        b, d, h, w = x.shape
        pos = self.pe_layer(x).flatten(2).transpose(1, 2)  # [B, HW, d]
        memory = self.encoder(x.flatten(2).transpose(1, 2), pos).transpose(1, 2).reshape(b, d, h, w)
        return self.fpn(features, memory), memory
