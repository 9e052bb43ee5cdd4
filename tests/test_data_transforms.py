"""Augmentation keeps image and labels aligned; targets, padding and collation."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mfcore.data import PIXEL_MEAN, build_train_transform, collate
from mfcore.data.transforms import build_detr_transform
from mfcore.data.transforms import (
    DetrResizeOrCrop,
    PadToSize,
    PhotometricDistortion,
    RandomCropCategoryArea,
    ResizeShortestEdge,
    panoptic_targets,
    semantic_targets,
)


def _colour(labels: torch.Tensor) -> torch.Tensor:
    """Label -> a distinct RGB colour [3, H, W] (uint8); used to check alignment after transforms."""
    return torch.stack([(labels * 40 + 10) % 256, (labels * 90 + 30) % 256, (labels * 150 + 70) % 256]).to(torch.uint8)


def _blocks(h: int, w: int, block: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 6, (h // block + 1, w // block + 1), generator=g)
    return coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]


def _sample(labels: torch.Tensor) -> dict:
    return {"image": tv_tensors.Image(_colour(labels)), "sem_seg": tv_tensors.Mask(labels.long()),
            "pan_seg": tv_tensors.Mask((labels * 1000 + 7).int())}


def _interior(sem_seg: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood lies in the crop and has one label: resizing by a factor
    >= 1/2 (bilinear, antialiased) blends colours within one output pixel of a label edge only."""
    padded = torch.nn.functional.pad(sem_seg[None, None].float(), [radius] * 4, value=-1.0)
    window = padded.unfold(2, 2 * radius + 1, 1).unfold(3, 2 * radius + 1, 1)
    return (window.amax((-1, -2)) == window.amin((-1, -2)))[0, 0]


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_image_and_labels_aligned(seed):
    torch.manual_seed(seed)
    labels = _blocks(45, 70, block=10, seed=seed)
    transform = build_train_transform(crop_size=48, short_sides=[30, 45, 60, 90], max_size=200, photometric=False)
    out = transform(_sample(labels))
    image, sem_seg, pan_seg = out["image"], out["sem_seg"], out["pan_seg"]
    assert image.shape == (3, 48, 48) and sem_seg.shape == pan_seg.shape == (48, 48)
    valid = sem_seg != 255
    # panoptic and semantic labels moved together (nearest-neighbour, never blended)
    assert torch.equal(pan_seg[valid], sem_seg[valid].int() * 1000 + 7) and (pan_seg[~valid] == 0).all()
    inside = valid & _interior(sem_seg)
    assert inside.sum() > 150
    assert torch.equal(image[:, inside], _colour(sem_seg)[:, inside])


def test_flip_moves_image_and_labels_together():
    labels = torch.arange(12).view(3, 4)
    out = v2.RandomHorizontalFlip(p=1.0)(_sample(labels))
    assert torch.equal(out["sem_seg"], labels.flip(-1))
    assert torch.equal(out["image"], _colour(labels.flip(-1)))


def test_small_image_is_padded_with_ignore_grey_and_void():
    labels = _blocks(20, 30)
    torch.manual_seed(0)
    out = build_train_transform(crop_size=(32, 40), short_sides=[20], max_size=100, photometric=False,
                                flip=False)(_sample(labels))
    assert out["sem_seg"].shape == (32, 40)
    assert torch.equal(out["sem_seg"][:20, :30], labels)
    assert (out["sem_seg"][20:] == 255).all() and (out["sem_seg"][:, 30:] == 255).all()
    assert (out["image"][:, 20:] == 128).all() and (out["pan_seg"][:, 30:] == 0).all()
    tgt_labels, masks = semantic_targets(out["sem_seg"], 255)
    assert 255 not in tgt_labels.tolist() and not masks[:, 20:].any()


def test_resize_shortest_edge_sizes():
    resize = ResizeShortestEdge([256], max_size=2048)
    assert resize.output_size(300, 400, 256) == (256, 341)  # 400 * 256/300 = 341.33
    assert resize.output_size(100, 1000, 512) == (205, 2048)  # long side capped: scale 2.048
    assert ResizeShortestEdge([7], None).output_size(2, 3, 7) == (7, 11)  # 10.5 rounds up
    out = resize(_sample(_blocks(30, 40)))
    assert out["image"].shape == (3, 256, 341) and out["sem_seg"].shape == (256, 341)


def test_category_area_crop_avoids_single_class_crops():
    labels = torch.zeros(40, 40, dtype=torch.long)
    labels[:, 20:] = 1  # two halves: a random 20x20 crop is single-class about half of the time
    sample = _sample(labels)
    crop = RandomCropCategoryArea((20, 20), single_category_max_area=0.75)
    plain = RandomCropCategoryArea((20, 20), single_category_max_area=1.0)
    torch.manual_seed(0)
    constrained = [crop(sample) for _ in range(20)]
    unconstrained = [plain(sample)["sem_seg"] for _ in range(20)]

    def largest_share(sem_seg: torch.Tensor) -> float:
        return torch.bincount(sem_seg.flatten(), minlength=2).max().item() / sem_seg.numel()

    assert max(largest_share(out["sem_seg"]) for out in constrained) < 0.75
    assert max(largest_share(c) for c in unconstrained) >= 0.75
    for out in constrained:  # the same window was cut from image and labels
        assert torch.equal(out["image"], _colour(out["sem_seg"]))


