"""Tests of mfcore.fast.frozen_bn: the folded conv equals conv then frozen BN, and its cache refolds on change."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FrozenBatchNorm2d

from mfcore.fast.frozen_bn import FoldedFrozenBN, FrozenBNConv, fold_frozen_bn
from mfcore.modeling.backbones import _resnet, conv_bn_pairs


def folded_resnet(*args, **kwargs) -> nn.Module:
    """`_resnet` with every frozen BN folded into its conv (as `mfcore.fast.accelerate` does)."""
    net = _resnet(*args, **kwargs)
    fold_frozen_bn(conv_bn_pairs(net))
    return net


def unfolded(backbone: nn.Module) -> nn.Module:
    """A copy that runs every conv and frozen BN as the separate plain modules (the reference)."""
    reference = copy.deepcopy(backbone)
    for m in reference.modules():
        if isinstance(m, FrozenBNConv):
            m.__class__ = nn.Conv2d
        elif isinstance(m, FoldedFrozenBN):
            m.__class__ = FrozenBatchNorm2d
    return reference


def randomized_bn(net: nn.Module, seed: int) -> dict:
    """A state dict of `net` with non-trivial BN statistics and affine (the fold must read them)."""
    gen = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith(("running_var", "weight")) and value.dim() == 1:
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(value.shape, generator=gen)
    return state


def assert_same_features(net: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = reference(x)
        for key, value in net(x).items():
            scale = expected[key].abs().max()
            torch.testing.assert_close(value / scale, expected[key] / scale, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("bottleneck, deep_stem", [(True, True), (False, False)])
def test_folded_frozen_bn_matches_conv_then_bn(bottleneck, deep_stem, one_thread):
    torch.manual_seed(0)
    folded = folded_resnet((1, 1, 1, 1), bottleneck=bottleneck, frozen_bn=True, deep_stem=deep_stem, drop_path=0.0)
    frozen = [m for m in folded.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert all(isinstance(m, FoldedFrozenBN) for m in frozen)  # every BN, stem and shortcuts included
    assert sum(isinstance(m, FrozenBNConv) for m in folded.modules()) == len(frozen)
    state = randomized_bn(folded, seed=0)
    folded.load_state_dict(state)
    reference = unfolded(folded)
    assert list(reference.state_dict()) == list(state)
    folded, reference = (net.to(memory_format=torch.channels_last) for net in (folded, reference))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert_same_features(folded, reference, x)  # no_grad: folded into the convs
    for net in (folded, reference):  # training the conv weights: conv, then BN
        sum(f.square().mean() for f in net(x).values()).backward()
    for (name, p), q in zip(folded.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad / q.grad.abs().max(), q.grad / q.grad.abs().max(), rtol=0, atol=1e-4,
                                   msg=name)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_fold_is_cached_and_refolded_when_a_source_changes(one_thread):
    torch.manual_seed(0)
    net = folded_resnet((1, 1, 1, 1), bottleneck=False, frozen_bn=True, deep_stem=False, drop_path=0.0)
    net.load_state_dict(randomized_bn(net, seed=1))
    x = torch.randn(1, 3, 32, 32)
    convs = [m for m in net.modules() if isinstance(m, FrozenBNConv)]
    with torch.inference_mode():
        net(x)
        with CountOps() as ops:
            net(x)
    assert "rsqrt" not in ops.names and "mul" not in ops.names  # the second call folds nothing
    assert ops.names.count("conv2d") == len(convs)
    assert all(not m._folded[2].is_inference() for m in convs)  # reusable by a forward with gradients

    changes = [
        ("load_state_dict", lambda: net.load_state_dict(randomized_bn(net, seed=2))),
        ("in-place buffer write", lambda: net.layer1[0].bn2.running_var.mul_(3)),
        ("optimizer step", lambda: torch.optim.SGD(net.parameters(), lr=0.5).step()),
        ("dtype change", lambda: net.double()),
    ]
    for name, change in changes:
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        with torch.no_grad():
            change()
        x = x.to(next(net.parameters()).dtype)
        assert_same_features(net, unfolded(net), x)


def test_cached_fold_serves_a_frozen_stage_in_a_training_forward(one_thread):
    net = folded_resnet((1, 1, 1, 1), bottleneck=False, frozen_bn=True, deep_stem=False, drop_path=0.0)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        net(x)
    for p in net.conv1.parameters():  # a frozen stem, as with freeze_at
        p.requires_grad_(False)
    sum(f.sum() for f in net(x).values()).backward()
    assert net.layer1[0].conv1.weight.grad is not None and net.conv1.weight.grad is None
    assert net.layer1[0].conv1._folded is None  # a conv that trains drops its cache


def test_model_built_under_inference_mode_runs(one_thread):
    with torch.inference_mode():
        net = folded_resnet((1, 1, 1, 1), bottleneck=False, frozen_bn=True, deep_stem=False, drop_path=0.0)
        out = net(torch.randn(1, 3, 32, 32))
    assert out["res5"].shape == (1, 512, 1, 1)
