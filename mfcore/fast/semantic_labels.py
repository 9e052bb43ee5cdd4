"""Semantic inference straight to a label map, in tiles of rows (the fast path for predictions).

`inference.semantic_inference` returns the K score maps, which multi-scale testing averages. When only
the labels are wanted, materialising everything at full resolution is what costs: at 512x512, N=100,
K=150 the upsampled masks are 105 MB and the scores 157 MB, so the upsampling, the sigmoid, the product
and the argmax each stream through main memory (~165 ms of a 550 ms CPU prediction). Here the same
computation runs a few output rows at a time, so every intermediate stays in cache:

    labels[h, w] = argmax_c  sum_i softmax(p_i)[c] * sigmoid(m_i[h, w])       (paper Sec. 3.4)

with m_i the mask logits bilinearly upsampled to the padded input, the padding cropped and the result
resized to the output size (the released semantic inference), all with align_corners=False. Bilinear resizing is separable:
the width is resized once for the whole map by F.interpolate (the height left as it is), and the height
tile by tile as a product with the rows of a resize matrix (`mask_loss.interpolation_matrix`), which
touches only the few low-resolution rows a tile needs. The values equal the unfused path's up to float
rounding. With one tile per image (a GPU's default) each image's map is computed whole instead, through
`test_time.postprocess_masks`: on a GPU the row product only adds work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mfcore.fast.mask_loss import interpolation_matrix
from mfcore.test_time import postprocess_masks


def _resize_width(masks: Tensor, padded_width: int, image_width: int, output_width: int) -> Tensor:
    """[B, N, h, w] -> [B, N, h, output_width], channels-last (query axis innermost)."""
    height = masks.shape[-2]
    # clone, not contiguous: a [1, N, h, w] map straight from a channels-last conv can have a batch stride
    # other than N*h*w; `contiguous` accepts it as channels-last, F.interpolate does not (and runs its slow
    # strided kernel into an NCHW result)
    masks = masks.clone(memory_format=torch.channels_last)
    masks = F.interpolate(masks, size=(height, padded_width), mode="bilinear", align_corners=False)
    masks = masks[..., :image_width]
    if output_width != image_width:
        masks = F.interpolate(masks, size=(height, output_width), mode="bilinear", align_corners=False)
    return masks.contiguous(memory_format=torch.channels_last)


def semantic_labels(
    pred_logits: Tensor,
    pred_masks: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int] | None = None,
    output_size: tuple[int, int] | None = None,
    rows_per_tile: int | None = None,
) -> Tensor:
    """Label map of semantic inference, = semantic_inference(logits, postprocess_masks(...)).argmax(-3).

    Args:
        pred_logits: [B, N, K+1] class logits; the last column is "no object" (dropped).
        pred_masks: [B, N, h, w] mask logits on the padded input (stride 4).
        padded_size: (Hp, Wp) of the padded input; image_size: (H, W) of the image inside it (top-left),
            default the padded size; output_size: (H_out, W_out), default the image size.
        rows_per_tile: output rows computed together. Default: 8 on CPU (the intermediates of a tile
            then fit in cache), all rows at once on a GPU (one kernel per step is faster there); as
            many rows as the output has, or more, compute each image's map whole.
    Returns:
        [B, H_out, W_out] int64 class indices.
    """
    if pred_logits.dim() != 3 or pred_masks.dim() != 4 or pred_logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(f"expected pred_logits [B, N, K+1] and pred_masks [B, N, h, w] with the same B and N, "
                         f"got {tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}")
    image_size = tuple(image_size or padded_size)
    output_size = tuple(output_size or image_size)
    if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
        raise ValueError(f"image_size {image_size} does not fit in padded_size {tuple(padded_size)}")
    batch, queries, height = pred_masks.shape[:3]
    out_h, out_w = output_size
    tile = rows_per_tile or (8 if pred_masks.device.type == "cpu" else out_h)

    if tile >= out_h:  # one tile per image (the GPU default)
        return _whole_map_labels(pred_logits, pred_masks, padded_size, image_size, output_size)

    # height: upsample to the padded height, crop, resize to the output height, as one matrix [out_h, h]
    device = pred_masks.device
    rows = interpolation_matrix(height, padded_size[0], device)[: image_size[0]]
    if out_h != image_size[0]:
        rows = interpolation_matrix(image_size[0], out_h, device) @ rows
    rows = rows.to(pred_masks.dtype)
    # the low-resolution rows each output row reads (on the host: the tiles are sliced in Python)
    used = rows.ne(0)
    first, last = used.float().argmax(1).tolist(), (height - 1 - used.flip(1).float().argmax(1)).tolist()

    class_probs = pred_logits.float().softmax(-1)[..., :-1].transpose(1, 2)                   # [B, K, N]
    class_probs = class_probs.to(pred_masks.dtype).contiguous()
    masks = _resize_width(pred_masks, padded_size[1], image_size[1], out_w)       # [B, N, h, out_w]

    def tile_scores(b: int, start: int, stop: int) -> Tensor:
        """Class-major scores [K, T*out_w] of output rows start..stop of image b."""
        low_rows = masks[b].permute(1, 2, 0).reshape(height, out_w * queries)   # [h, out_w*N], no copy
        lo, hi = first[start], max(last[start:stop]) + 1
        probs = (rows[start:stop, lo:hi] @ low_rows[lo:hi]).sigmoid_()         # [T, out_w*N]
        # class-major, so that the max over classes runs along contiguous pixels
        return class_probs[b] @ probs.view(-1, queries).t()

    def pixels(b: int, start: int, stop: int) -> slice:
        """Where rows start..stop of image b lie in the flat label map."""
        return slice((b * out_h + start) * out_w, (b * out_h + stop) * out_w)

    tiles = [(b, start, min(start + tile, out_h)) for b in range(batch) for start in range(0, out_h, tile)]
    labels = torch.empty(batch * out_h * out_w, dtype=torch.long, device=device)
    if device.type != "cpu":  # rows_per_tile given on a GPU: torch.max's indices are cheap there
        for b, start, stop in tiles:
            labels[pixels(b, start, stop)] = tile_scores(b, start, stop).max(0).indices
        return labels.view(batch, out_h, out_w)

    # On CPU, torch.max's indices over the class axis cost ~5x its values (amax). So each tile marks the
    # classes that reach the maximum, hits [K, P] in {0, 1}, and one product with the rows (c, 1) gives per
    # pixel the sum of those classes and their count: the class itself where the count is 1. Rows with a
    # tie (or a NaN: count 0) are redone with torch.max, which takes the first class.
    classes = class_probs.shape[1]
    pick = torch.stack([torch.arange(classes, dtype=torch.float32), torch.ones(classes)])  # [2, K], exact < 2^24
    hits = torch.empty(classes, min(tile, out_h) * out_w)
    found = torch.empty(2, batch * out_h * out_w)                                   # (sum of c, count)
    for b, start, stop in tiles:
        scores = tile_scores(b, start, stop)
        tile_hits = hits[:, :scores.shape[1]]
        torch.eq(scores, scores.amax(0), out=tile_hits)
        torch.mm(pick, tile_hits, out=found[:, pixels(b, start, stop)])
    labels.copy_(found[0])
    tied = found[1].ne(1).view(batch, out_h, out_w).any(-1).nonzero().tolist()   # [[b, row], ...]
    for b, start in sorted({(b, row - row % tile) for b, row in tied}):
        stop = min(start + tile, out_h)
        labels[pixels(b, start, stop)] = tile_scores(b, start, stop).max(0).indices
    return labels.view(batch, out_h, out_w)


def _whole_map_labels(pred_logits: Tensor, pred_masks: Tensor, padded_size: tuple[int, int],
                      image_size: tuple[int, int], output_size: tuple[int, int]) -> Tensor:
    """The label map one image at a time at full resolution (a GPU's default): the resize by F.interpolate,
    not a product with the resize matrix's rows, which have 2 non-zeros each (at 512x512, 3.4 G multiply-
    adds per image spent on zeros). On an H100 as fast as the one-tile row product was (the class product
    and the passes over the upsampled masks are the cost), with fewer operators."""
    batch, queries = pred_masks.shape[:2]
    class_probs = pred_logits.float().softmax(-1)[..., :-1].to(pred_masks.dtype)               # [B, N, K]
    labels = torch.empty(batch, output_size[0] * output_size[1], dtype=torch.long, device=pred_masks.device)
    for b in range(batch):
        masks = postprocess_masks(pred_masks[b], padded_size, image_size, output_size)  # [N, H, W], N innermost
        probs = masks.permute(1, 2, 0).reshape(-1, queries).sigmoid_()                      # [H*W, N]
        labels[b] = (probs @ class_probs[b]).max(1).indices   # the first class at the maximum, as torch.max
    return labels.view(batch, *output_size)
