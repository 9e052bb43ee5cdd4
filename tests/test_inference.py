"""Tests of mfcore.inference against hand-built cases and brute-force formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mfcore.inference import (
    detr_panoptic_inference,
    general_semantic_inference,
    instance_inference,
    panoptic_inference,
    panoptic_queries,
    semantic_inference,
)
from mfcore.config import PIXEL_MEAN
from mfcore.test_time import (
    pad_images,
    postprocess_masks,
    predict_semantic,
    predict_semantic_tta,
    resize_shortest_edge,
)

BIG = 20.0  # mask logit whose sigmoid is ~1 (inside) or ~0 (outside)


def class_logits(rows: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probability rows (each sums to 1)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def box_mask(h: int, w: int, rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.full((h, w), -BIG, dtype=torch.float64)
    mask[rows, cols] = BIG
    return mask


def test_semantic_inference_matches_double_loop():
    torch.manual_seed(0)
    n, k, h, w = 5, 4, 3, 6
    logits, masks = torch.randn(n, k + 1), torch.randn(n, h, w)
    out = semantic_inference(logits, masks)
    expected = torch.zeros(k, h, w)
    for c in range(k):
        for i in range(n):
            p = math.exp(logits[i, c]) / sum(math.exp(v) for v in logits[i].tolist())
            expected[c] += p * torch.sigmoid(masks[i])
    assert out.shape == (k, h, w)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_semantic_inference_rejects_mismatched_queries():
    with pytest.raises(ValueError, match="same N"):
        semantic_inference(torch.zeros(3, 5), torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="same N"):  # batch dims must agree too
        semantic_inference(torch.zeros(2, 3, 5), torch.zeros(1, 3, 2, 2))


def test_semantic_inference_any_mask_layout_batch_and_inplace():
    """Pixel-major scores equal the class-major product sum_i p_i(c) sigmoid(m_i) in every layout."""
    torch.manual_seed(0)
    b, n, k, h, w = 2, 7, 5, 6, 9
    logits, masks = torch.randn(b, n, k + 1), 3 * torch.randn(b, n, h, w)
    expected = torch.einsum("bnc,bnhw->bchw", logits.softmax(-1)[..., :-1], masks.sigmoid())
    channels_last = masks.contiguous(memory_format=torch.channels_last)
    cropped = F.pad(channels_last, (0, 3, 0, 2))[..., :h, :w]  # a padded map's crop, as postprocess_masks gives
    for layout in (masks, channels_last, cropped):
        torch.testing.assert_close(semantic_inference(logits, layout), expected)
        for i in range(b):
            torch.testing.assert_close(semantic_inference(logits[i], layout[i]), expected[i])
    scores = semantic_inference(logits, channels_last, inplace=True)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(channels_last, masks.sigmoid())  # overwritten with the probabilities


def _panoptic_case():
    """K = 3 (0 person = thing, 1 sky, 2 grass = stuff), no-object index 3, image 4 x 6."""
    h, w = 4, 6
    probs = [
        [0.95, 0.02, 0.02, 0.01],  # q0 person, cols 0-1
        [0.95, 0.02, 0.02, 0.01],  # q1 person, cols 2-3
        [0.05, 0.90, 0.04, 0.01],  # q2 sky, rows 0-1 col 4
        [0.05, 0.90, 0.04, 0.01],  # q3 sky, rows 0-1 col 5 -> merged with q2
        [0.02, 0.03, 0.90, 0.05],  # q4 grass, rows 2-3 cols 4-5
        [0.003, 0.003, 0.004, 0.99],  # q5 "no object" at 0.99, mask everywhere -> dropped
        [0.10, 0.10, 0.50, 0.30],  # q6 grass at 0.5 < 0.8 -> dropped
    ]
    masks = torch.stack([
        box_mask(h, w, slice(None), slice(0, 2)),
        box_mask(h, w, slice(None), slice(2, 4)),
        box_mask(h, w, slice(0, 2), slice(4, 5)),
        box_mask(h, w, slice(0, 2), slice(5, 6)),
        box_mask(h, w, slice(2, 4), slice(4, 6)),
        torch.full((h, w), BIG, dtype=torch.float64),
        torch.full((h, w), BIG, dtype=torch.float64),
    ])
    return class_logits(probs), masks


def test_panoptic_things_separate_stuff_merged_no_object_dropped():
    logits, masks = _panoptic_case()
    seg, segments = panoptic_inference(logits, masks, thing_ids={0})
    expected = torch.tensor([
        [1, 1, 2, 2, 3, 3],
        [1, 1, 2, 2, 3, 3],
        [1, 1, 2, 2, 4, 4],
        [1, 1, 2, 2, 4, 4],
    ], dtype=torch.int32)
    assert seg.dtype == torch.int32
    assert torch.equal(seg, expected)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [
        (1, 0, True), (2, 0, True), (3, 1, False), (4, 2, False)
    ]
    assert segments[0]["score"] == pytest.approx(0.95)
    assert segments[3]["score"] == pytest.approx(0.90)


def test_panoptic_overlap_drop():
    h, w = 4, 6
    logits = class_logits([[0.99, 0.01], [0.85, 0.15]])  # K = 1 thing, no-object index 1
    masks = torch.stack([box_mask(h, w, slice(None), slice(0, 4)), box_mask(h, w, slice(None), slice(2, 6))])
    # q1 owns 16 pixels but wins only cols 4-5 (8 px): 8 < 0.8 * 16 -> dropped, its pixels VOID.
    seg, segments = panoptic_inference(logits, masks, thing_ids=[0])
    assert [s["id"] for s in segments] == [1]
    assert torch.equal(seg[:, :4], torch.ones(h, 4, dtype=torch.int32))
    assert torch.equal(seg[:, 4:], torch.zeros(h, 2, dtype=torch.int32))
    # With threshold 0.5 it covers exactly half of its mask and is kept as a second thing.
    seg, segments = panoptic_inference(logits, masks, thing_ids=[0], overlap_threshold=0.5)
    assert [s["id"] for s in segments] == [1, 2]
    assert torch.equal(seg[:, 4:], torch.full((h, 2), 2, dtype=torch.int32))


def test_panoptic_below_threshold_gives_all_void():
    h, w = 3, 3
    logits = class_logits([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2]])
    masks = torch.full((2, h, w), BIG, dtype=torch.float64)
    for threshold in (0.8, 0.7):  # COCO and ADE20K thresholds; the test is strict ">"
        seg, segments = panoptic_inference(logits, masks, thing_ids=[0], object_mask_threshold=threshold)
        assert segments == []
        assert torch.equal(seg, torch.zeros(h, w, dtype=torch.int32))
    _, segments = panoptic_inference(logits, masks, thing_ids=[0], object_mask_threshold=0.6)
    assert len(segments) == 1  # q0 wins every pixel (ties go to the first query), q1 gets 0 px


def test_detr_panoptic_inference_assigns_by_mask_logit_and_drops_below_085():
    """DETR's rule: a query passes at p_i(c_i) > 0.85 (0.82 does not, though general inference's 0.8 keeps
    it); pixels go to the highest mask logit, whatever the class score, and none is left VOID."""
    h, w = 4, 6
    logits = class_logits([[0.86, 0.04, 0.10], [0.99, 0.005, 0.005], [0.03, 0.82, 0.15]])  # 0 thing, 1 stuff
    masks = torch.stack([box_mask(h, w, slice(None), slice(0, 4)), box_mask(h, w, slice(None), slice(2, 6)),
                         torch.full((h, w), BIG + 2, dtype=torch.float64)])
    masks[0, :, 2:4] = BIG + 1  # q0's mask logit is higher on the overlap, though q1's class score is higher
    seg, segments = detr_panoptic_inference(logits, masks, thing_ids=[0])
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [(1, 0, True), (2, 0, True)]
    assert [s["score"] for s in segments] == pytest.approx([0.86, 0.99])
    assert (seg[:, :4] == 1).all() and (seg[:, 4:] == 2).all()
    # general inference on the two things assigns by p_i(c_i) * sigmoid(m_i): q1 takes the overlap, q0 is
    # dropped by the overlap rule and its pixels are VOID
    general, kept = panoptic_inference(logits[:2], masks[:2], thing_ids=[0])
    assert [s["score"] for s in kept] == pytest.approx([0.99]) and (general[:, :2] == 0).all()
    _, none = detr_panoptic_inference(class_logits([[0.84, 0.06, 0.10]]), masks[:1], thing_ids=[0])
    assert none == []  # 0.84 < 0.85: nothing kept, all VOID


def test_detr_panoptic_inference_reassigns_small_segments_and_merged_stuff():
    """A query winning <= 4 pixels is dropped and its pixels go to the next-best mask (no VOID); a second
    stuff query of one class is merged away first, then dropped, so its pixels go to the next-best mask too."""
    h, w = 4, 6
    logits = class_logits([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.9, 0.05]])
    masks = torch.stack([box_mask(h, w, slice(None), slice(0, 3)),   # q0 thing, cols 0-2
                         box_mask(h, w, slice(0, 1), slice(0, 2)),   # q1 thing, 2 pixels of q0's
                         box_mask(h, w, slice(0, 2), slice(3, 6)),   # q2 stuff, top right
                         box_mask(h, w, slice(2, 4), slice(3, 6))])  # q3 stuff of q2's class, bottom right
    masks[1, 0, :2] = BIG + 1
    masks[2, 2:, 3:] = 0.0                                           # q2 is next best where q3 wins
    seg, segments = detr_panoptic_inference(logits, masks, thing_ids=[0])
    assert [(s["id"], s["category_id"]) for s in segments] == [(1, 0), (2, 1)]
    assert (seg[:, :3] == 1).all() and (seg[:, 3:] == 2).all()


def test_general_semantic_inference_merges_and_marks_void():
    logits, masks = _panoptic_case()
    labels = general_semantic_inference(logits, masks, object_mask_threshold=0.3)
    # q6 (grass, 0.5) now passes 0.3, but owns all 24 pixels and wins none -> dropped by overlap.
    expected = torch.tensor([[0, 0, 0, 0, 1, 1]] * 2 + [[0, 0, 0, 0, 2, 2]] * 2)
    assert torch.equal(labels, expected)
    # Nothing kept -> every pixel takes the ignore label.
    labels = general_semantic_inference(logits, masks, object_mask_threshold=0.99, ignore_label=255)
    assert torch.equal(labels, torch.full((4, 6), 255))


def test_instance_inference_scores():
    logits = class_logits([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]])
    masks = torch.tensor([
        [[2.0, 0.0], [-3.0, -3.0]],  # sigmoid >= 0.5 on (0,0), (0,1)
        [[5.0, 5.0], [5.0, 5.0]],  # "no object" argmax -> dropped
        [[-1.0, -1.0], [-1.0, -1.0]],  # empty mask -> dropped
    ], dtype=torch.float64)
    out = instance_inference(logits, masks)
    assert out["masks"].tolist() == [[[True, True], [False, False]]]
    assert out["labels"].tolist() == [0]
    expected = 0.9 * (torch.sigmoid(torch.tensor(2.0)) + 0.5) / 2
    assert out["scores"].item() == pytest.approx(expected.item())


def test_postprocess_masks_crop_and_resize_values():
    # 4 x 4 logits at stride 4 of a 16 x 16 padded input; the image is the top-left 8 x 12.
    masks = torch.ones(1, 1, 4, 4)
    masks[..., 3] = -5.0  # the cells over the right padding
    out = postprocess_masks(masks, (16, 16), (8, 12), (8, 12))
    assert out.shape == (1, 1, 8, 12)
    # x-sample of output column j is (j + 0.5) / 4 - 0.5: columns 0..9 see cells 0..2 only.
    torch.testing.assert_close(out[0, 0, :, :10], torch.ones(8, 10))
    torch.testing.assert_close(out[0, 0, :, 10], torch.full((8,), 1 - 6 * 0.125))  # 0.125 of cell 3
    torch.testing.assert_close(out[0, 0, :, 11], torch.full((8,), 1 - 6 * 0.375))
    big = postprocess_masks(masks[0], (16, 16), (8, 12), (16, 24))
    assert big.shape == (1, 16, 24)
    torch.testing.assert_close(big[0, :, :18], torch.ones(16, 18))
    with pytest.raises(ValueError, match="does not fit"):
        postprocess_masks(masks, (16, 16), (20, 12), (20, 12))


@pytest.mark.parametrize("output_size", [(21, 30), (40, 17)])
def test_postprocess_masks_equals_upsample_crop_resize(output_size):
    """The released code's two resizes; at output size = image size the second one returns its input
    exactly, so postprocess_masks skips it."""
    torch.manual_seed(0)
    masks = 5 * torch.randn(2, 7, 8, 8)
    upsampled = F.interpolate(masks, size=(32, 32), mode="bilinear", align_corners=False)[..., :21, :30]
    expected = F.interpolate(upsampled, size=output_size, mode="bilinear", align_corners=False)
    out = postprocess_masks(masks, (32, 32), (21, 30), output_size)
    assert torch.equal(out, expected)
    assert torch.equal(postprocess_masks(masks[0], (32, 32), (21, 30), output_size), expected[0])


def test_pad_images():
    a, b = torch.full((3, 30, 40), 7.0), torch.full((3, 33, 20), 9.0)
    batch, sizes = pad_images([a, b], size_divisibility=32, pad_value=PIXEL_MEAN)
    assert batch.shape == (2, 3, 64, 64)
    assert sizes == [(30, 40), (33, 20)]
    assert torch.all(batch[0, :, :30, :40] == 7.0) and torch.all(batch[1, :, :33, :20] == 9.0)
    for c, mean in enumerate(PIXEL_MEAN):
        assert torch.all(batch[0, c, 30:] == torch.tensor(mean))
        assert torch.all(batch[1, c, :, 20:] == torch.tensor(mean))
    batch, _ = pad_images([torch.zeros(3, 32, 32)], pad_value=1.0)
    assert batch.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        pad_images([torch.zeros(1, 8, 8)])


class FixedMaskFormer(nn.Module):
    """Returns fixed pairs; mask logits at stride 4 of whatever padded input it gets."""

    def __init__(self, logits: torch.Tensor, masks: torch.Tensor):
        super().__init__()
        self.logits, self.masks = logits, masks
        self.seen: list[torch.Tensor] = []

    def forward(self, images):
        self.seen.append(images)
        h, w = images.shape[-2] // 4, images.shape[-1] // 4
        masks = F.interpolate(self.masks[None], size=(h, w), mode="nearest")
        return {"pred_logits": self.logits[None], "pred_masks": masks}


class PooledPixelModel(nn.Module):
    """Per-pixel model following the content: logit_c = (4x4-pooled channel c) / 50."""

    def forward(self, images):
        return {"sem_seg_logits": F.avg_pool2d(images, 4)[:, :2] / 50.0}


class RampPixelModel(nn.Module):
    """Per-pixel model tied to absolute position: class-0 logit grows with the column."""

    def forward(self, images):
        b, _, h, w = images.shape
        ramp = torch.linspace(-3, 3, w // 4).expand(b, 1, h // 4, w // 4)
        return {"sem_seg_logits": torch.cat([ramp, torch.zeros_like(ramp)], dim=1)}


def test_predict_semantic_maskformer_fake_model():
    torch.manual_seed(0)
    logits, masks = torch.randn(3, 5), torch.randn(3, 8, 8)
    model = FixedMaskFormer(logits, masks).eval()
    image = torch.rand(3, 20, 30) * 255
    scores = predict_semantic(model, image)
    assert scores.shape == (4, 20, 30)
    padded = model.seen[0]
    assert padded.shape == (1, 3, 32, 32)
    torch.testing.assert_close(padded[0, :, :20, :30], image)
    assert padded[0, 0, 25, 5].item() == pytest.approx(PIXEL_MEAN[0])
    mask_logits = F.interpolate(masks[None], size=(8, 8), mode="nearest")[0]
    expected = semantic_inference(logits, postprocess_masks(mask_logits, (32, 32), (20, 30), (20, 30)))
    torch.testing.assert_close(scores, expected)
    assert predict_semantic(model, image, output_size=(40, 60)).shape == (4, 40, 60)
    with pytest.raises(ValueError, match="eval"):
        predict_semantic(model.train(), image)


def test_predict_semantic_per_pixel_is_softmax():
    image = torch.zeros(3, 32, 32)
    image[0, :, :16] = 200.0  # left half red -> class 0
    image[1, :, 16:] = 200.0  # right half green -> class 1
    scores = predict_semantic(PooledPixelModel().eval(), image)
    torch.testing.assert_close(scores.sum(0), torch.ones(32, 32))
    assert torch.all(scores[:, :, :14].argmax(0) == 0) and torch.all(scores[:, :, 18:].argmax(0) == 1)


def test_resize_shortest_edge():
    image = torch.rand(3, 32, 48)
    assert resize_shortest_edge(image, 64, 1000).shape == (3, 64, 96)
    assert resize_shortest_edge(image, 64, 80).shape == (3, 53, 80)  # long side capped: 32 * 80 / 48


def test_tta_flip_back_and_scale_average():
    image = torch.zeros(3, 32, 64)
    image[0, :, :20] = 255.0
    image[1, :, 20:] = 255.0
    model = PooledPixelModel().eval()
    # The model follows the content, so a correctly flipped-back flip equals the plain prediction.
    single = predict_semantic(model, image)
    torch.testing.assert_close(predict_semantic_tta(model, image, short_sides=(32,), flip=True), single)
    # Several scales: the mean of the per-scale maps, each brought back to 32 x 64.
    two = predict_semantic_tta(model, image, short_sides=(32, 64), flip=False)
    upscaled = predict_semantic(model, resize_shortest_edge(image, 64, 10_000), output_size=(32, 64))
    torch.testing.assert_close(two, (single + upscaled) / 2)


def test_tta_flip_symmetrises_position_bias():
    image = torch.rand(3, 32, 64) * 255
    model = RampPixelModel().eval()
    plain = predict_semantic_tta(model, image, short_sides=(32,), flip=False)
    flipped = predict_semantic_tta(model, image, short_sides=(32,), flip=True)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)
    torch.testing.assert_close(flipped, flipped.flip(-1))


def test_panoptic_queries_decide_what_panoptic_inference_keeps():
    torch.manual_seed(0)
    # queries 0-3 each own a quadrant; 4-7 are random: between them every status occurs
    logits, masks = torch.randn(8, 5) * 3, torch.randn(8, 16, 16) * 4
    logits[:4] = -5.0
    for q in range(4):
        logits[q, q] = 5.0
        masks[q] = -BIG
        masks[q, 8 * (q // 2):8 * (q // 2) + 8, 8 * (q % 2):8 * (q % 2) + 8] = BIG
    queries = panoptic_queries(logits, masks, 0.3, 0.8)
    _, segments = panoptic_inference(logits, masks, thing_ids=range(4), object_mask_threshold=0.3,
                                       overlap_threshold=0.8)
    kept = [q for q, s in enumerate(queries["status"]) if s == "kept"]
    assert len(segments) == len(kept) > 0  # all things: one segment per kept query
    assert set(queries["status"]) <= {"no object", "below object threshold", "empty", "overlap", "kept"}
    for j, q in enumerate(queries["candidates"].tolist()):
        # the overlap rule on exact integers, as a reader would check it by hand
        own, won = int((masks[q].sigmoid() >= 0.5).sum()), int((queries["winner"] == j).sum())
        assert (queries["status"][q] == "kept") == (won > 0 and own > 0 and won >= 0.8 * own)


def test_tta_long_side_scales_resize_the_long_side():
    """Mapillary's multi-scale test: each size is the long side (0.5, 1.0, 1.5 x 2048), not the short one."""
    image = torch.rand(3, 32, 64) * 255
    model = PooledPixelModel().eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    long = predict_semantic_tta(model, image, short_sides=(32, 64, 96), flip=False, long_side=True)
    assert seen == [(32, 32), (32, 64), (64, 96)]  # resized 16x32, 32x64, 48x96, padded to multiples of 32
    expected = sum(predict_semantic(model, resize_shortest_edge(image, s, s), output_size=(32, 64))
                   for s in (32, 64, 96)) / 3
    torch.testing.assert_close(long, expected)
