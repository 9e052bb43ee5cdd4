"""Boxes for the box-matching ablation (paper Table 5): ground-truth boxes from masks, GIoU.

Boxes travel as (cx, cy, w, h) normalized by the image size, the format DETR's box head predicts
(3-layer MLP -> 4 -> sigmoid). As in DETR, that is the size of the image itself, before it is padded into
a batch: a box covering the whole image is (0.5, 0.5, 1, 1) however much padding its batch adds.
torchvision does the geometry; this module only fixes conventions.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, masks_to_boxes


def masks_to_cxcywh(masks: Tensor, image_size: tuple[int, int] | None = None) -> Tensor:
    """Tight boxes around binary masks.

    masks: [n, H, W] (bool / uint8 / float, nonzero = inside), possibly padded bottom/right
    image_size: the unpadded (h, w) the boxes are normalized by; None: the masks' own (H, W)
    returns: [n, 4] float (cx, cy, w, h) in [0, 1], normalized by (w, h); an empty mask gives all zeros.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks: expected shape [n, H, W], got {tuple(masks.shape)}")
    n, height, width = masks.shape
    if image_size is not None:
        height, width = int(image_size[0]), int(image_size[1])
        if not (0 < height <= masks.shape[1] and 0 < width <= masks.shape[2]):
            raise ValueError(f"image_size {tuple(image_size)}: expected a size within the masks' "
                             f"{tuple(masks.shape[1:])}")
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
    """target["boxes"] ([n, 4] normalized cxcywh) if given, else boxes computed from target["masks"],
    normalized by target["image_size"] (the image before batch padding, as DETR) where the target has it."""
    if "boxes" in target:
        return target["boxes"].float()
    return masks_to_cxcywh(target["masks"], target.get("image_size"))


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def pairwise_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of every pair. boxes1: [N, 4], boxes2: [M, 4] (cxcywh) -> [N, M]."""
    return generalized_box_iou(cxcywh_to_xyxy(boxes1), cxcywh_to_xyxy(boxes2))


__all__ = ["masks_to_cxcywh", "target_boxes", "cxcywh_to_xyxy", "pairwise_giou"]
