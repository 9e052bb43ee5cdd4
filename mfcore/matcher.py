"""Assign predictions to ground-truth segments (paper Sec. 3.2, Table 4a/4b, Table 5).

Every matcher maps `outputs` and a list of per-image `targets` to one `(pred_idx, tgt_idx)` pair of
LongTensors per image: prediction pred_idx[k] is trained towards segment tgt_idx[k]; predictions left out
are trained towards "no object".

- `HungarianMatcher`: bipartite matching on C = -p_i(c_j) + 20 * focal(m_i, m_j) + 1 * dice(m_i, m_j).
- `FixedMatcher`: MaskFormer-fixed, N = K and query i <-> the segment of class i.
- `BoxMatcher`: DETR's box costs (class 1, L1 5, GIoU 2) on a box head's outputs.
"""
from __future__ import annotations

import functools

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mfcore.boxes import pairwise_giou, target_boxes

Indices = list[tuple[Tensor, Tensor]]


def check_targets(targets: list[dict], batch_size: int) -> None:
    """Raise ValueError unless `targets` holds one {"labels": [n], "masks": [n, H, W]} per image."""
    if len(targets) != batch_size:
        raise ValueError(f"targets: expected {batch_size} dicts (one per image), got {len(targets)}")
    for b, t in enumerate(targets):
        if "labels" not in t or "masks" not in t:
            raise ValueError(f"targets[{b}]: expected keys 'labels' and 'masks', got {sorted(t)}")
        labels, masks = t["labels"], t["masks"]
        if labels.dim() != 1 or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(f"targets[{b}]: expected labels [n] and masks [n, H, W], got "
                             f"{tuple(labels.shape)} and {tuple(masks.shape)}")


def mask_costs(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
               scratch: list[Tensor] | None = None, per_image: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-pixel mean sigmoid focal loss and dice loss of every (prediction, target) pair.

    logits: [B, N, P]; targets: [B, M, P] in {0, 1} -> (focal, dice), each [B, N, M].
    With p = sigmoid(x), pos = (1-p)^g (-log p) and neg = p^g (-log(1-p)), both are linear in t:

        sum_pixels focal(x, t) = a pos.t + (1-a) neg.(1-t) = a (pos - (1-a)/a neg).t + (1-a) sum(neg)
        dice(m, t)             = 1 - (2 p.t + 1) / (sum(p) + sum(t) + 1)

    so each needs one matrix product with the targets and one sum per prediction.
    scratch: 4 work tensors shaped like logits (None: allocated here). per_image (default: on CPU) sends the
    images through them one at a time: fewer multi-MB buffers in flight, so more of them stay in cache (~6%
    faster on CPU); on a GPU the whole batch goes at once (fewer kernel launches).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha}: expected 0 < alpha <= 1")
    batch, num_preds, num_pixels = logits.shape
    scratch = scratch or [torch.empty_like(logits, memory_format=torch.contiguous_format) for _ in range(4)]
    # [B, M, N]: with few targets (M ~ 8) BLAS runs t @ v^T ~25% faster than v @ t^T on CPU
    weight_t, prob_t = (logits.new_empty(batch, targets.shape[1], num_preds) for _ in range(2))
    neg_sum, prob_sum = (logits.new_empty(batch, num_preds) for _ in range(2))
    if per_image is None:
        per_image = logits.device.type == "cpu"
    parts = range(batch) if per_image else [slice(None)]                 # an image [N, P] or all [B, N, P]
    for part in parts:
        x, (one_minus, neg_log, pos_log, prob) = logits[part], (s[part] for s in scratch)
        torch.sigmoid(x, out=prob)
        torch.matmul(targets[part], prob.transpose(-1, -2), out=prob_t[part])
        torch.sum(prob, -1, out=prob_sum[part])
        # -log(1 - p) = softplus(x) = relu(x) + log(1 + e^-|x|) and -log p = softplus(x) - x.
        # log(1 + e^-|x|) = -log max(p, 1 - p): the max is >= 1/2, so its log is exact to float rounding
        # and costs one fast log instead of the slow log1p(exp()) of F.softplus (the hot spot here).
        torch.sub(1, prob, out=one_minus)
        torch.maximum(prob, one_minus, out=neg_log).log_()                   # -log(1 + e^-|x|)
        torch.clamp(x, min=0, out=pos_log)
        torch.sub(pos_log, neg_log, out=neg_log)                             # -log(1 - p)
        torch.sub(neg_log, x, out=pos_log)                                   # -log p
        pos = one_minus.pow_(gamma).mul_(pos_log)                            # (1-p)^g (-log p)
        neg = neg_log.mul_(prob.pow_(gamma))                                 # p^g (-log(1-p))
        weight = pos.sub_(neg, alpha=(1 - alpha) / alpha)
        torch.matmul(targets[part], weight.transpose(-1, -2), out=weight_t[part])
        torch.sum(neg, -1, out=neg_sum[part])
    focal = (alpha * weight_t.transpose(1, 2) + (1 - alpha) * neg_sum[..., None]) / num_pixels
    dice = 1 - (2 * prob_t.transpose(1, 2) + 1) / (prob_sum[..., None] + targets.sum(-1)[:, None, :] + 1)
    return focal, dice


