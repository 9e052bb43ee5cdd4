"""Tests of mfcore.backbones: shapes, parameter counts, frozen BN, Swin windows, pretrained loading.

Big models are built on the meta device (shapes only, no memory, no arithmetic).
"""
import functools
import re

import pytest
import torch
import torchvision
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mfcore.modeling.backbones import (
    BACKBONES,
    STRIDES,
    SwinBackbone,
    _PadThenShiftBlock,
    build_backbone,
    load_pretrained,
)

# a small Swin (same code as swin-t/s/b/l, other widths) for the tests that need real arithmetic
SMALL_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.cache  # building is the slow part; forward passes on meta leave the module unchanged
def meta_backbone(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(name)


def check_pyramid(out: dict, channels: dict, batch: int, h: int, w: int, strides=STRIDES) -> None:
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for (key, feat), stride in zip(out.items(), strides):
        assert tuple(feat.shape) == (batch, channels[key], h // stride, w // stride), key


@pytest.mark.parametrize("name", BACKBONES)
def test_pyramid_shapes_on_meta(name):
    backbone = meta_backbone(name)
    with torch.device("meta"):
        check_pyramid(backbone(torch.zeros(2, 3, 64, 64)), backbone.out_channels, 2, 64, 64, backbone.out_strides)
    assert backbone.out_strides == ((4, 8, 8, 8) if name == "tiny8" else STRIDES)


@pytest.mark.parametrize("h, w", [(512, 512), (640, 640), (256, 512)])
def test_swin_accepts_any_multiple_of_32(h, w):
    backbone = meta_backbone("swin-b")  # window 12 divides none of the 160, 128, 64 res2 sides
    with torch.device("meta"):
        check_pyramid(backbone(torch.zeros(1, 3, h, w)), backbone.out_channels, 1, h, w)


@pytest.mark.parametrize("name, channels", [("tiny", (16, 32, 64, 128)), ("r18", (64, 128, 256, 512)),
                                            ("small swin", (32, 64, 128, 256))])
def test_real_forward_small(name, channels):
    torch.manual_seed(0)
    backbone = SwinBackbone(**SMALL_SWIN, drop_path=0.0) if name == "small swin" else build_backbone(name)
    backbone.eval()
    assert tuple(backbone.out_channels.values()) == channels
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 96))
    check_pyramid(out, backbone.out_channels, 2, 64, 96)
    assert all(torch.isfinite(f).all() for f in out.values())


def test_bad_input_and_unknown_name():
    with pytest.raises(ValueError, match="multiples of 32"):
        build_backbone("tiny")(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="r50.*swin-l"):
        build_backbone("resnet50")
    with pytest.raises(ValueError, match="drop_path"):
        build_backbone("tiny", drop_path=0.1)


def test_resnet_param_counts():
    # released models: MaskFormer R50 41.25M = backbone 23.45M + 7.54M + 10.26M; R101 60.19M -> 42.39M
    assert n_params(meta_backbone("r50")) == pytest.approx(23.45e6, rel=0.005)
    r101 = n_params(meta_backbone("r101"))
    assert r101 == pytest.approx(60.19e6 - 41.25e6 + 23.45e6, rel=0.005)
    # R101c: 3x3 convs 3->64->64->128 replace the 7x7 3->64, and layer1 reads 128 channels, not 64
    stem = 9 * (3 * 64 + 64 * 64 + 64 * 128) - 49 * 3 * 64
    layer1 = 64 * 64 + 64 * 256  # the first block's 1x1 conv (->64) and 1x1 shortcut (->256)
    assert n_params(meta_backbone("r101c")) == r101 + stem + layer1
    # torchvision's resnet18 has 11,689,512 parameters; its fc 512*1000+1000 of them
    assert n_params(meta_backbone("r18")) == 11_689_512 - 513_000
    assert 0.2e6 <= n_params(meta_backbone("tiny")) <= 0.5e6


