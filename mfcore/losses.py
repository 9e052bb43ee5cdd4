"""Training losses: MaskFormer's mask-classification loss and the per-pixel baselines' cross-entropy.

L_mask-cls = sum_j [ -log p_sigma(j)(c_j^gt) + 1[c_j^gt != no object] L_mask(m_sigma(j), m_j^gt) ]   (paper Eq. 1)
L_mask = 20 * focal + 1 * dice; "no object" has weight 0.1 in the cross-entropy.

Criteria return a dict of *unweighted* terms; `criterion.weight_dict` holds their weights and
`total_loss` combines them. `build_criterion` turns a loss config into a criterion.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from mfcore.boxes import cxcywh_to_xyxy, target_boxes
from mfcore.mask_loss import dice_loss, focal_dice, loss_dtype, sigmoid_focal_loss
from mfcore.matcher import (
    BoxMatcher,
    FixedMatcher,
    HungarianMatcher,
    Indices,
    check_targets,
    image_region,
)
from mfcore.training.distributed import all_reduce_mean

LOSS_TERMS = {"labels": {"loss_ce": 1.0}, "masks": {"loss_mask": 20.0, "loss_dice": 1.0},
              "boxes": {"loss_bbox": 5.0, "loss_giou": 2.0}}


def point_sample(inputs: Tensor, coords: Tensor, mode: str = "bilinear") -> Tensor:
    """Values of inputs [M, C, H, W] at coords [M, P, 2] ((x, y) in [0, 1]) -> [M, C, P].

    align_corners=False with border padding samples exactly what F.interpolate(bilinear,
    align_corners=False) would give at the same place, so point losses estimate the dense ones.
    """
    grid = 2 * coords[:, :, None, :] - 1
    return F.grid_sample(inputs, grid, mode=mode, padding_mode="border", align_corners=False)[..., 0]


@torch.no_grad()
def sample_uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float,
                            importance_sample_ratio: float, extent: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """PointRend-style importance sampling. logits: [M, 1, h, w] -> coords [M, num_points, 2] in
    [0, extent[0]) x [0, extent[1]) (x, y), the part of the frame the image covers (the rest is batch padding).

    Draw oversample_ratio * num_points uniform points, keep the importance_sample_ratio * num_points
    most uncertain (uncertainty = -|logit|, highest at the decision boundary), fill up with uniform points.
    """
    num_masks = logits.shape[0]
    # the points in the logits' dtype: grid_sample needs input and grid of one dtype (float64 runs too)
    scale = logits.new_tensor(extent)
    candidates = torch.rand(num_masks, int(num_points * oversample_ratio), 2, device=logits.device,
                            dtype=logits.dtype) * scale
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()                 # [M, S]
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    uncertain = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    uniform = torch.rand(num_masks, num_points - num_uncertain, 2, device=logits.device, dtype=logits.dtype) * scale
    return torch.cat([uncertain, uniform], dim=1)


def average_num_masks(targets: list[dict], device: torch.device) -> float:
    """Ground-truth segments in the batch, averaged over processes when distributed, at least 1."""
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    return max(all_reduce_mean(count).item(), 1.0)


def _with_aux_weights(base: dict[str, float], deep_supervision: bool, num_aux_layers: int) -> dict[str, float]:
    weights = dict(base)
    for i in range(num_aux_layers if deep_supervision else 0):
        weights.update({f"{name}_{i}": w for name, w in base.items()})
    return weights


def aux_outputs(outputs: dict, deep_supervision: bool, num_aux_layers: int) -> list[dict]:
    aux = outputs.get("aux_outputs", []) if deep_supervision else []
    if len(aux) > num_aux_layers:
        raise ValueError(f"outputs['aux_outputs']: {len(aux)} layers, but the criterion was built with "
                         f"num_aux_layers={num_aux_layers} (decoder layers - 1)")
    return aux


class SetCriterion(nn.Module):
    """Match, then CE over all queries + focal/dice (+ L1/GIoU) on matched pairs, per decoder layer."""

    def __init__(self, num_classes: int, matcher: nn.Module, eos_coef: float = 0.1,
                 losses: tuple[str, ...] = ("labels", "masks"), num_points: int | None = None,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 deep_supervision: bool = True, num_aux_layers: int = 5) -> None:
        super().__init__()
        unknown = sorted(set(losses) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"SetCriterion losses: unknown {unknown}; expected a subset of {sorted(LOSS_TERMS)}")
        if num_points is not None and num_points < 1:
            raise ValueError(f"SetCriterion num_points={num_points}: expected None (dense) or >= 1")
        if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"SetCriterion: expected oversample_ratio >= 1 and importance_sample_ratio in "
                             f"[0, 1], got {oversample_ratio} and {importance_sample_ratio}")
        self.num_classes, self.matcher, self.losses = num_classes, matcher, tuple(losses)
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision, self.num_aux_layers = deep_supervision, num_aux_layers
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef                     # down-weight the many "no object" queries
        self.register_buffer("empty_weight", empty_weight)
        base = {name: w for kind in self.losses for name, w in LOSS_TERMS[kind].items()}
        self.weight_dict = _with_aux_weights(base, deep_supervision, num_aux_layers)

    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices) -> dict[str, Tensor]:
        """CE over all B*N queries, weighted mean (weight 0.1 for "no object"); not divided by num_masks."""
        logits = loss_dtype(outputs["pred_logits"])                              # [B, N, K+1]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits: expected {self.num_classes + 1} classes (K+1), got {logits.shape[-1]}")
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            classes[b, src.to(logits.device)] = targets[b]["labels"].to(logits.device)[tgt.to(logits.device)]
        weight = self.empty_weight.to(logits.dtype)
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, weight=weight)}

    def loss_masks(self, outputs: dict, targets: list[dict], indices: Indices, num_masks: float) -> dict[str, Tensor]:
        """Focal (per-pixel mean) and dice of matched pairs, each summed over masks / num_masks.

        Dense (num_points=None, as the paper): logits upsampled to the ground truth's size. With
        num_points both losses are evaluated at num_points sampled points per mask instead, which
        avoids the [m, H, W] upsampled logits and cuts memory.
        """
        pred = outputs["pred_masks"]                                             # [B, N, h, w]
        if sum(len(src) for src, _ in indices) == 0:
            # no segment in the batch: zero, but attached to the graph so backward() works
            zero = pred.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        if self.num_points is None:
            focal, dice = self.dense_focal_dice(pred, targets, indices)
        else:
            focal, dice = self._point_focal_dice(pred, targets, indices)
        return {"loss_mask": focal.sum() / num_masks, "loss_dice": dice.sum() / num_masks}

    @staticmethod
    def matched_pairs(pred: Tensor, targets: list[dict],
                      indices: Indices) -> Iterator[tuple[Tensor, Tensor, tuple[int, int]]]:
        """For each image with matches: (stride-4 logits [m, h, w], ground truth [m, H, W], the image's region
        (h_img, w_img) in it, `image_region`) of its matched pairs, in matching order."""
        for b, (src, tgt) in enumerate(indices):
            if len(src) == 0:
                continue
            logits = loss_dtype(pred[b, src.to(pred.device)])
            masks = targets[b]["masks"]
            yield logits, masks[tgt.to(masks.device)].to(pred.device, logits.dtype), image_region(targets[b])

    def dense_focal_dice(self, pred: Tensor, targets: list[dict], indices: Indices) -> tuple[Tensor, Tensor]:
        """(focal [M], dice [M]) of the matched pairs, the logits pred [B, N, h, w] bilinearly upsampled to their
        ground truth's size [H, W], then both cut to the image's region: the batch padding enters no loss, and
        focal is the mean over the image's pixels. Images in order, pairs in matching order."""
        terms = [focal_dice(F.interpolate(logits[:, None], size=gt.shape[-2:], mode="bilinear",
                                          align_corners=False)[:, 0, :h, :w].flatten(1), gt[:, :h, :w].flatten(1))
                 for logits, gt, (h, w) in self.matched_pairs(pred, targets, indices)]
        return torch.cat([f for f, _ in terms]), torch.cat([d for _, d in terms])

    def _point_focal_dice(self, pred: Tensor, targets: list[dict], indices: Indices) -> tuple[Tensor, Tensor]:
        """Losses at num_points importance-sampled points per matched mask, all inside the image's region
        -> (focal [M], dice [M])."""
        terms = []
        for logits, gt, (h, w) in self.matched_pairs(pred, targets, indices):
            coords = sample_uncertain_points(logits[:, None], self.num_points, self.oversample_ratio,
                                             self.importance_sample_ratio, (w / gt.shape[-1], h / gt.shape[-2]))
            terms.append(focal_dice(point_sample(logits[:, None], coords)[:, 0],
                                    point_sample(gt[:, None], coords, mode="nearest")[:, 0]))  # gt stays binary
        return torch.cat([f for f, _ in terms]), torch.cat([d for _, d in terms])

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_masks: float) -> dict[str, Tensor]:
        """L1 and GIoU losses of matched (cx, cy, w, h) boxes, each summed / num_masks."""
        if "pred_boxes" not in outputs:
            raise ValueError("SetCriterion 'boxes' loss: outputs has no 'pred_boxes'; add the box head")
        boxes = outputs["pred_boxes"]                                            # [B, N, 4]
        src = loss_dtype(torch.cat([boxes[b, i.to(boxes.device)] for b, (i, _) in enumerate(indices)]))
        gt = torch.cat([target_boxes(t).to(boxes.device)[j.to(boxes.device)]
                        for t, (_, j) in zip(targets, indices)]).to(src.dtype)
        if len(src) == 0:
            zero = boxes.sum() * 0.0
            return {"loss_bbox": zero, "loss_giou": zero}
        giou = generalized_box_iou_loss(cxcywh_to_xyxy(src), cxcywh_to_xyxy(gt), reduction="sum")
        return {"loss_bbox": F.l1_loss(src, gt, reduction="sum") / num_masks, "loss_giou": giou / num_masks}

    def match(self, layers: list[dict], targets: list[dict]) -> list[Indices]:
        """Each decoder layer's own matching (deep supervision matches every layer anew)."""
        return [self.matcher(layer, targets) for layer in layers]

    def layer_losses(self, outputs: dict, targets: list[dict], indices: Indices, num_masks: float) -> dict[str, Tensor]:
        """All terms for one decoder layer's outputs, given that layer's matching."""
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices))
        if "masks" in self.losses:
            losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        check_targets(targets, outputs["pred_logits"].shape[0])
        num_masks = average_num_masks(targets, outputs["pred_logits"].device)
        layers = [outputs, *aux_outputs(outputs, self.deep_supervision, self.num_aux_layers)]
        losses = {}
        for i, (layer, indices) in enumerate(zip(layers, self.match(layers, targets))):
            suffix = f"_{i - 1}" if i else ""  # the last layer's terms unsuffixed, then aux layers 0..L-2
            losses.update({k + suffix: v for k, v in self.layer_losses(layer, targets, indices, num_masks).items()})
        return losses


