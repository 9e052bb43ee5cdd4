"""Frozen BatchNorm folded into the convolution before it (the R50/R101 backbones).

Per output channel, BN(conv(x, W)) = conv(x, W * s) + t with

    s = weight / sqrt(running_var + eps),   t = bias - running_mean * s,

the scale and shift of torchvision's FrozenBatchNorm2d. Folded, the BN's two passes over the activation
become one convolution with a bias. That pays only where no gradient flows to W (inference, no_grad,
frozen stages): while W trains, autograd would keep W * s for the backward (a second copy of the weights,
+90 MiB for R50) and its backward costs what the activation passes save, so there the conv and the BN
run one after the other.

The folded (W * s, t) are cached and reused while the five tensors they come from are the same objects
with the same storage at the same version: loading a state dict, an optimiser step, an in-place write or
moving the model refolds on the next call. (A write through `tensor.data`, which bypasses the version
counter, is the one change it cannot see; `refold()` the model's convs after one.)
Without the cache each prediction would recompute them for every conv: 5 extra operators x 53 convs in
R50, a third of the operators of a prediction and so a third of its kernel launches on a GPU, where a
batch-1 prediction is bound by launches. The cache holds one folded copy of the weights (R50: 94 MB) and
is dropped as soon as the conv runs with a gradient again.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d


class FrozenBNConv(nn.Conv2d):
    """A bias-free conv whose output goes straight into a frozen BatchNorm; without gradients to its
    weight the two run as one convolution with the folded weight and bias (see the module docstring).
    The BN stays where it was, with its buffers and state-dict names, as a `FoldedFrozenBN` that passes
    its input through."""

    frozen_bn: tuple[FrozenBatchNorm2d]  # in a tuple, so that the BN is not registered a second time here
    _folded: tuple[tuple[Tensor, ...], tuple[tuple[int, int], ...], Tensor, Tensor] | None = None
    # (sources, their (version, data_ptr), W * s, t)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.frozen_bn[0]
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self.refold()
            return FrozenBatchNorm2d.forward(bn, super().forward(x))
        if torch.compiler.is_compiling():  # the compiler fuses the fold into a kernel of its own
            return self._conv_forward(x, *self.fold())
        sources = (self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if any(t.is_inference() for t in sources):  # made under inference_mode: no version counter to key on
            return self._conv_forward(x, *self.fold())
        states = tuple((t._version, t.data_ptr()) for t in sources)
        cached = self._folded
        if cached is None or states != cached[1] or any(a is not b for a, b in zip(sources, cached[0])):
            # ordinary tensors even inside inference_mode: a frozen stage of a training forward reuses them
            with torch.inference_mode(False), torch.no_grad():
                cached = self._folded = (sources, states, *self.fold())
        return self._conv_forward(x, cached[2], cached[3])

    def refold(self) -> None:
        """Drop the cached fold: the next call without gradient recomputes it."""
        self._folded = None

    def fold(self) -> tuple[Tensor, Tensor]:
        """(W * s [C_out, C_in, k, k], t [C_out]) of the module docstring."""
        bn = self.frozen_bn[0]
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # [C_out]
        return self.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class FoldedFrozenBN(FrozenBatchNorm2d):
    """A frozen BatchNorm applied by the `FrozenBNConv` before it: the identity here."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def fold_frozen_bn(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Turn each (bias-free Conv2d, FrozenBatchNorm2d that reads its output) into (FrozenBNConv,
    FoldedFrozenBN), in place: same parameters, buffers and state-dict keys."""
    for conv, bn in pairs:
        if type(conv) is not nn.Conv2d or conv.bias is not None or type(bn) is not FrozenBatchNorm2d:
            raise TypeError(f"cannot fold {bn} into {conv}: expected a bias-free Conv2d and a FrozenBatchNorm2d")
        conv.__class__, conv.frozen_bn = FrozenBNConv, (bn,)
        bn.__class__ = FoldedFrozenBN
