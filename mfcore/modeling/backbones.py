"""Backbones of MaskFormer: an image batch -> the feature pyramid res2..res5.

Every backbone maps a normalized batch x: [B, 3, H, W] (H and W multiples of 32) to

    {"res2": [B, C2, H/4, W/4], "res3": [B, C3, H/8, W/8],
     "res4": [B, C4, H/16, W/16], "res5": [B, C5, H/32, W/32]}

and exposes the channels as `out_channels = {"res2": C2, ..., "res5": C5}`.

The paper's backbones (Sec. 4, Table 1), built from timm with timm/torchvision parameter names:
  r50, r101     ResNet, stride in the 3x3 conv, frozen BatchNorm (statistics and affine are buffers).
  r101c         R101 as detectron2's DeepLab ResNet of the released R101c configs: the 7x7 stem is the
                "DeepLab stem", 3x3 convs 3->64 (stride 2)->64->128 (MODEL.RESNETS.STEM_TYPE "deeplab"),
                and res5's three blocks dilate their 3x3 convs by the multi-grid (1, 2, 4) times the stage
                dilation 1 (RES5_MULTI_GRID [1, 2, 4], RES5_DILATION 1), so res5 keeps stride 32.
  swin-t/s/b/l  Swin Transformer, patch 4, window 7 (T, S) or 12 (B, L: the 384-pretrained models),
                feature maps padded to whole windows as in the released segmentation code, and a
                LayerNorm (norm0..norm3) on each of the four outputs.
Two small ones for CPU runs, trained from scratch here (not in the paper):
  r18           ResNet-18 with *trainable* BatchNorm: frozen BN is the identity at initialization, so a
                net trained from scratch would have no normalization at all.
  tiny          ~0.31M parameters, one torchvision BasicBlock per stage, widths 16/32/64/128, GroupNorm
                (8 channels per group, as GN(32) over 256 in the pixel decoder): GN does not depend on
                the batch size (a laptop fits a few images per step) and behaves the same in train and
                eval, so short runs have no running statistics to warm up.
  tiny8         `tiny` with stride 1 in its last two stages (output stride 8, as DeepLab's dilated
                backbones): on 64x64 scenes res5 is 8x8, so the queries can attend to the deepest
                features at a resolution where a segment still covers several positions (the paper's res5
                of a 512 crop is 16x16); the same parameters as `tiny`.

mfcore never downloads weights: `pretrained` is a path to a local state-dict file.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import Bottleneck, ResNet
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    checkpoint_filter_fn,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock

FEATURES = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
# name -> (embed_dim, depths, num_heads, window_size) of the Swin models MaskFormer uses
SWIN_SPECS = {
    "swin-t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin-s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin-b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin-l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}
BACKBONES: tuple[str, ...] = ("r50", "r101", "r101c", *SWIN_SPECS, "r18", "tiny", "tiny8")
GRAD_CHECKPOINTING = ("r50", "r101", "r101c", *SWIN_SPECS)  # the backbones with set_grad_checkpointing
# R101c's res5 (released config MODEL.RESNETS.RES5_DILATION: 1, RES5_MULTI_GRID: [1, 2, 4]): the dilation of
# block j's 3x3 conv is RES5_DILATION * RES5_MULTI_GRID[j]
R101C_RES5_DILATION = 1
R101C_RES5_MULTI_GRID = (1, 2, 4)


class Backbone(nn.Module):
    """Base class: subclasses fill `out_channels` and implement `stages`."""

    out_channels: dict[str, int]
    out_strides: tuple[int, ...] = STRIDES  # of res2..res5
    # checkpoint keys starting with these belong to the classifier and are dropped when loading
    classifier_keys: tuple[str, ...] = ("fc.", "head.")
    # layers MaskFormer adds to the classification net: absent from ImageNet files, so not "missing"
    new_layers: tuple[str, ...] = ()

    def stages(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> the four maps at `out_strides` (4, 8, 16, 32), each [B, C, H/s, W/s]."""
        raise NotImplementedError

    def convert_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook to rename/resize a checkpoint's tensors into this backbone's layout."""
        return state

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W], H and W multiples of 32 -> {"res2": [B, C2, H/4, W/4], ..., "res5"}."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"backbone input must be [B, 3, H, W] with H and W multiples of 32, "
                             f"got {tuple(x.shape)}")
        return dict(zip(FEATURES, self.stages(x)))


class ResNetBackbone(Backbone):
    """timm's ResNet without pooling and classifier; names match torchvision (conv1, bn1, layer1..4)."""

    grad_checkpointing = False  # set_grad_checkpointing

    def __init__(self, net: ResNet):
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        # feature_info[0] is the stem (stride 2); entries 1..4 are layer1..4 at strides 4..32
        self.out_channels = {f: info["num_chs"] for f, info in zip(FEATURES, net.feature_info[1:])}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input in the forward and recompute the block in the backward (less
        memory, about one more forward of compute, the same gradients). timm's own switch checkpoints
        `forward_features`, which this backbone does not call, so the blocks go through torch.utils.checkpoint."""
        self.grad_checkpointing = enable

    def stages(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # [B, C, H/4, W/4]
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                for block in layer:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = layer(x)
            feats.append(x)
        return feats


def conv_bn_pairs(net: ResNet | ResNetBackbone) -> list[tuple[nn.Module, nn.Module]]:
    """Every (conv, the BN that reads its output) of a timm ResNet (or its ResNetBackbone), stem and
    shortcuts included."""
    # the deep stem is Sequential(conv, bn, act, conv, bn, act, conv) followed by net.bn1
    stem = list(net.conv1) if isinstance(net.conv1, nn.Sequential) else [net.conv1]
    pairs = [(stem[i], stem[i + 1]) for i in range(0, len(stem) - 1, 3)] + [(stem[-1], net.bn1)]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            for i in (1, 2, 3):  # BasicBlock has conv1/bn1, conv2/bn2; Bottleneck also conv3/bn3
                if hasattr(block, f"conv{i}"):
                    pairs.append((getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
            if block.downsample is not None:  # Sequential([pool,] conv, bn)
                pairs.append((block.downsample[-2], block.downsample[-1]))
    return pairs


def _resnet(depths: tuple[int, ...], bottleneck: bool, frozen_bn: bool, deep_stem: bool,
            drop_path: float, res5_dilations: tuple[int, ...] | None = None) -> ResNetBackbone:
    """res5_dilations: one dilation per res5 block for its 3x3 conv (padding = dilation, so the sizes and the
    stride are unchanged); None: all 1."""
    net = ResNet(Bottleneck if bottleneck else TimmBasicBlock, depths, num_classes=0, global_pool="",
                 stem_type="deep" if deep_stem else "", stem_width=64, drop_path_rate=drop_path,
                 # timm zeroes the last BN weight of each block; a frozen zero would kill the block forever
                 zero_init_last=False)
    if res5_dilations is not None:
        if len(res5_dilations) != len(net.layer4):
            raise ValueError(f"res5_dilations {res5_dilations}: expected one per res5 block ({len(net.layer4)})")
        for block, dilation in zip(net.layer4, res5_dilations):
            block.conv2.dilation = block.conv2.padding = (dilation, dilation)
    if frozen_bn:
        # BN(x) = (x - mean) / sqrt(var + eps) * weight + bias with all four held as buffers
        net = freeze_batch_norm_2d(net)
    return ResNetBackbone(net)


class TinyBackbone(Backbone):
    """A narrow ResNet: two stride-2 3x3 convs (stride 4), then one BasicBlock per stage."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), channels_per_group: int = 8,
                 strides: tuple[int, ...] = (1, 2, 2, 2)):
        super().__init__()

        def norm(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(max(1, c // channels_per_group), c)

        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, stride=2, padding=1, bias=False), norm(w0), nn.ReLU(inplace=True),
            nn.Conv2d(w0, w0, 3, stride=2, padding=1, bias=False), norm(w0), nn.ReLU(inplace=True))
        layers, c_in = [], w0
        for c, stride in zip(widths, strides):  # stage 1 keeps the stem's stride 4, later ones halve (or keep)
            shortcut = None
            if stride != 1 or c_in != c:
                shortcut = nn.Sequential(nn.Conv2d(c_in, c, 1, stride=stride, bias=False), norm(c))
            layers.append(BasicBlock(c_in, c, stride=stride, downsample=shortcut, norm_layer=norm))
            c_in = c
        self.layers = nn.ModuleList(layers)
        self.out_channels = dict(zip(FEATURES, widths))
        self.out_strides = tuple(4 * math.prod(strides[:i + 1]) for i in range(len(strides)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init, as torchvision and timm do for ResNets
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class _PadThenShiftBlock(SwinTransformerBlock):
    """timm's Swin block with the window attention of the released Swin segmentation code.

    That code pads the [H, W] map with zeros to whole windows [Hp, Wp] first, then rolls it by
    -window/2 and masks attention between the regions the roll brought together, on the padded grid.
    timm rolls first and pads after, so when H is not a multiple of the window (512 input: res2 is
    128 = 18*7 + 2) its mask no longer matches the wrap and tokens attend across the image border.
    Both agree when H, W are multiples of the window. Only `_attn` changes; weights keep timm's names.
    """

    def _attn(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C] (after norm1) -> [B, H, W, C]."""
        _, H, W, C = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))  # [B, Hp, Wp, C], zeros at the bottom/right
        Hp, Wp = x.shape[1], x.shape[2]
        shift = self.shift_size
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = self.get_attn_mask(x)  # [nW, wh*ww, wh*ww] of 0 / -100 on the padded grid, None if no shift
        windows = window_partition(x, self.window_size).view(-1, wh * ww, C)
        windows = self.attn(windows, mask=mask)  # softmax(q k^T / sqrt(d) + bias + mask) v per window
        x = window_reverse(windows.view(-1, wh, ww, C), self.window_size, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].contiguous()


class SwinBackbone(Backbone):
    """timm's Swin (patch_embed, layers) plus LayerNorms norm0..norm3 on the outputs, NCHW out."""

    classifier_keys = ("head.", "norm.")  # "norm." is the classifier's final norm, not norm0..3
    new_layers = ("norm0.", "norm1.", "norm2.", "norm3.")

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...],
                 window_size: int, drop_path: float):
        super().__init__()
        net = SwinTransformer(patch_size=4, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                              window_size=window_size, num_classes=0, drop_path_rate=drop_path,
                              # any input size; keep the full window (and its shift) even on maps
                              # smaller than it, as the released code does
                              strict_img_size=False, always_partition=True)
        for stage in net.layers:
            for block in stage.blocks:
                block.__class__ = _PadThenShiftBlock
        self.patch_embed, self.layers = net.patch_embed, net.layers
        channels = [embed_dim * 2 ** i for i in range(len(depths))]
        for i, c in enumerate(channels):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self.out_channels = dict(zip(FEATURES, channels))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own gradient checkpointing: each stage recomputes its blocks in the backward."""
        SwinTransformer.set_grad_checkpointing(self, enable)  # flags every stage of self.layers (timm's stages)

    def convert_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # timm's filter maps original Microsoft checkpoints (downsample at the end of a stage) to its
        # layout, drops stored index/mask buffers and resizes bias tables of another window size
        return checkpoint_filter_fn(state, self)

    def stages(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)  # [B, H/4, W/4, C0] (channels last)
        feats = []
        for i, stage in enumerate(self.layers):
            x = stage(x)  # stage i > 0 starts with patch merging: [B, H/2^(i+2), W/2^(i+2), Ci]
            feats.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return feats


def _state_dict_from_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: expected a state-dict file at "
                                f"'{path}'. mfcore never downloads weights; put the file there first.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails in many ways on foreign files; say which file and why
        raise ValueError(f"'{path}' cannot be read by torch.load(weights_only=True): expected a state dict "
                         f"of tensors saved with torch.save ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):  # common wrappers of training checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' is not a state dict: expected {{name: tensor}}, optionally under "
                         f"'state_dict' or 'model'")
    return obj


def _examples(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_pretrained(backbone: Backbone, path: str | Path) -> None:
    """Load a timm/torchvision state dict from `path` into `backbone`, strictly.

    Classifier keys are ignored and MaskFormer's new layers may be absent; anything else that is
    missing, unexpected or of another shape raises ValueError naming the keys.
    """
    path = Path(path)
    try:
        state = backbone.convert_checkpoint(_state_dict_from_file(path))
    except (AttributeError, RuntimeError) as err:  # e.g. a bias table for a block this backbone lacks
        raise ValueError(f"'{path}' does not fit backbone {type(backbone).__name__}: {err}") from err
    state = {k: v for k, v in state.items() if not k.startswith(backbone.classifier_keys)}
    own = backbone.state_dict()

    def counted(k: str) -> bool:  # BN's step counter has no effect on the outputs
        return not k.endswith("num_batches_tracked")

    matched = [k for k in state if k in own]
    if not matched:
        raise ValueError(f"no tensor in '{path}' matches backbone {type(backbone).__name__}: the file "
                         f"has {_examples(list(state))}; the backbone expects {_examples(list(own))}")
    missing = [k for k in own if k not in state and counted(k) and not k.startswith(backbone.new_layers)]
    unexpected = [k for k in state if k not in own and counted(k)]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in matched
             if state[k].shape != own[k].shape]
    problems = [f"{what}: {_examples(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape (file != backbone)", wrong))
                if keys]
    if problems:
        raise ValueError(f"'{path}' does not fit backbone {type(backbone).__name__}; " + "; ".join(problems))
    backbone.load_state_dict({k: state[k] for k in matched}, strict=False)


def build_backbone(name: str, pretrained: str | Path | None = None, drop_path: float = 0.0,
                   grad_checkpointing: bool = False) -> Backbone:
    """Build backbone `name` (one of BACKBONES), optionally loading a local state-dict file.

    drop_path: stochastic-depth rate of the last block, rising linearly from 0 over the blocks
    (paper: 0.3 for Swin); not available for `tiny`.
    grad_checkpointing: recompute the blocks' activations in the backward (`set_grad_checkpointing`);
    the paper's backbones only (GRAD_CHECKPOINTING).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}': expected one of {', '.join(BACKBONES)}")
    if grad_checkpointing and name not in GRAD_CHECKPOINTING:
        raise ValueError(f"grad_checkpointing is available for the backbones {', '.join(GRAD_CHECKPOINTING)}, not "
                         f"'{name}' (a small one; r18's trainable BatchNorm would count every batch twice)")
    if not 0.0 <= drop_path < 1.0 or (drop_path > 0 and name.startswith("tiny")):
        raise ValueError(f"drop_path must be in [0, 1) (and 0 for 'tiny'), got {drop_path} for '{name}'")
    if name in SWIN_SPECS:
        backbone: Backbone = SwinBackbone(*SWIN_SPECS[name], drop_path=drop_path)
    elif name == "tiny":
        backbone = TinyBackbone()
    elif name == "tiny8":
        backbone = TinyBackbone(strides=(1, 2, 1, 1))
    elif name == "r18":
        backbone = _resnet((2, 2, 2, 2), bottleneck=False, frozen_bn=False, deep_stem=False,
                           drop_path=drop_path)
    else:
        depths = (3, 4, 6, 3) if name == "r50" else (3, 4, 23, 3)
        dilations = tuple(R101C_RES5_DILATION * g for g in R101C_RES5_MULTI_GRID) if name == "r101c" else None
        backbone = _resnet(depths, bottleneck=True, frozen_bn=True, deep_stem=name == "r101c",
                           drop_path=drop_path, res5_dilations=dilations)
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    if grad_checkpointing:
        backbone.set_grad_checkpointing()
    return backbone
