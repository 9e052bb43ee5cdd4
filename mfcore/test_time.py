"""Test time around the inference rules (mfcore.inference): padding, resizing back, multi-scale + flip.

These follow the released code: mask logits (stride 4 of the padded input) are bilinearly upsampled to the
padded size, the padding is cropped, and the result is resized to the original size; multi-scale testing
averages the score maps of every resized (and flipped) view, as the released SemanticSegmentorWithTTA does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Images are padded with the pixel mean (the one copy is mfcore.config.PIXEL_MEAN), so that after the
# model's own normalisation the padding is 0, as in the released code (which pads the already-normalised
# images with zeros).
from mfcore.config import PIXEL_MEAN
from mfcore.inference import semantic_inference

# Released ADE20K-150 multi-scale test: short sides 256..896 (0.5x..1.75x of 512), long side <= 3584.
ADE20K_TTA_SHORT_SIDES = (256, 384, 512, 640, 768, 896)
ADE20K_TTA_MAX_SIZE = 3584


def postprocess_masks(
    masks: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> Tensor:
    """Bring stride-4 logits back to the original image.

    Args:
        masks: [B, N, h, w] or [N, h, w] logits on the padded input (mask logits or per-pixel class
            logits).
        padded_size: (Hp, Wp) of the padded batch; image_size: (H, W) of the image inside it (top-left);
        output_size: (H_out, W_out) of the original image.
    Returns:
        [B, N, H_out, W_out] or [N, H_out, W_out]; bilinear, align_corners=False, as in the released code.
        Channels-last in memory (N innermost), the layout `semantic_inference` and a softmax over
        classes read fastest.
    """
    if masks.dim() not in (3, 4):
        raise ValueError(f"expected masks [B, N, h, w] or [N, h, w], got shape {tuple(masks.shape)}")
    if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
        raise ValueError(f"image_size {tuple(image_size)} does not fit in padded_size {tuple(padded_size)}")
    batched = masks if masks.dim() == 4 else masks[None]
    batched = batched.contiguous(memory_format=torch.channels_last)  # F.interpolate keeps the layout
    batched = F.interpolate(batched, size=tuple(padded_size), mode="bilinear", align_corners=False)
    batched = batched[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):  # at the same size, bilinear resampling returns its input
        batched = F.interpolate(batched, size=tuple(output_size), mode="bilinear", align_corners=False)
    return batched if masks.dim() == 4 else batched[0]


def pad_images(
    images: Sequence[Tensor],
    size_divisibility: int = 32,
    pad_value: float | Sequence[float] = 0.0,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Stack [3, H, W] images into [B, 3, Hp, Wp], padding bottom/right to a multiple of size_divisibility.

    ``pad_value`` is one value or one per channel (pass ``PIXEL_MEAN`` to match the released code).
    Returns the batch and the (H, W) of every image.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected images of shape [3, H, W], got {tuple(image.shape)}")
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    d = size_divisibility
    height = -(-max(h for h, _ in sizes) // d) * d
    width = -(-max(w for _, w in sizes) // d) * d
    fill = torch.as_tensor(pad_value, dtype=images[0].dtype, device=images[0].device).reshape(-1, 1, 1)
    if fill.shape[0] not in (1, 3):
        raise ValueError(f"pad_value must be one value or 3 (one per channel), got {pad_value}")
    batch = fill.expand(3, height, width).repeat(len(images), 1, 1, 1)
    for b, image in enumerate(images):
        batch[b, :, : image.shape[1], : image.shape[2]] = image
    return batch, sizes


@torch.inference_mode()
def predict_semantic(
    model: nn.Module,
    image: Tensor,
    output_size: tuple[int, int] | None = None,
    size_divisibility: int = 32,
    pad_value: float | Sequence[float] = PIXEL_MEAN,
) -> Tensor:
    """Single-scale semantic scores [K, H_out, W_out] for one float RGB image [3, H, W] in 0..255.

    MaskFormer outputs (``pred_logits``, ``pred_masks``) go through semantic inference after the mask
    logits are resized; per-pixel outputs (``sem_seg_logits``) are resized, then softmaxed (the
    released per-pixel models return logits; softmax keeps the argmax and makes scores averageable).
    ``output_size`` defaults to (H, W). The model must be in eval mode.
    """
    if model.training:
        raise ValueError("predict_semantic needs the model in eval mode: call model.eval() first")
    batch, (image_size,) = pad_images([image], size_divisibility, pad_value)
    output_size = tuple(output_size) if output_size is not None else image_size
    outputs = model(batch)
    padded_size = tuple(batch.shape[-2:])
    if "pred_logits" in outputs:
        masks = postprocess_masks(outputs["pred_masks"][0], padded_size, image_size, output_size)
        return semantic_inference(outputs["pred_logits"][0], masks, inplace=True)
    if "sem_seg_logits" in outputs:
        logits = postprocess_masks(outputs["sem_seg_logits"][0], padded_size, image_size, output_size)
        return logits.softmax(dim=0)
    raise ValueError(f"model outputs need 'pred_logits'/'pred_masks' or 'sem_seg_logits', got {sorted(outputs)}")


def shortest_edge_size(height: int, width: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """(H, W) with the short side ``short_side`` and the long side at most ``max_size`` (None: no cap),
    rounded as detectron2's ResizeShortestEdge does; training augmentation and test-time resizing share it."""
    scale = short_side / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_shortest_edge(image: Tensor, short_side: int, max_size: int) -> Tensor:
    """Resize [3, H, W] so its short side is ``short_side`` and its long side at most ``max_size``.

    Sizes are rounded as detectron2's ResizeShortestEdge does; bilinear with antialiasing, close to the
    PIL resize the released pipeline uses on uint8 images.
    """
    new_size = shortest_edge_size(int(image.shape[-2]), int(image.shape[-1]), short_side, max_size)
    return F.interpolate(image[None], size=new_size, mode="bilinear", align_corners=False, antialias=True)[0]


@torch.inference_mode()
def predict_semantic_tta(
    model: nn.Module,
    image: Tensor,
    short_sides: Sequence[int] = ADE20K_TTA_SHORT_SIDES,
    flip: bool = True,
    max_size: int = ADE20K_TTA_MAX_SIZE,
    size_divisibility: int = 32,
    long_side: bool = False,
) -> Tensor:
    """Multi-scale (+ horizontal flip) semantic scores [K, H, W] for one image [3, H, W] in 0..255.

    The image is resized to every short side, optionally flipped, predicted, mapped back to (H, W)
    (flipped back), and the score maps are averaged, as the released SemanticSegmentorWithTTA does.
    long_side: `short_sides` are long sides instead (each is its own cap, `max_size` unused): Mapillary
    Vistas tests at 0.5, 1.0, 1.5 x a long side of 2048.
    """
    output_size = (int(image.shape[-2]), int(image.shape[-1]))
    total: Tensor | None = None
    count = 0
    for short_side in short_sides:
        resized = resize_shortest_edge(image, short_side, short_side if long_side else max_size)
        for flipped in (False, True) if flip else (False,):
            view = resized.flip(-1) if flipped else resized
            scores = predict_semantic(model, view, output_size, size_divisibility)
            scores = scores.flip(-1) if flipped else scores
            total = scores if total is None else total + scores
            count += 1
    if total is None:
        raise ValueError("predict_semantic_tta needs at least one short side")
    return total / count