def test_saturation_matches_hsv_definition():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 5, 7)).astype(np.uint8)
    for alpha in (0.5, 1.4):
        got = PhotometricDistortion()._saturation(torch.from_numpy(pixels), alpha).numpy()
        for y in range(5):
            for x in range(7):
                h, s, v = colorsys.rgb_to_hsv(*(pixels[:, y, x] / 255.0))
                expected = np.array(colorsys.hsv_to_rgb(h, min(s * alpha, 1.0), v)) * 255.0
                assert np.all(np.abs(got[:, y, x] - expected) <= 1.0)


def test_photometric_distortion_changes_colours_only():
    labels = _blocks(16, 16)
    sample = _sample(labels)
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = PhotometricDistortion()(sample)
        assert out["image"].dtype == torch.uint8 and isinstance(out["image"], tv_tensors.Image)
        assert torch.equal(out["sem_seg"], sample["sem_seg"])
        changed += not torch.equal(out["image"], sample["image"])
    assert changed >= 6  # each of 4 ops fires with p = 0.5: all skipped only 1/16 of the time


DETR_SIDES = tuple(range(480, 801, 32))


@pytest.mark.parametrize("max_size", [1333, 1000])
def test_detr_pipeline_output_sizes(max_size):
    """DETR's augmentation (COCO panoptic): short side in 480..800 step 32 with the long side <= max_size
    (1333; Swin-L 1000), half the time after a 400/500/600 resize and a 384..600 crop (which changes the
    aspect ratio); labels move with the image, no colour change, no fixed canvas."""
    sample = _sample(_blocks(480, 640, block=40))
    sample["image"] = tv_tensors.Image(torch.full((3, 480, 640), 77, dtype=torch.uint8))  # one colour stays one
    transform = build_detr_transform(DETR_SIDES, max_size)
    shapes, cropped = set(), 0
    for seed in range(16):
        torch.manual_seed(seed)
        out = transform(sample)
        h, w = out["image"].shape[-2:]
        assert out["sem_seg"].shape == out["pan_seg"].shape == (h, w)
        assert (min(h, w) in DETR_SIDES or max(h, w) == max_size) and max(h, w) <= max_size
        assert torch.equal(out["pan_seg"].as_subclass(torch.Tensor),
                           out["sem_seg"].as_subclass(torch.Tensor).int() * 1000 + 7)  # nearest, together
        assert (out["image"] == 77).all()  # no colour augmentation
        cropped += abs(w / h - 640 / 480) > 0.02
        shapes.add((h, w))
    assert 3 <= cropped <= 13 and len(shapes) > 6  # both branches, many sizes
    # the crop branch before its final resize: 400..600 short side, then a 384..600 window of it
    torch.manual_seed(0)
    crop = DetrResizeOrCrop(DETR_SIDES, max_size).crop
    for _ in range(10):
        h, w = crop(sample)["image"].shape[-2:]
        assert 384 <= h <= 600 and 384 <= w <= 600
    # a batch is padded to its own largest image (rounded up to 32), not to a canvas
    batch = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out = {k: v.as_subclass(torch.Tensor) for k, v in transform(sample).items()}
        out["image"] = out["image"].float()
        out["labels"], out["masks"] = semantic_targets(out["sem_seg"], 255)
        batch.append(out)
    images, targets = collate(batch)
    sizes = [tuple(s["image"].shape[-2:]) for s in batch]
    assert images.shape[-2:] == tuple(-(-max(s[i] for s in sizes) // 32) * 32 for i in (0, 1))
    assert [t["image_size"] for t in targets] == sizes


def test_train_transform_follows_the_config():
    from mfcore.presets import get_preset
    from mfcore.training.train import train_transform

    detr = train_transform(get_preset("coco-panoptic-maskformer-swin-l").train)
    assert isinstance(detr.transforms[-1], DetrResizeOrCrop) and detr.transforms[-1].resize.max_size == 1000
    semantic = train_transform(get_preset("ade20k-panoptic-maskformer-r50").train)
    assert isinstance(semantic.transforms[-1], PadToSize) and semantic.transforms[-1].size == (640, 640)


def test_semantic_and_panoptic_targets():
    sem = torch.tensor([[3, 3, 255], [0, 3, 255]])
    labels, masks = semantic_targets(sem, 255)
    assert labels.tolist() == [0, 3]
    assert masks.tolist() == [[[0, 0, 0], [1, 0, 0]], [[1, 1, 0], [0, 1, 0]]]
    pan = torch.tensor([[5, 5, 9], [0, 2, 9]], dtype=torch.int32)
    segments = [{"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 9, "category_id": 1, "iscrowd": 0},
                {"id": 2, "category_id": 0, "iscrowd": 1},  # crowd: dropped
                {"id": 8, "category_id": 4, "iscrowd": 0}]  # cropped out of view: an empty mask
    labels, masks = panoptic_targets(pan, segments)
    assert labels.tolist() == [1, 1, 4]
    assert masks.tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]]


def test_panoptic_segments_cropped_out_of_view_stay_as_empty_masks():
    """The released panoptic mappers keep every non-crowd segment after the crop; one out of view is an
    empty mask with its label (semantic targets, by contrast, list only the classes left in the crop)."""
    pan = torch.full((8, 8), 2, dtype=torch.int32)
    pan[:, 0] = 1  # segment 1 is the first column: a 7-wide crop starting at column 1 leaves it out
    segments = [{"id": 1, "category_id": 3, "iscrowd": 0}, {"id": 2, "category_id": 5, "iscrowd": 0}]
    areas = []
    for seed in range(8):
        torch.manual_seed(seed)
        sample = {"image": tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8)),
                  "pan_seg": tv_tensors.Mask(pan), "sem_seg": tv_tensors.Mask(pan.long())}
        view = RandomCropCategoryArea((8, 7))(sample)["pan_seg"].as_subclass(torch.Tensor)
        labels, masks = panoptic_targets(view, segments)
        assert labels.tolist() == [3, 5] and masks.shape == (2, 8, 7)
        areas.append(int(masks[0].sum()))
    assert set(areas) == {0, 8}  # in view (column 0 kept) or out of view (an empty mask), never dropped


