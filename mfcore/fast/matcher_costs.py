"""The matching computed in place and for all decoder layers at once: `mfcore.matcher.HungarianMatcher` with
fewer passes over the [B, N, h*w] logits, its work tensors kept between calls, and one cost tensor for every
layer and image (one transfer to the host per training step, where the assignment runs)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from mfcore.mask_loss import loss_dtype
from mfcore.matcher import HungarianMatcher, Indices, assign, check_targets


def mask_costs(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
               scratch: list[Tensor] | None = None, per_image: bool | None = None,
               valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`mfcore.mask_loss.pairwise_focal_dice` for logits [B, N, P], targets [B, M, P] in {0, 1} -> (focal, dice),
    each [B, N, M]. With p = sigmoid(x), pos = (1-p)^g (-log p) and neg = p^g (-log(1-p)), both are linear in t:

        sum_pixels focal(x, t) = a pos.t + (1-a) neg.(1-t) = a (pos - (1-a)/a neg).t + (1-a) sum(neg)
        dice(m, t)             = 1 - (2 p.t + 1) / (sum(p) + sum(t) + 1)

    so each needs one matrix product with the targets and one sum per prediction. valid [B, P] in {0, 1}
    (None: all pixels): the sums run over valid pixels only (targets zeroed outside, sums as products with
    valid) and the focal mean divides by their count, as pairwise_focal_dice's.
    scratch: 4 work tensors shaped like logits (None: allocated here). per_image (default: on CPU) sends the
    images through them one at a time: fewer multi-MB buffers in flight, so more of them stay in cache;
    on a GPU the whole batch goes at once (fewer kernel launches).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha}: expected 0 < alpha <= 1")
    batch, num_preds, num_pixels = logits.shape
    scratch = scratch or [torch.empty_like(logits, memory_format=torch.contiguous_format) for _ in range(4)]
    # [B, M, N]: with few targets (M ~ 8) BLAS runs t @ v^T faster than v @ t^T on CPU
    weight_t, prob_t = (logits.new_empty(batch, targets.shape[1], num_preds) for _ in range(2))
    neg_sum, prob_sum = (logits.new_empty(batch, num_preds) for _ in range(2))
    if per_image is None:
        per_image = logits.device.type == "cpu"
    if valid is not None:
        targets = targets * valid[:, None]

    def pixel_sum(x: Tensor, part, out: Tensor) -> None:  # sum over the (valid) pixels of each prediction
        if valid is None:
            torch.sum(x, -1, out=out[part])
        else:
            out[part] = torch.matmul(x, valid[part].unsqueeze(-1)).squeeze(-1)

    parts = range(batch) if per_image else [slice(None)]                 # an image [N, P] or all [B, N, P]
    for part in parts:
        x, (one_minus, neg_log, pos_log, prob) = logits[part], (s[part] for s in scratch)
        torch.sigmoid(x, out=prob)
        torch.matmul(targets[part], prob.transpose(-1, -2), out=prob_t[part])
        pixel_sum(prob, part, prob_sum)
        # -log(1 - p) = softplus(x) = relu(x) + log(1 + e^-|x|) and -log p = softplus(x) - x.
        # log(1 + e^-|x|) = -log max(p, 1 - p): the max is >= 1/2, so its log is exact to float rounding
        # and costs one fast log instead of the slow log1p(exp()) of F.softplus.
        torch.sub(1, prob, out=one_minus)
        torch.maximum(prob, one_minus, out=neg_log).log_()                   # -log(1 + e^-|x|)
        torch.clamp(x, min=0, out=pos_log)
        torch.sub(pos_log, neg_log, out=neg_log)                             # -log(1 - p)
        torch.sub(neg_log, x, out=pos_log)                                   # -log p
        pos = one_minus.pow_(gamma).mul_(pos_log)                            # (1-p)^g (-log p)
        neg = neg_log.mul_(prob.pow_(gamma))                                 # p^g (-log(1-p))
        weight = pos.sub_(neg, alpha=(1 - alpha) / alpha)
        torch.matmul(targets[part], weight.transpose(-1, -2), out=weight_t[part])
        pixel_sum(neg, part, neg_sum)
    count = num_pixels if valid is None else valid.sum(-1)[:, None, None]
    focal = (alpha * weight_t.transpose(1, 2) + (1 - alpha) * neg_sum[..., None]) / count
    dice = 1 - (2 * prob_t.transpose(1, 2) + 1) / (prob_sum[..., None] + targets.sum(-1)[:, None, :] + 1)
    return focal, dice


@functools.lru_cache(maxsize=32)
def _nearest_index(in_size: int, out_size: int, device: torch.device) -> Tensor:
    # F.interpolate(mode="nearest"): source index floor(j * in/out), the scale taken in float32; cached, so built
    # outside inference mode (an inference tensor would be refused by a later training step)
    with torch.inference_mode(False):
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        return (torch.arange(out_size, dtype=torch.float32) * scale).floor().long().clamp(max=in_size - 1).to(device)


def downsample_nearest(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """F.interpolate(masks[None].float(), size, mode="nearest")[0] for masks [n, H, W] -> [n, h, w] (bool or float,
    as given), reading only the h*w kept pixels of every mask instead of converting all H*W of them first."""
    (height, width), (h, w) = masks.shape[-2:], size
    if height % h == 0 and width % w == 0:  # source pixel (r * H/h, c * W/w): a strided view, no gather
        return masks[:, :: height // h, :: width // w]
    rows = _nearest_index(height, h, masks.device)
    cols = _nearest_index(width, w, masks.device)
    return masks[:, rows[:, None], cols]


class InPlaceCostMatcher(HungarianMatcher):
    """HungarianMatcher whose mask costs run through `mask_costs`, in work tensors kept between calls, and whose
    ground truth is downsampled by picking the kept pixels (`downsample_nearest`)."""

    _scratch: dict[tuple, list[Tensor]] | None = None

    def scratch(self, like: Tensor, count: int) -> list[Tensor]:
        """`count` work tensors shaped like `like`, kept between calls on CPU.

        Freshly allocated multi-MB CPU tensors are returned to the OS when freed, and touching them again
        costs a page fault per 4 KiB, more than the arithmetic done in them (CUDA's caching allocator
        already avoids this). One shape is kept at a time; it is not part of the state dict.
        """
        if like.device.type != "cpu":
            return [torch.empty_like(like, memory_format=torch.contiguous_format) for _ in range(count)]
        key = (tuple(like.shape), like.dtype, count)
        if self._scratch is None or key not in self._scratch:
            self._scratch = {key: [torch.empty(like.shape, dtype=like.dtype) for _ in range(count)]}
        return self._scratch[key]

    def mask_costs(self, logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return mask_costs(logits, targets, scratch=self.scratch(logits, 4), valid=valid)

    @staticmethod
    def downsample(masks: Tensor, size: tuple[int, int]) -> Tensor:
        return downsample_nearest(masks, size)

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[Indices]:
        """[self(layer, targets) for layer in layers], the L layers' B images costed as one batch of L*B
        (the ground truth prepared once) and brought to the host in one transfer."""
        logits = torch.cat([loss_dtype(layer["pred_logits"]) for layer in layers])       # [L*B, N, K+1]
        masks = torch.cat([loss_dtype(layer["pred_masks"]) for layer in layers])         # [L*B, N, h, w]
        check_targets(targets, layers[0]["pred_logits"].shape[0])
        sizes = [len(t["labels"]) for t in targets]
        if max(sizes, default=0) == 0:
            return [assign([logits.new_zeros(logits.shape[1], 0) for _ in targets]) for _ in layers]
        labels, gt, valid = self.ground_truth(targets, masks.shape[-2:], logits)
        repeat = len(layers)
        valid = None if valid is None else valid.repeat(repeat, 1)
        cost = self.costs(logits, masks, labels.repeat(repeat, 1), gt.repeat(repeat, 1, 1), valid).cpu()
        batch = len(targets)
        pairs = assign([cost[i, :, :sizes[i % batch]] for i in range(repeat * batch)])
        return [pairs[i * batch:(i + 1) * batch] for i in range(repeat)]
