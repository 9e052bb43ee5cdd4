"""The mask losses of MaskFormer, fused for speed: focal + dice with a closed-form backward, the batch's
ground-truth masks prepared once for all decoder layers, and bilinear upsampling as matrix products.

`mfcore.losses.SetCriterion` computes, per decoder layer, over the matched (prediction, segment) pairs:
    L_mask = 20 * focal(m, t) + 1 * dice(m, t),  the logits m bilinearly upsampled to the ground truth's size;
Both cut to the image's region (`mfcore.matcher.image_region`): the batch padding enters no loss.
`FusedSetCriterion` gives the same numbers (to float rounding) with fewer passes over the [M, H*W]
upsampled logits and fewer intermediates kept for backward, and matches all decoder layers in one batch
when its matcher is an `InPlaceCostMatcher`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from mfcore.fast.matcher_costs import InPlaceCostMatcher
from mfcore.losses import SetCriterion
from mfcore.mask_loss import loss_dtype
from mfcore.matcher import Indices, image_region


@functools.lru_cache(maxsize=32)
def interpolation_matrix(in_size: int, out_size: int, device: torch.device,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """[out_size, in_size] weights of 1-D linear interpolation with align_corners=False (F.interpolate's).

    Output pixel j reads source position (j + 0.5) * in/out - 0.5, clamped at 0, between its two neighbours.
    Cached (read-only): a training step asks for the same few matrices 12 times. Built outside inference
    mode, so that a matrix first asked for by a prediction can still be saved for a later training backward.
    """
    with torch.inference_mode(False):
        src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
        low = src.floor().long().clamp(max=in_size - 1)
        high = (low + 1).clamp(max=in_size - 1)
        frac = src - low
        weights = torch.zeros(out_size, in_size, dtype=torch.float64)
        rows = torch.arange(out_size)
        weights.index_put_((rows, low), 1 - frac, accumulate=True)
        weights.index_put_((rows, high), frac, accumulate=True)
        return weights.to(device, dtype)


def upsample_bilinear(x: Tensor, size: tuple[int, int], region: tuple[int, int] | None = None) -> Tensor:
    """F.interpolate(x[:, None], size, mode="bilinear", align_corners=False)[:, 0] for x: [M, h, w] -> [M, H, W],
    as two matrix products up = A_h x A_w^T (bilinear interpolation is separable). region (h_img, w_img): only
    the output's top-left region [M, h_img, w_img], from the first rows of A_h and A_w (the rest is padding).

    Same values up to float rounding; the point is the backward, which is two more matrix products
    here but a slow scatter loop in F.interpolate's CPU kernel (~10x slower for single-channel maps).
    Runs in float32 at least, even under autocast: these are the logits the losses are computed from.
    """
    x = loss_dtype(x)
    region = region or size
    a_h = interpolation_matrix(x.shape[-2], size[0], x.device, x.dtype)[:region[0]]
    a_w = interpolation_matrix(x.shape[-1], size[1], x.device, x.dtype)[:region[1]]
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(torch.matmul(a_h, x), a_w.t())


def target_terms(targets: Tensor, alpha: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
    """The target-only factors of FocalDiceLoss for targets [M, P]: (1 - 2t, a t + (1 - a)(1 - t), sum_j t).
    They depend on the ground truth alone, so one batch computes them once for all decoder layers."""
    flip = torch.rsub(targets, 1, alpha=2)
    return flip, flip * (0.5 - alpha) + 0.5, targets.sum(1)


class FocalDiceLoss(torch.autograd.Function):
    """Per-mask focal loss (gamma 2, mean over pixels) and dice loss in one function with a hand-written
    backward. apply(logits [M, P], targets [M, P] in [0, 1], *target_terms(targets, alpha)) -> (focal [M], dice [M]).

    Autograd through the textbook formulas runs ~40 element-wise kernels over the [M, P] upsampled logits
    and keeps a dozen intermediates alive; the closed forms below need ~15 passes and three saved tensors.
    With p = sigmoid(x), s = 1 - 2t, u = 1 - p_t = p s + t, a_t = a t + (1 - a)(1 - t):
        focal = a_t * ce * u^2,  ce = softplus(x) - x t              (torchvision's sigmoid_focal_loss)
        d focal / dx = a_t * u * ((p - t) u + 2 ce p (1 - p) s)
        dice = 1 - num / den,  num = 2 sum p t + 1,  den = sum p + sum t + 1
        d dice / dx_j = (num / den^2 - 2 t_j / den) * p_j (1 - p_j)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, flip: Tensor, weight: Tensor,
                target_sum: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(logits)
        ce = F.softplus(logits).addcmul_(logits, targets, value=-1)        # BCE with logits
        u = torch.addcmul(targets, p, flip)                                # 1 - p_t
        work = torch.mul(u, u).mul_(weight).mul_(ce)                       # a_t ce u^2
        focal = work.mean(1)
        num = 2 * torch.mul(p, targets, out=work).sum(1) + 1
        den = p.sum(1) + target_sum + 1
        ctx.save_for_backward(p, ce, u, targets, flip, weight, num, den)
        return focal, 1 - num / den

    @staticmethod
    def backward(ctx, grad_focal: Tensor, grad_dice: Tensor) -> tuple[Tensor | None, ...]:
        p, ce, u, targets, flip, weight, num, den = ctx.saved_tensors
        g = torch.addcmul(p, p, p, value=-1)                                # p (1 - p) = dp/dx
        work = torch.mul(ce, flip).mul_(g)                                  # ce p (1-p) s
        grad = torch.sub(p, targets).mul_(u).add_(work, alpha=2).mul_(u).mul_(weight)
        grad.mul_((grad_focal / p.shape[1])[:, None])                        # d mean / d x_j = 1/P
        dice_coef = torch.addcmul((grad_dice * num / den.square())[:, None], targets,
                                  (-2 * grad_dice / den)[:, None], out=work)
        return grad.addcmul_(dice_coef, g), None, None, None, None


class DenseMaskTargets:
    """The batch's ground-truth masks cut to their image's region, as float rows [T, h_img*w_img], per
    (ground-truth size, region), with their target_terms: prepared once per criterion call and shared by every
    decoder layer, which only picks the rows its matching needs (all of them, in order, whenever every segment
    is matched)."""

    def __init__(self, targets: list[dict], device: torch.device, dtype: torch.dtype = torch.float32,
                 alpha: float = 0.25):
        by_size: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
        for b, t in enumerate(targets):
            if len(t["labels"]):
                by_size.setdefault((tuple(t["masks"].shape[-2:]), image_region(t)), []).append(b)
        self.groups = {}
        for (size, (h, w)), images in by_size.items():
            rows = torch.cat([targets[b]["masks"][:, :h, :w].to(device) for b in images]).flatten(1).to(dtype)
            counts = [len(targets[b]["labels"]) for b in images]
            offsets = dict(zip(images, torch.tensor([0] + counts[:-1]).cumsum(0).tolist()))
            self.groups[size, (h, w)] = (images, offsets, rows, *target_terms(rows, alpha))


class FusedSetCriterion(SetCriterion):
    """`SetCriterion` whose dense mask losses go through `FocalDiceLoss` and `upsample_bilinear`, with the
    batch's ground truth prepared once per call (`DenseMaskTargets`) for all decoder layers. Made from a
    built SetCriterion by `mfcore.fast.build_criterion` (it adds no state of its own to keep)."""

    _mask_targets: DenseMaskTargets | None = None  # the current call's, between forward's start and end

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        if "masks" in self.losses and self.num_points is None:
            pred = outputs["pred_masks"]
            self._mask_targets = DenseMaskTargets(targets, pred.device, loss_dtype(pred[:0]).dtype)
        try:
            return super().forward(outputs, targets)
        finally:
            self._mask_targets = None

    def match(self, layers: list[dict], targets: list[dict]) -> list[Indices]:
        """All layers' matchings in one batch where the matcher can (`InPlaceCostMatcher.match_layers`)."""
        if isinstance(self.matcher, InPlaceCostMatcher):
            return self.matcher.match_layers(layers, targets)
        return super().match(layers, targets)

    def dense_focal_dice(self, pred: Tensor, targets: list[dict], indices: Indices) -> tuple[Tensor, Tensor]:
        """Matched pairs of all images at once (images whose ground truth has the same size and region share one
        gather, one upsampling and one loss call). Pairs are taken in ground-truth order, so that a
        matching that covers every segment uses the prepared targets as they are. -> (focal [M], dice [M])"""
        mask_targets = self._mask_targets or DenseMaskTargets(targets, pred.device, loss_dtype(pred[:0]).dtype)
        focal, dice = [], []
        for (size, region), (images, offsets, rows, *terms) in mask_targets.groups.items():
            order = [torch.argsort(indices[b][1]) for b in images]
            batch_idx = torch.cat([torch.full_like(indices[b][0], b) for b in images]).to(pred.device)
            src_idx = torch.cat([indices[b][0][o] for b, o in zip(images, order)]).to(pred.device)
            if len(src_idx) == 0:
                continue
            row_idx = torch.cat([indices[b][1][o] + offsets[b] for b, o in zip(images, order)])
            picked = [rows, *terms]
            if len(row_idx) < len(rows):  # some segment unmatched (more segments than queries)
                picked = [x[row_idx.to(x.device)] for x in picked]
            logits = upsample_bilinear(pred[batch_idx, src_idx], size, region).flatten(1)
            focal_g, dice_g = FocalDiceLoss.apply(logits, *picked)
            focal.append(focal_g)
            dice.append(dice_g)
        return torch.cat(focal), torch.cat(dice)


__all__ = ["interpolation_matrix", "upsample_bilinear", "target_terms", "FocalDiceLoss", "DenseMaskTargets",
           "FusedSetCriterion"]