@functools.lru_cache(maxsize=32)
def _nearest_index(in_size: int, out_size: int, device: torch.device) -> Tensor:
    # F.interpolate(mode="nearest"): source index floor(j * in/out), the scale taken in float32;
    # cached, so built outside inference mode (an inference tensor would be refused by a later training step)
    with torch.inference_mode(False):
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        return (torch.arange(out_size, dtype=torch.float32) * scale).floor().long().clamp(max=in_size - 1).to(device)


def downsample_nearest(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """F.interpolate(masks[None].float(), size, mode="nearest")[0] for masks [n, H, W] -> [n, h, w] (float32),
    by picking the source pixels: it reads only the h*w kept pixels of every mask."""
    (height, width), (h, w) = masks.shape[-2:], size
    if height % h == 0 and width % w == 0:  # source pixel (r * H/h, c * W/w): a strided view, no gather
        return masks[:, :: height // h, :: width // w].float()
    rows = _nearest_index(masks.shape[-2], size[0], masks.device)
    cols = _nearest_index(masks.shape[-1], size[1], masks.device)
    return masks[:, rows[:, None], cols].float()


def assign(costs: list[Tensor]) -> Indices:
    """Minimum-cost one-to-one assignment per image; costs[b]: [N, n_b] -> (pred_idx, tgt_idx)."""
    pairs = [linear_sum_assignment(cost.cpu().numpy()) for cost in costs]
    return [(torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)) for rows, cols in pairs]


class HungarianMatcher(nn.Module):
    """MaskFormer's bipartite matching on class and mask costs."""

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 20.0, cost_dice: float = 1.0) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self._scratch: dict[tuple, list[Tensor]] = {}

    def scratch(self, like: Tensor, count: int) -> list[Tensor]:
        """`count` work tensors shaped like `like`, kept between calls on CPU.

        Freshly allocated multi-MB CPU tensors are returned to the OS when freed, and touching them again
        costs a page fault per 4 KiB, more than the arithmetic done in them (CUDA's caching allocator
        already avoids this). One shape is kept at a time; it is not part of the state dict.
        """
        if like.device.type != "cpu":
            return [torch.empty_like(like, memory_format=torch.contiguous_format) for _ in range(count)]
        key = (tuple(like.shape), like.dtype, count)
        if key not in self._scratch:
            self._scratch = {key: [torch.empty(like.shape, dtype=like.dtype) for _ in range(count)]}
        return self._scratch[key]

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """outputs["pred_logits"]: [B, N, K+1], outputs["pred_masks"]: [B, N, h, w] -> B costs [N, n_b].

        Ground-truth masks are padded to the batch's largest segment count so all images are costed in
        one batched matrix product; the padding columns are cut off before the assignment.
        """
        logits = outputs["pred_logits"].float()
        masks = outputs["pred_masks"].float()
        batch, num_queries = logits.shape[:2]
        check_targets(targets, batch)
        sizes = [len(t["labels"]) for t in targets]
        most = max(sizes, default=0)
        if most == 0:
            return [logits.new_zeros(num_queries, 0) for _ in targets]
        height, width = masks.shape[-2:]
        labels = torch.zeros(batch, most, dtype=torch.int64, device=logits.device)
        gt = logits.new_empty(batch, most, height * width)
        for b, (t, n) in enumerate(zip(targets, sizes)):
            gt[b, n:] = 0
            if n:
                labels[b, :n] = t["labels"]
                # Costs are computed at the prediction's resolution (H/4 x W/4): cheap, and no gradient.
                gt[b, :n].view(n, height, width).copy_(downsample_nearest(t["masks"], (height, width)))

        # -p_i(c_j) rather than DETR's -log p_i(c_j): the probability lies in [0, 1] like the dice cost
        # and the per-pixel focal mean, so no term can dominate the others by going to infinity.
        prob = logits.softmax(-1)                                               # [B, N, K+1]
        cost_class = -prob.gather(2, labels[:, None, :].expand(batch, num_queries, most))
        flat = masks.flatten(2)                                                 # [B, N, h*w]
        focal, dice = mask_costs(flat, gt, 0.25, 2.0, self.scratch(flat, 4))    # [B, N, max n] each
        cost = self.cost_class * cost_class + self.cost_mask * focal + self.cost_dice * dice
        return [cost[b, :, :n] for b, n in enumerate(sizes)]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        return assign(self.cost_matrices(outputs, targets))


