"""Assign predictions to ground-truth segments (paper Sec. 3.2, Table 4a/4b, Table 5).

Every matcher maps `outputs` and a list of per-image `targets` to one `(pred_idx, tgt_idx)` pair of
LongTensors per image: prediction pred_idx[k] is trained towards segment tgt_idx[k]; predictions left out
are trained towards "no object".

- `HungarianMatcher`: bipartite matching on C = -p_i(c_j) + 20 * focal(m_i, m_j) + 1 * dice(m_i, m_j).
- `FixedMatcher`: MaskFormer-fixed, N = K and query i <-> the segment of class i.
- `BoxMatcher`: DETR's box costs (class 1, L1 5, GIoU 2) on a box head's outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mfcore.boxes import pairwise_giou, target_boxes
from mfcore.mask_loss import loss_dtype, pairwise_focal_dice

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


def image_region(target: dict) -> tuple[int, int]:
    """(h, w) of the image inside its ground truth (top-left): target["image_size"] where `collate` padded the
    batch (images of different sizes, no fixed canvas), else the masks' own size. Matching and losses see
    only this region, never the batch padding."""
    height, width = target["masks"].shape[-2:]
    h, w = target.get("image_size", (height, width))
    return min(int(h), height), min(int(w), width)


def assign(costs: list[Tensor]) -> Indices:
    """Minimum-cost one-to-one assignment per image; costs[b]: [N, n_b] -> (pred_idx, tgt_idx)."""
    pairs = [linear_sum_assignment(cost.cpu().numpy()) for cost in costs]
    return [(torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)) for rows, cols in pairs]


class HungarianMatcher(nn.Module):
    """MaskFormer's bipartite matching on class and mask costs."""

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 20.0, cost_dice: float = 1.0) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice

    def mask_costs(self, logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(focal, dice) [B, N, M] of every pair of logits [B, N, P] and binary targets [B, M, P], over the
        pixels `valid` [B, P] (None: all)."""
        return pairwise_focal_dice(logits, targets, valid)

    @staticmethod
    def downsample(masks: Tensor, size: tuple[int, int]) -> Tensor:
        """Binary masks [n, H, W] -> [n, h, w] (float), nearest: costs are computed at the predictions'
        resolution (H/4 x W/4), cheap, and no gradient flows through them."""
        return F.interpolate(masks[None].float(), size=size, mode="nearest")[0]

    @classmethod
    def ground_truth(cls, targets: list[dict], size: tuple[int, int],
                     like: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The batch's segments padded to its largest count M: labels [B, M] (padding 0) and binary masks
        [B, M, h*w] (padding empty) at the predictions' size (h, w), nearest-downsampled, in like's dtype;
        and valid [B, h*w], each image's region (`image_region`) downsampled the same way, None when no image
        is padded. The masks are zeroed outside their image's region."""
        most = max(len(t["labels"]) for t in targets)
        labels = torch.zeros(len(targets), most, dtype=torch.int64, device=like.device)
        gt = like.new_zeros(len(targets), most, size[0] * size[1])
        regions = [image_region(t) for t in targets]
        padded = any(r != tuple(t["masks"].shape[-2:]) for r, t in zip(regions, targets))
        valid = like.new_zeros(len(targets), size[0] * size[1]) if padded else None
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n:
                labels[b, :n] = t["labels"]
                gt[b, :n].view(n, *size).copy_(cls.downsample(t["masks"].to(like.device), size))
            if valid is not None:
                inside = torch.zeros(1, *t["masks"].shape[-2:], dtype=torch.bool, device=like.device)
                inside[:, :regions[b][0], :regions[b][1]] = True
                valid[b].view(1, *size).copy_(cls.downsample(inside, size))
        if valid is not None:
            gt *= valid[:, None]
        return labels, gt, valid

    @torch.no_grad()
    def costs(self, logits: Tensor, masks: Tensor, labels: Tensor, gt: Tensor, valid: Tensor | None = None) -> Tensor:
        """C = cost_class * -p_i(c_j) + cost_mask * focal + cost_dice * dice for logits [B, N, K+1], masks
        [B, N, h, w] and ground_truth's labels [B, M], gt [B, M, h*w], valid [B, h*w] -> [B, N, M]."""
        # -p_i(c_j) rather than DETR's -log p_i(c_j): the probability lies in [0, 1] like the dice cost
        # and the per-pixel focal mean, so no term can dominate the others by going to infinity.
        prob = logits.softmax(-1)                                               # [B, N, K+1]
        cost_class = -prob.gather(2, labels[:, None, :].expand(-1, logits.shape[1], -1))
        focal, dice = self.mask_costs(masks.flatten(2), gt, valid)              # [B, N, M] each
        return self.cost_class * cost_class + self.cost_mask * focal + self.cost_dice * dice

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """outputs["pred_logits"]: [B, N, K+1], outputs["pred_masks"]: [B, N, h, w] -> B costs [N, n_b].

        Ground-truth masks are padded to the batch's largest segment count so all images are costed in
        one batched matrix product; the padding columns are cut off before the assignment. Only the pixels
        of each image's region count (`image_region`): the batch padding of its masks is never costed.
        """
        logits, masks = loss_dtype(outputs["pred_logits"]), loss_dtype(outputs["pred_masks"])
        check_targets(targets, logits.shape[0])
        sizes = [len(t["labels"]) for t in targets]
        if max(sizes, default=0) == 0:
            return [logits.new_zeros(logits.shape[1], 0) for _ in targets]
        cost = self.costs(logits, masks, *self.ground_truth(targets, masks.shape[-2:], logits))
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
        prob = loss_dtype(outputs["pred_logits"]).flatten(0, 1).softmax(-1)   # [B*N, K+1]
        boxes = loss_dtype(outputs["pred_boxes"]).flatten(0, 1)               # [B*N, 4]
        if sum(sizes) == 0:
            return [prob.new_zeros(num_queries, 0) for _ in targets]
        # Boxes are cheap, so cost every prediction against every box of the batch and keep the
        # diagonal blocks (same image), as DETR does.
        labels = torch.cat([t["labels"] for t in targets]).to(prob.device)
        gt_boxes = torch.cat([target_boxes(t) for t in targets]).to(prob.device, boxes.dtype)
        cost = (self.cost_class * -prob[:, labels] + self.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
                - self.cost_giou * pairwise_giou(boxes, gt_boxes)).view(batch, num_queries, -1)
        return [block[b] for b, block in enumerate(cost.split(sizes, dim=-1))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        return assign(self.cost_matrices(outputs, targets))


__all__ = ["HungarianMatcher", "FixedMatcher", "BoxMatcher", "assign", "check_targets", "image_region"]