def swin_params(c0: int, depths: tuple, heads: tuple, window: int) -> int:
    """Parameters of MaskFormer's Swin counted by hand, layer by layer."""
    total = 3 * 4 * 4 * c0 + c0 + 2 * c0  # 4x4 patch conv + bias + LayerNorm
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = c0 * 2 ** i
        if i > 0:  # patch merging: LayerNorm over 4 * C/2, then Linear 4 * C/2 -> C without bias
            total += 2 * 2 * c + 2 * c * c
        block = (2 * 2 * c  # two LayerNorms
                 + 3 * c * c + 3 * c + c * c + c  # qkv and output projections
                 + (2 * window - 1) ** 2 * h  # relative position bias table
                 + 4 * c * c + 4 * c + 4 * c * c + c)  # MLP C -> 4C -> C
        total += depth * block + 2 * c  # blocks + the output LayerNorm norm_i
    return total


@pytest.mark.parametrize("name, spec, approx", [
    # approx: paper's total (Table 1: 42/63/102/212M) minus decoder + transformer for these channels
    ("swin-t", (96, (2, 2, 6, 2), (3, 6, 12, 24), 7), 28e6),
    ("swin-s", (96, (2, 2, 18, 2), (3, 6, 12, 24), 7), 49e6),
    ("swin-b", (128, (2, 2, 18, 2), (4, 8, 16, 32), 12), 87e6),
    ("swin-l", (192, (2, 2, 18, 2), (6, 12, 24, 48), 12), 196e6),
])
def test_swin_param_counts(name, spec, approx):
    count = n_params(meta_backbone(name))
    assert count == swin_params(*spec)
    assert count == pytest.approx(approx, rel=0.03)


def test_frozen_bn_has_no_parameters_and_ignores_batch_statistics():
    torch.manual_seed(0)
    r50 = build_backbone("r50")
    frozen = [m for m in r50.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 53 and not any(isinstance(m, nn.BatchNorm2d) for m in r50.modules())
    assert all(not list(m.parameters()) for m in frozen)
    assert "layer1.0.bn1.running_var" in r50.state_dict()
    assert all(p.requires_grad for p in r50.parameters())  # every stage is trained
    # stride in the 3x3 conv (torchvision layout)
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        train_out = r50.train()(x)["res5"]
        eval_out = r50.eval()(x)["res5"]
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_small_backbones_have_trainable_norms():
    assert any(isinstance(m, nn.BatchNorm2d) and m.weight.requires_grad for m in build_backbone("r18").modules())
    tiny_norms = [m for m in build_backbone("tiny").modules() if isinstance(m, nn.GroupNorm)]
    assert tiny_norms and all(m.num_channels // m.num_groups == 8 for m in tiny_norms)


def test_r101c_deeplab_stem():
    sd = meta_backbone("r101c").state_dict()
    assert sd["conv1.0.weight"].shape == (64, 3, 3, 3)
    assert sd["conv1.3.weight"].shape == (64, 64, 3, 3)
    assert sd["conv1.6.weight"].shape == (128, 64, 3, 3)
    assert sd["bn1.running_mean"].shape == (128,)
    assert sd["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)


def test_swin_drop_path_rises_linearly_to_the_given_rate():
    blocks = [b for stage in meta_backbone("swin-t").layers for b in stage.blocks]
    assert all(not hasattr(b.drop_path1, "drop_prob") for b in blocks)  # 0 -> identity
    with torch.device("meta"):
        blocks = [b for stage in build_backbone("swin-t", drop_path=0.3).layers for b in stage.blocks]
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])
    assert all(isinstance(b, _PadThenShiftBlock) and b.window_size == (7, 7) for b in blocks)


def shifted_block() -> SwinTransformerBlock:
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=16, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3,
                                 always_partition=True, dynamic_mask=True)
    block.__class__ = _PadThenShiftBlock
    return block


def test_pad_then_shift_equals_timm_without_padding():
    block, x = shifted_block(), torch.randn(2, 14, 14, 16)
    torch.testing.assert_close(block._attn(x), SwinTransformerBlock._attn(block, x))