def semantic_target(target: dict, ignore_index: int = 255) -> Tensor:
    """[H, W] class map: target["sem_seg"], or built from labels + masks (pixels no mask covers = ignore)."""
    if "sem_seg" in target:
        return target["sem_seg"].long()
    masks, labels = target["masks"].bool(), target["labels"].long()
    sem = torch.full(masks.shape[-2:], ignore_index, dtype=torch.int64, device=masks.device)
    if len(labels):
        first = masks.to(torch.uint8).argmax(0)                 # first segment covering each pixel
        sem = torch.where(masks.any(0), labels.to(masks.device)[first], sem)
    return sem


class PerPixelCriterion(nn.Module):
    """Per-pixel cross-entropy of PerPixelBaseline(+): logits upsampled x4 to the label map, ignore 255."""

    def __init__(self, num_classes: int, ignore_index: int = 255, deep_supervision: bool = True,
                 num_aux_layers: int = 5) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.deep_supervision, self.num_aux_layers = deep_supervision, num_aux_layers
        self.weight_dict = _with_aux_weights({"loss_ce": 1.0}, deep_supervision, num_aux_layers)

    def cross_entropy(self, logits: Tensor, sem: list[Tensor]) -> Tensor:
        """logits: [B, K, h, w], sem: B maps [H, W] -> mean CE over the batch's non-ignored pixels."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"sem_seg_logits: expected {self.num_classes} classes, got {logits.shape[1]}")
        total, count = logits.new_zeros(()), 0
        for b, target in enumerate(sem):  # images may differ in size, so upsample each to its own map
            up = F.interpolate(loss_dtype(logits[b:b + 1]), size=target.shape, mode="bilinear", align_corners=False)
            total = total + F.cross_entropy(up, target[None], ignore_index=self.ignore_index, reduction="sum")
            count += int((target != self.ignore_index).sum())
        return total / max(count, 1)

    def semantic_targets(self, logits: Tensor, targets: list[dict]) -> list[Tensor]:
        """The B label maps [H, W] of `targets` on the logits' device, every label checked."""
        if len(targets) != logits.shape[0]:
            raise ValueError(f"targets: expected {logits.shape[0]} dicts (one per image), got {len(targets)}")
        sem = [semantic_target(t, self.ignore_index).to(logits.device) for t in targets]
        for b, s in enumerate(sem):
            bad = (s != self.ignore_index) & ((s < 0) | (s >= self.num_classes))
            if bad.any():
                raise ValueError(f"targets[{b}]: labels {s[bad].unique().tolist()} outside [0, "
                                 f"{self.num_classes}) and not ignore_index={self.ignore_index}")
        return sem

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        logits = outputs["sem_seg_logits"]
        sem = self.semantic_targets(logits, targets)
        losses = {"loss_ce": self.cross_entropy(logits, sem)}
        for i, aux in enumerate(aux_outputs(outputs, self.deep_supervision, self.num_aux_layers)):
            losses[f"loss_ce_{i}"] = self.cross_entropy(aux["sem_seg_logits"], sem)
        return losses


