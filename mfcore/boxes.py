"""Boxes for the box-matching ablation (paper Table 5): ground-truth boxes from masks, GIoU.

Boxes travel as (cx, cy, w, h) normalized by the image size, the format DETR's box head predicts
(3-layer MLP -> 4 -> sigmoid). torchvision does the geometry; this module only fixes conventions.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, masks_to_boxes


def masks_to_cxcywh(masks: Tensor) -> Tensor:
    """Tight boxes around binary masks.

    masks: [n, H, W] (bool / uint8 / float, nonzero = inside)
    returns: [n, 4] float (cx, cy, w, h) in [0, 1], normalized by (W, H); an empty mask gives all zeros.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks: expected shape [n, H, W], got {tuple(masks.shape)}")
    n, height, width = masks.shape
    boxes = torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    nonempty = (masks.flatten(1) != 0).any(dim=1)
    if nonempty.any():
        # masks_to_boxes returns the indices of the first and last covered pixel (inclusive); +1 turns
        # the last index into the far pixel edge, so a one-pixel mask has width 1/W and a full mask 1.
        xyxy = masks_to_boxes(masks[nonempty]).float()
        xyxy[:, 2:] += 1.0
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=masks.device)
        boxes[nonempty] = box_convert(xyxy, in_fmt="xyxy", out_fmt="cxcywh") / scale
    return boxes


def target_boxes(target: dict) -> Tensor:
    """target["boxes"] ([n, 4] normalized cxcywh) if given, else boxes computed from target["masks"]."""
    if "boxes" in target:
        return target["boxes"].float()
    return masks_to_cxcywh(target["masks"])


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def pairwise_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of every pair. boxes1: [N, 4], boxes2: [M, 4] (cxcywh) -> [N, M]."""
    return generalized_box_iou(cxcywh_to_xyxy(boxes1), cxcywh_to_xyxy(boxes2))


__all__ = ["masks_to_cxcywh", "target_boxes", "cxcywh_to_xyxy", "pairwise_giou"]
