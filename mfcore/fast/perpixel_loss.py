"""The per-pixel cross-entropy of PerPixelBaseline(+) a decoder layer at a time, classes innermost.

`mfcore.losses.PerPixelCriterion` upsamples each image's logits [1, K, h, w] to its label map and takes the
CE image by image (images may differ in size). When all label maps of the batch have one size (as a
training batch, cropped to one size, does), `FusedPerPixelCriterion` takes a whole layer [B, K, h, w] at
once, channels-last: F.interpolate then runs its vectorised channels-last kernels forward and backward
(the NCHW backward is a scatter loop on CPU), and the CE is taken over [B*H*W, K] rows, its log-softmax
along contiguous memory (over the class axis of [B, K, H, W] it strides by H*W). One layer of the small
presets (16 x 32 x 64 x 64 floats, 8 MB) stays in cache; all layers together would not, and run slower.
Per layer: the sum over the batch's labelled pixels divided by their count, the same mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mfcore.losses import PerPixelCriterion, aux_outputs
from mfcore.mask_loss import loss_dtype


class FusedPerPixelCriterion(PerPixelCriterion):
    """`PerPixelCriterion` without the per-image loop (see the module docstring); a batch of label maps of
    several sizes takes the per-image path. Made from a built PerPixelCriterion by `mfcore.fast.build_criterion`
    (it adds no state of its own)."""

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        logits = outputs["sem_seg_logits"]
        sem = self.semantic_targets(logits, targets)
        if len({tuple(s.shape) for s in sem}) > 1:
            return super().forward(outputs, targets)
        target = torch.stack(sem)                                                         # [B, H, W]
        count = (target != self.ignore_index).sum().clamp(min=1)
        aux = aux_outputs(outputs, self.deep_supervision, self.num_aux_layers)
        losses = {}
        for i, layer in enumerate([logits] + [a["sem_seg_logits"] for a in aux]):
            if layer.shape[1] != self.num_classes:
                raise ValueError(f"sem_seg_logits: expected {self.num_classes} classes, got {layer.shape[1]}")
            up = F.interpolate(loss_dtype(layer).contiguous(memory_format=torch.channels_last), size=target.shape[-2:],
                               mode="bilinear", align_corners=False)                     # [B, K, H, W], K innermost
            rows = up.permute(0, 2, 3, 1).reshape(-1, self.num_classes)                   # [B*H*W, K], no copy
            ce = F.cross_entropy(rows, target.view(-1), ignore_index=self.ignore_index, reduction="sum")
            losses["loss_ce" + (f"_{i - 1}" if i else "")] = ce / count
        return losses
