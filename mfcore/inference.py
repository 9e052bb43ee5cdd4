"""Mask-classification inference (paper Sec. 3.4) and test-time helpers.

MaskFormer predicts N probability-mask pairs z = {(p_i, m_i)}: ``pred_logits: [N, K+1]`` (the last
column is "no object") and ``pred_masks: [N, H, W]`` mask logits. Two ways turn them into an output:

* **semantic inference** marginalises over the pairs,
  ``score[c, h, w] = sum_i p_i(c) * sigmoid(m_i[h, w])`` for the K real classes, then argmax over c;
* **general inference** hard-assigns each pixel to one pair, ``argmax_{i: c_i != no-object}
  p_i(c_i) * sigmoid(m_i[h, w])``, after dropping low-confidence pairs; it gives panoptic output
  (things keep their own segment, stuff of one class is merged) and, with every class treated as stuff,
  Table VII's "general inference" semantic map;
* **DETR's panoptic post-processing** (`detr_panoptic_inference`), which Table 3 applies to the same model
  for its "MaskFormer (DETR post-processing)" row.

Thresholds (released configs, MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD / OVERLAP_THRESHOLD): object-mask
threshold 0.8 on COCO panoptic, **0.7 on ADE20K panoptic**; 0.3 for Table VII's general semantic inference
(Appendix); overlap threshold 0.8 everywhere.

The resize helpers follow the released code: mask logits (stride 4 of the padded input) are bilinearly
upsampled to the padded size, the padding is cropped, and the result is resized to the original size.
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

# Released ADE20K-150 multi-scale test: short sides 256..896 (0.5x..1.75x of 512), long side <= 3584.
ADE20K_TTA_SHORT_SIDES = (256, 384, 512, 640, 768, 896)
ADE20K_TTA_MAX_SIZE = 3584


def _check_pairs(pred_logits: Tensor, pred_masks: Tensor, batched: bool = False) -> None:
    """pred_logits [N, K+1] and pred_masks [N, H, W]; with `batched`, any leading dims shared by both."""
    lead = max(pred_logits.dim() - 2, 0) if batched else 0
    if (pred_logits.dim() != 2 + lead or pred_masks.dim() != 3 + lead
            or pred_logits.shape[:-1] != pred_masks.shape[:-2]):
        dims = "*, " if batched else ""
        raise ValueError(
            f"expected pred_logits [{dims}N, K+1] and pred_masks [{dims}N, H, W] with the same N, got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
        )


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor, inplace: bool = False) -> Tensor:
    """Per-pixel class scores of semantic inference (paper Sec. 3.4).

    Args:
        pred_logits: [*, N, K+1] class logits; the last column is "no object".
        pred_masks: [*, N, H, W] mask logits (* = optional batch dims, the same in both).
        inplace: overwrite pred_masks with their sigmoid instead of allocating a second tensor of their
            size (for callers whose masks are a temporary, e.g. just upsampled).
    Returns:
        [*, K, H, W] scores ``sum_i softmax(p_i)[c] * sigmoid(m_i)``; "no object" is dropped so every
        pixel takes a real label at the argmax. The scores are computed pixel-major, as
        [*, H*W, N] @ [*, N, K], and returned as a view of that [*, H, W, K] result: an argmax over
        classes then reads contiguous memory. Masks whose query axis is innermost in memory (as
        `postprocess_masks` and channels-last F.interpolate give) enter the product without a copy.
    """
    _check_pairs(pred_logits, pred_masks, batched=True)
    probs = pred_logits.softmax(dim=-1)[..., :-1]  # [*, N, K]
    height, width = pred_masks.shape[-2:]
    mask_probs = pred_masks.sigmoid_() if inplace else pred_masks.sigmoid()
    pixels = mask_probs.movedim(-3, -1).flatten(-3, -2)  # [*, H*W, N]
    return torch.matmul(pixels, probs).unflatten(-2, (height, width)).movedim(-1, -3)


def confident_queries(pred_logits: Tensor, object_mask_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """p_i(c_i) [N], c_i [N] (K = "no object") and which queries pass the class rules of general and
    instance inference: c_i is a real class and p_i(c_i) > object_mask_threshold."""
    scores, labels = pred_logits.softmax(dim=-1).max(dim=-1)
    return scores, labels, (labels != pred_logits.shape[-1] - 1) & (scores > object_mask_threshold)


# Per-query outcomes of general inference, in the order its rules apply (`panoptic_queries`).
QUERY_STATUSES = ("no object", "below object threshold", "empty", "overlap", "kept")


def panoptic_queries(
    pred_logits: Tensor,
    pred_masks: Tensor,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> dict:
    """The query-level decisions of general inference: which queries are kept, which pixels each wins.

    The rules (the one place they live; `panoptic_inference` and the explorer apply them through here):
    query i is dropped as "no object" if its most likely class c_i is "no object", as "below object
    threshold" if p_i(c_i) <= object_mask_threshold; the others are candidates, and each pixel goes to
    argmax over candidates of p_i(c_i) * sigmoid(m_i[h, w]); a candidate is then dropped as "empty" if it
    wins no pixel or its own mask {sigmoid(m_i) >= 0.5} is empty, as "overlap" if the area it wins is
    < overlap_threshold x its own area; the rest are "kept".

    Args:
        pred_logits: [N, K+1] class logits (last column "no object"); pred_masks: [N, H, W] mask logits.
    Returns:
        {"scores": [N] p_i(c_i), "labels": [N] c_i (K = no object), "candidates": [M] query indices passing
        the class rules, "probs": [M, H, W] their sigmoid masks, "winner": [H, W] int64 index into
        `candidates` of the candidate winning each pixel (None when M = 0), "won": [M] pixels each wins,
        "area": [M] its own mask area, "status": N strings of QUERY_STATUSES}.
    """
    _check_pairs(pred_logits, pred_masks)
    num_classes = pred_logits.shape[1] - 1
    scores, labels, confident = confident_queries(pred_logits, object_mask_threshold)
    candidates = confident.nonzero().flatten()
    probs = pred_masks[candidates].sigmoid()
    winner, won, area = None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    if len(candidates):
        winner = (scores[candidates, None, None] * probs).argmax(dim=0)  # [H, W]
        won = torch.bincount(winner.flatten(), minlength=len(candidates)).cpu()
        area = (probs >= 0.5).flatten(1).sum(dim=1).cpu()
    status = ["no object" if int(c) == num_classes else "below object threshold" for c in labels.tolist()]
    # the overlap rule in float64, as Python compares the ints with the threshold
    dropped = (won == 0) | (area == 0) | (won.double() < overlap_threshold * area.double())
    for j, q in enumerate(candidates.tolist()):
        status[q] = ("empty" if won[j] == 0 or area[j] == 0 else "overlap") if dropped[j] else "kept"
    return {"scores": scores, "labels": labels, "candidates": candidates, "probs": probs, "winner": winner,
            "won": won, "area": area, "status": status}


def panoptic_inference(
    pred_logits: Tensor,
    pred_masks: Tensor,
    thing_ids: Sequence[int] | set[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[Tensor, list[dict]]:
    """General inference into a panoptic segmentation (COCO: thresholds 0.8 / 0.8; ADE20K: 0.7 / 0.8).

    Args:
        pred_logits: [N, K+1] class logits; the last column is "no object".
        pred_masks: [N, H, W] mask logits at the output resolution.
        thing_ids: contiguous class indices (0..K-1) that are "things"; every other class is "stuff".
        object_mask_threshold, overlap_threshold: which queries are kept (`panoptic_queries`); the pixels
            a dropped query wins stay VOID.
    Returns:
        segmentation: [H, W] int32 segment ids, 0 = VOID, ids start at 1.
        segments: one dict per segment, ``{"id", "category_id" (contiguous class index), "isthing",
            "score"}``; ``score`` is p_i(c_i) of the query (the highest one for merged stuff).
    """
    queries = panoptic_queries(pred_logits, pred_masks, object_mask_threshold, overlap_threshold)
    segmentation = torch.zeros(pred_masks.shape[-2:], dtype=torch.int32, device=pred_masks.device)
    segments: list[dict] = []
    thing_ids = {int(t) for t in thing_ids}
    stuff_segment: dict[int, dict] = {}  # class -> its single merged stuff segment
    for j, q in enumerate(queries["candidates"].tolist()):
        if queries["status"][q] != "kept":
            continue
        assigned = queries["winner"] == j
        category = int(queries["labels"][q])
        score = float(queries["scores"][q])
        isthing = category in thing_ids
        if not isthing and category in stuff_segment:
            merged = stuff_segment[category]
            segmentation[assigned] = merged["id"]
            merged["score"] = max(merged["score"], score)
            continue
        segment = {"id": len(segments) + 1, "category_id": category, "isthing": isthing, "score": score}
        segmentation[assigned] = segment["id"]
        segments.append(segment)
        if not isthing:
            stuff_segment[category] = segment
    return segmentation, segments


DETR_SCORE_THRESHOLD = 0.85  # DETR's PostProcessPanoptic(threshold=0.85), the rule of Table 3's DETR row
DETR_MIN_AREA = 4             # DETR drops a segment of <= 4 pixels and assigns its pixels again


def detr_panoptic_inference(
    pred_logits: Tensor,
    pred_masks: Tensor,
    thing_ids: Sequence[int] | set[int],
    score_threshold: float = DETR_SCORE_THRESHOLD,
    min_area: int = DETR_MIN_AREA,
) -> tuple[Tensor, list[dict]]:
    """DETR's panoptic post-processing (Carion et al. 2020, `PostProcessPanoptic`) on MaskFormer's pairs:
    Table 3's "MaskFormer (DETR post-processing)" row, the same model read out with DETR's rule.

    Query i is kept if c_i is a real class and p_i(c_i) > score_threshold (0.85). Each pixel goes to
    argmax over kept queries of the mask logit m_i[h, w] (the class score takes no part, unlike general
    inference, and there is no overlap rule: no pixel is left VOID while a query is kept). Stuff queries of
    one class are merged into the first of them; then, while some kept query wins <= min_area pixels, those
    queries are dropped and the pixels assigned again among the rest, as DETR does it: without merging
    stuff again, so a stuff query merged away (0 pixels) is dropped and its pixels go to the next-best mask.
    Areas are counted at the masks' resolution (DETR counts them after resizing its id map to the output size).

    Args and returns as `panoptic_inference` (pred_masks at the output resolution); VOID (id 0) only when no
    query passes the threshold.
    """
    _check_pairs(pred_logits, pred_masks)
    scores, labels, keep = confident_queries(pred_logits, score_threshold)
    queries = keep.nonzero().flatten()
    thing_ids = {int(t) for t in thing_ids}
    merge_stuff = True
    while len(queries):
        winner = pred_masks[queries].argmax(dim=0)                              # [H, W] index into queries
        if merge_stuff:
            first: dict[int, int] = {}                                          # stuff class -> its first query
            owner = [j if int(labels[q]) in thing_ids else first.setdefault(int(labels[q]), j)
                     for j, q in enumerate(queries.tolist())]
            winner = torch.as_tensor(owner, device=winner.device)[winner]
        area = torch.bincount(winner.flatten(), minlength=len(queries))
        small = area <= min_area
        if not small.any():
            break
        queries, merge_stuff = queries[~small.to(queries.device)], False
    if len(queries) == 0:
        return torch.zeros(pred_masks.shape[-2:], dtype=torch.int32, device=pred_masks.device), []
    segments = [{"id": j + 1, "category_id": int(labels[q]), "isthing": int(labels[q]) in thing_ids,
                 "score": float(scores[q])} for j, q in enumerate(queries.tolist())]
    return (winner + 1).to(torch.int32), segments


def general_semantic_inference(
    pred_logits: Tensor,
    pred_masks: Tensor,
    object_mask_threshold: float = 0.3,
    overlap_threshold: float = 0.8,
    ignore_label: int = 255,
) -> Tensor:
    """Table VII's "general inference" for semantic segmentation: a label map [H, W] (int64).

    Panoptic inference with every class treated as stuff (same-class segments merge); VOID pixels
    (no kept query, or a dropped query) get ``ignore_label``.
    """
    segmentation, segments = panoptic_inference(
        pred_logits, pred_masks, thing_ids=(), object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold,
    )
    # Lookup table segment id -> class; index 0 (VOID) -> ignore_label.
    lut = torch.full((len(segments) + 1,), ignore_label, dtype=torch.int64, device=pred_masks.device)
    for segment in segments:
        lut[segment["id"]] = segment["category_id"]
    return lut[segmentation.long()]


def instance_inference(
    pred_logits: Tensor,
    pred_masks: Tensor,
    object_mask_threshold: float = 0.0,
    mask_threshold: float = 0.5,
) -> dict[str, Tensor]:
    """One instance per kept query, for mask AP.

    Rule: keep query i if its most likely class c_i is not "no object" and p_i(c_i) >
    ``object_mask_threshold``; its mask is sigmoid(m_i) >= ``mask_threshold``; its score is
    ``p_i(c_i) * mean(sigmoid(m_i) over the mask)``. Queries with an empty mask are dropped.

    Returns:
        {"masks": [M, H, W] bool, "labels": [M] int64 (contiguous), "scores": [M] float}.
    """
    _check_pairs(pred_logits, pred_masks)
    scores, labels, keep = confident_queries(pred_logits, object_mask_threshold)
    probs = pred_masks[keep].sigmoid()  # [M, H, W]
    masks = probs >= mask_threshold
    area = masks.flatten(1).sum(dim=1)
    mask_score = (probs * masks).flatten(1).sum(dim=1) / area.clamp(min=1)
    nonempty = area > 0
    return {
        "masks": masks[nonempty],
        "labels": labels[keep][nonempty],
        "scores": (scores[keep] * mask_score)[nonempty],
    }


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