def total_loss(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """sum_k weight_dict[k] * losses[k]; a term without a weight is an error, not silently dropped."""
    if not losses:
        raise ValueError("total_loss: losses is empty; expected at least one term")
    missing = sorted(set(losses) - set(weight_dict))
    if missing:
        raise ValueError(f"total_loss: no weight for {missing}; weights exist for {sorted(weight_dict)}")
    return sum(weight_dict[k] * v for k, v in losses.items())


def build_criterion(kind: str, num_classes: int, num_queries: int, *, cost_class: float = 1.0,
                    cost_mask: float = 20.0, cost_dice: float = 1.0, eos_coef: float = 0.1,
                    num_points: int | None = None, deep_supervision: bool = True, dec_layers: int = 6,
                    ignore_index: int = 255) -> nn.Module:
    """Criterion for kind "hungarian" | "fixed" | "box" | "perpixel" (mfcore.config.LossConfig.matcher)."""
    aux = dec_layers - 1
    if kind == "perpixel":
        return PerPixelCriterion(num_classes, ignore_index, deep_supervision, num_aux_layers=aux)
    if kind == "hungarian":
        matcher, losses = HungarianMatcher(cost_class, cost_mask, cost_dice), ("labels", "masks")
    elif kind == "fixed":
        if num_queries != num_classes:
            raise ValueError(f"fixed matching needs num_queries == num_classes, got {num_queries} and {num_classes}")
        matcher, losses = FixedMatcher(), ("labels", "masks")
    elif kind == "box":
        matcher, losses = BoxMatcher(), ("labels", "masks", "boxes")
    else:
        raise ValueError(f"build_criterion kind={kind!r}: expected 'hungarian', 'fixed', 'box' or 'perpixel'")
    return SetCriterion(num_classes, matcher, eos_coef=eos_coef, losses=losses, num_points=num_points,
                        deep_supervision=deep_supervision, num_aux_layers=aux)


__all__ = ["SetCriterion", "PerPixelCriterion", "build_criterion", "total_loss", "sigmoid_focal_loss", "dice_loss",
           "focal_dice", "loss_dtype", "point_sample", "sample_uncertain_points", "semantic_target",
           "average_num_masks"]