class FixedMatcher(nn.Module):
    """MaskFormer-fixed (Table 4a): N = K; query i <-> the segment of class i, "no object" if absent.

    Semantic targets hold one segment per class. With instance-level targets (several segments of one
    class) a class-indexed query can only stand for one of them: we take the largest, so that the
    supervised mask covers most of the class's pixels; the others stay unmatched (no mask loss).
    Merge instances into one mask per class beforehand to supervise all of them.
    """

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        batch, num_queries, num_logits = outputs["pred_logits"].shape
        num_classes = num_logits - 1
        if num_queries != num_classes:
            raise ValueError(f"FixedMatcher: needs as many queries as classes, got N={num_queries}, "
                             f"K={num_classes}")
        check_targets(targets, batch)
        indices = []
        for b, t in enumerate(targets):
            labels = t["labels"].cpu()
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"targets[{b}]['labels']: expected values in [0, {num_classes}), "
                                 f"got {labels.tolist()}")
            areas = t["masks"].flatten(1).float().sum(1).cpu()
            classes = labels.unique()                                  # sorted: query i = class i
            chosen = [int(torch.nonzero(labels == c)[areas[labels == c].argmax()]) for c in classes]
            indices.append((classes.to(torch.int64), torch.tensor(chosen, dtype=torch.int64)))
        return indices


class BoxMatcher(nn.Module):
    """DETR's bipartite matching on class, L1 box and GIoU costs (box-matching ablation, Table 5)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """outputs["pred_logits"]: [B, N, K+1], outputs["pred_boxes"]: [B, N, 4] -> B costs [N, n_b]."""
        if "pred_boxes" not in outputs:
            raise ValueError("BoxMatcher: outputs has no 'pred_boxes'; build the model with a box head")
        batch, num_queries = outputs["pred_logits"].shape[:2]
        check_targets(targets, batch)
        sizes = [len(t["labels"]) for t in targets]
        prob = outputs["pred_logits"].float().flatten(0, 1).softmax(-1)       # [B*N, K+1]
        boxes = outputs["pred_boxes"].float().flatten(0, 1)                   # [B*N, 4]
        if sum(sizes) == 0:
            return [prob.new_zeros(num_queries, 0) for _ in targets]
        # Boxes are cheap, so cost every prediction against every box of the batch and keep the
        # diagonal blocks (same image), as DETR does.
        labels = torch.cat([t["labels"] for t in targets]).to(prob.device)
        gt_boxes = torch.cat([target_boxes(t) for t in targets]).to(prob.device)
        cost = (self.cost_class * -prob[:, labels] + self.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
                - self.cost_giou * pairwise_giou(boxes, gt_boxes)).view(batch, num_queries, -1)
        return [block[b] for b, block in enumerate(cost.split(sizes, dim=-1))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        return assign(self.cost_matrices(outputs, targets))


__all__ = ["HungarianMatcher", "FixedMatcher", "BoxMatcher", "mask_costs", "downsample_nearest",
           "assign", "check_targets"]
