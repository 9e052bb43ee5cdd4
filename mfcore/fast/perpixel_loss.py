"""The per-pixel cross-entropy of PerPixelBaseline(+) for all decoder layers and images in one pass.

`mfcore.losses.PerPixelCriterion` upsamples each image's logits to its label map and takes the CE image by
image and layer by layer (images may differ in size). When all label maps of the batch have one size (as a
training batch, cropped to one size, does), `FusedPerPixelCriterion` stacks the L layers' logits
[L, B, K, h, w], upsamples them in one pass as two matrix products (`mask_loss.upsample_bilinear`, whose
backward is two more products instead of F.interpolate's scatter loop on CPU), and takes one CE over
[L*B, K, H, W]: per layer the sum over the batch's labelled pixels divided by their count, the same mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mfcore.fast.mask_loss import upsample_bilinear
from mfcore.losses import PerPixelCriterion, _aux_outputs


class FusedPerPixelCriterion(PerPixelCriterion):
    """`PerPixelCriterion` in one upsampling and one cross-entropy for every layer (see the module docstring);
    a batch of label maps of several sizes takes the per-image path. Made from a built PerPixelCriterion by
    `mfcore.fast.build_criterion` (it adds no state of its own)."""

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        logits = outputs["sem_seg_logits"]
        sem = self.semantic_targets(logits, targets)
        if len({tuple(s.shape) for s in sem}) > 1:
            return super().forward(outputs, targets)
        aux = _aux_outputs(outputs, self.deep_supervision, self.num_aux_layers)
        layers = torch.stack([logits] + [a["sem_seg_logits"] for a in aux])              # [L, B, K, h, w]
        if layers.shape[2] != self.num_classes:
            raise ValueError(f"sem_seg_logits: expected {self.num_classes} classes, got {layers.shape[2]}")
        target = torch.stack(sem)                                                         # [B, H, W]
        num_layers, batch, classes = layers.shape[:3]
        up = upsample_bilinear(layers.flatten(0, 2), target.shape[-2:])                  # [L*B*K, H, W]
        ce = F.cross_entropy(up.view(num_layers * batch, classes, *target.shape[-2:]),
                             target.repeat(num_layers, 1, 1), ignore_index=self.ignore_index, reduction="none")
        count = (target != self.ignore_index).sum().clamp(min=1)
        per_layer = ce.view(num_layers, -1).sum(1) / count                               # [L]
        return {"loss_ce" + (f"_{i - 1}" if i else ""): loss for i, loss in enumerate(per_layer.unbind())}