def test_collate_pads_images_labels_and_masks():
    a = {"image": torch.full((3, 40, 50), 7.0), "sem_seg": torch.zeros(40, 50, dtype=torch.long),
         "labels": torch.tensor([0]), "masks": torch.ones(1, 40, 50, dtype=torch.bool), "image_id": "a"}
    b = {"image": torch.full((3, 64, 33), 9.0), "sem_seg": torch.ones(20, 10, dtype=torch.long),  # eval: original size
         "labels": torch.tensor([1]), "masks": torch.ones(1, 20, 10, dtype=torch.bool), "image_id": "b"}
    images, targets = collate([a, b])
    assert images.shape == (2, 3, 64, 64)
    assert (images[0, :, :40, :50] == 7).all() and (images[1, :, :, :33] == 9).all()
    assert torch.allclose(images[0, :, 50, 0], torch.tensor(PIXEL_MEAN))
    assert targets[0]["sem_seg"].shape == (64, 64) and (targets[0]["sem_seg"][40:] == 255).all()
    assert targets[0]["masks"].shape == (1, 64, 64) and targets[0]["masks"].sum() == 40 * 50
    assert targets[1]["sem_seg"].shape == (20, 10)  # not the image's size: left untouched
    assert targets[0]["image_size"] == (40, 50) and targets[1]["image_size"] == (64, 33)
    assert targets[1]["image_id"] == "b" and "image" not in targets[1]
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_pad_to_size_leaves_large_images_alone():
    out = PadToSize((8, 8))(_sample(_blocks(10, 12)))
    assert out["image"].shape == (3, 10, 12)


def test_ade20k_full_padding_carries_its_ignore_label_not_class_255():
    """ADE20K-Full has 847 classes, so 255 is a class: the crop padding and the batch padding of its
    preset's training pipeline must carry the dataset's ignore label (65535) and give no target."""
    from mfcore.data.base import ignore_label_for
    from mfcore.presets import get_preset

    cfg = get_preset("ade20k-full-maskformer-r50").train
    assert cfg.ignore_label == ignore_label_for(847) == 65535
    torch.manual_seed(0)
    labels = torch.full((40, 48), 300, dtype=torch.int64)
    labels[:, 24:] = 254
    transform = build_train_transform(64, (40,), cfg.max_size, ignore_label=cfg.ignore_label, photometric=False,
                                      flip=False)
    sample = transform(_sample(labels))
    sem = sample["sem_seg"].as_subclass(torch.Tensor)
    assert sem.shape == (64, 64)
    assert (sem[40:] == 65535).all() and (sem[:, 48:] == 65535).all()  # crop padding
    found, _ = semantic_targets(sem, cfg.ignore_label)
    assert found.tolist() == [254, 300]  # no "class 255" from the padding
    sample["image"] = sample["image"].float()
    sample["labels"], sample["masks"] = semantic_targets(sem, cfg.ignore_label)
    _, targets = collate([sample], size_divisibility=96, ignore_label=cfg.ignore_label)  # batch padding
    assert targets[0]["sem_seg"].shape == (96, 96)
    assert (targets[0]["sem_seg"][64:] == 65535).all() and (targets[0]["sem_seg"][:, 64:] == 65535).all()
    assert not (targets[0]["sem_seg"] == 255).any()


def test_padding_uses_a_non_255_ignore_label():
    labels = torch.zeros(10, 12, dtype=torch.int64)
    padded = PadToSize((16, 16), ignore_label=1000)({"image": tv_tensors.Image(_colour(labels)),
                                                     "sem_seg": tv_tensors.Mask(labels)})
    sem = padded["sem_seg"].as_subclass(torch.Tensor)
    assert (sem[10:] == 1000).all() and (sem[:, 12:] == 1000).all() and (sem[:10, :12] == 0).all()