def test_pad_then_shift_does_not_attend_across_the_wrap():
    # 9x9 map, window 7, shift 3: padded to 14x14 and rolled, real rows 0..2 land in rows 11..13, a
    # region of their own, so they may only attend to each other. Change rows 3..8 -> rows 0..2 fixed.
    block, x = shifted_block(), torch.randn(1, 9, 9, 16)
    y = x.clone()
    y[:, 3:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(block._attn(x)[:, :3], block._attn(y)[:, :3])
        # timm's own roll-then-pad lets them see rows 3..8 (which is why the block is replaced)
        assert not torch.allclose(SwinTransformerBlock._attn(block, x)[:, :3],
                                  SwinTransformerBlock._attn(block, y)[:, :3])


def assert_loaded(backbone: nn.Module, source: dict) -> None:
    own = backbone.state_dict()
    shared = [k for k in own if k in source]
    assert len(shared) >= len(own) - 8  # at most norm0..3 weights and biases are new
    for k in shared:
        assert torch.equal(own[k], source[k]), k


def test_pretrained_torchvision_resnet50(tmp_path):
    source = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # non-trivial statistics, to see them land in the frozen BN buffers
        source.bn1.running_var.uniform_(0.5, 2.0)
    torch.save(source.state_dict(), tmp_path / "r50.pth")
    assert_loaded(build_backbone("r50", pretrained=tmp_path / "r50.pth"), source.state_dict())


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_pretrained_wrapped_roundtrip(tmp_path, wrapper):
    torch.manual_seed(1)
    source = build_backbone("tiny").state_dict()
    torch.save({wrapper: source, "epoch": 3}, tmp_path / "tiny.pth")
    assert_loaded(build_backbone("tiny", pretrained=str(tmp_path / "tiny.pth")), source)


@pytest.mark.parametrize("original_layout", [False, True])
def test_pretrained_timm_swin(tmp_path, original_layout):
    source = SwinTransformer(**SMALL_SWIN).state_dict()  # timm's classifier: with final norm and head
    saved = dict(source)
    if original_layout:  # Microsoft's files merge patches at the end of stage i, timm at the start of i+1
        saved = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
                 for k, v in source.items()}
        assert "layers.0.downsample.reduction.weight" in saved
    torch.save(saved, tmp_path / "swin.pth")
    backbone = SwinBackbone(**SMALL_SWIN, drop_path=0.0)
    load_pretrained(backbone, tmp_path / "swin.pth")
    assert_loaded(backbone, source)


def test_missing_file_says_nothing_is_downloaded(tmp_path):
    path = tmp_path / "nowhere" / "r50.pth"
    with pytest.raises(FileNotFoundError, match="never downloads") as err:
        build_backbone("tiny", pretrained=path)
    assert str(path) in str(err.value)


def test_files_that_do_not_fit(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor .* matches.*encoder.weight.*stem.0.weight"):
        build_backbone("tiny", pretrained=tmp_path / "other.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="wrong shape.*layer1.0.conv1.weight"):
        build_backbone("r50", pretrained=tmp_path / "r18.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        build_backbone("tiny", pretrained=tmp_path / "list.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read by torch.load"):
        build_backbone("tiny", pretrained=tmp_path / "notes.txt")
    deeper = SwinTransformer(**{**SMALL_SWIN, "depths": (2, 2, 4, 2)})  # blocks layers.2.blocks.2..3 extra
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(SwinBackbone(**SMALL_SWIN, drop_path=0.0), tmp_path / "deeper.pth")


def _res5_convs(backbone):
    return [(block.conv2.dilation, block.conv2.padding, block.conv2.stride) for block in backbone.layer4]


def test_r101c_res5_multi_grid_dilations():
    """R101c is detectron2's DeepLab ResNet of the released configs: RES5_MULTI_GRID [1, 2, 4] times
    RES5_DILATION 1 on the 3x3 convs of res5's three blocks; stride 32 kept. R50/R101 are not dilated."""
    assert _res5_convs(meta_backbone("r101c")) == [((1, 1), (1, 1), (2, 2)), ((2, 2), (2, 2), (1, 1)),
                                                   ((4, 4), (4, 4), (1, 1))]
    for name in ("r50", "r101"):
        assert _res5_convs(meta_backbone(name)) == [((1, 1), (1, 1), (2, 2))] + [((1, 1), (1, 1), (1, 1))] * 2
    backbone = meta_backbone("r101c")
    check_pyramid(backbone(torch.empty(1, 3, 128, 96, device="meta")), backbone.out_channels, 1, 128, 96)


def test_r101c_dilation_survives_the_fast_frozen_bn_fold():
    from mfcore import fast

    backbone = meta_backbone("r101c")
    was = fast.enabled()
    fast.set_enabled(True)
    try:
        fast.accelerate(backbone)
    finally:
        fast.set_enabled(was)
    assert [d for d, _, _ in _res5_convs(backbone)] == [(1, 1), (2, 2), (4, 4)]
