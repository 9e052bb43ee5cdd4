"""L_mask = 20 * focal + 1 * dice (paper Sec. 3.2): the one definition that the criterion's mask loss
(`mfcore.losses`) and the matching cost (`mfcore.matcher`) share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-pixel focal loss FL = -a_t (1 - p_t)^gamma log p_t (Lin et al.; torchvision's sigmoid_focal_loss).
    logits, targets (in [0, 1]): [..., P] -> [..., P]."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log p_t
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """1 - (2 sum(sigmoid(x) t) + 1) / (sum sigmoid(x) + sum t + 1) per mask. logits, targets: [M, P] -> [M]."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


def focal_dice(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """L_mask's two terms per mask: (focal averaged over pixels [M], dice [M]) of logits, targets [M, P]."""
    return sigmoid_focal_loss(logits, targets).mean(-1), dice_loss(logits, targets)


def pairwise_focal_dice(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """focal_dice of every (prediction, target) pair: logits [B, N, P], targets [B, M, P] in {0, 1} ->
    (focal, dice), each [B, N, M].

    A binary target picks one of two per-pixel losses, FL(x, t) = t FL(x, 1) + (1 - t) FL(x, 0), so the
    pixel sums of all pairs are matrix products with the targets; so are dice's sums of p t.
    valid: [B, P] in {0, 1}, the pixels inside each image (None: all); the batch padding enters no sum and
    the focal mean is over the valid pixels: focal = sum_j v_j FL(x_j, t_j) / sum_j v_j.
    """
    ones = torch.ones_like(logits)
    pos, neg = sigmoid_focal_loss(logits, ones), sigmoid_focal_loss(logits, 1 - ones)       # [B, N, P]
    p, count = logits.sigmoid(), logits.shape[-1]
    if valid is not None:
        v = valid[:, None, :].to(logits.dtype)
        pos, neg, p, targets = pos * v, neg * v, p * v, targets * v
        count = v.sum(-1, keepdim=True)                                                  # [B, 1, 1]
    focal = (pos @ targets.transpose(1, 2) + neg @ (1 - targets).transpose(1, 2)) / count
    dice = 1 - (2 * p @ targets.transpose(1, 2) + 1) / (p.sum(-1)[..., None] + targets.sum(-1)[:, None, :] + 1)
    return focal, dice


def loss_dtype(x: Tensor) -> Tensor:
    """x in float32 at least: losses are computed from float32 logits even under autocast (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
