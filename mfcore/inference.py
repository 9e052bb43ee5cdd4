"""Mask-classification inference (paper Sec. 3.4): the rules that turn probability-mask pairs into outputs.

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

Padding, resizing and multi-scale testing around these rules live in mfcore.test_time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
