"""Training / evaluation augmentation, mask-classification targets and batch collation.

A *sample* travelling through the transforms is a dict of torchvision tv_tensors so that one
geometric operation moves image and labels together (masks are resized with pixel-centre
nearest-neighbour interpolation, so label values are never blended):

    "image":   tv_tensors.Image uint8 [3, H, W], RGB
    "sem_seg": tv_tensors.Mask int64 [H, W], contiguous class ids, `ignore_label` = unlabeled
    "pan_seg": tv_tensors.Mask int32 [H, W], panoptic segment ids, 0 = void (panoptic only)

The training pipeline follows the released MaskFormer recipe (semantic datasets):
short-side scale jitter -> random crop (optionally "category area constrained") ->
SSD-style photometric distortion -> horizontal flip -> pad to the crop size.
COCO panoptic trains with DETR's augmentation instead (`build_detr_transform`): flip, then a resize or a
resize-crop-resize, no colour augmentation and no fixed canvas (`collate` pads each batch to its own size).
Targets (one binary mask + label per segment) are built only *after* augmentation, from the
augmented sem_seg / pan_seg: a class cropped away produces no semantic target, while a panoptic segment
cropped away stays as an empty mask (as the released panoptic mappers build one mask per listed segment).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from mfcore.config import PIXEL_MEAN, PIXEL_STD  # noqa: F401  (PIXEL_STD re-exported by mfcore.data)
from mfcore.test_time import pad_images, shortest_edge_size

# The released semantic mapper pads the crop with grey 128 *before* normalisation.
IMAGE_CROP_PAD_VALUE = 128


def semantic_targets(sem_seg: Tensor, ignore_label: int) -> tuple[Tensor, Tensor]:
    """One binary mask per class present, the ignore label excluded.

    Args:
        sem_seg: [H, W] integer class map.
    Returns:
        labels: int64 [n] sorted class ids; masks: bool [n, H, W] with masks[i] = (sem_seg == labels[i]).
    """
    classes = torch.unique(sem_seg)
    labels = classes[classes != ignore_label].long()
    masks = sem_seg.unsqueeze(0) == labels.view(-1, 1, 1).to(sem_seg.dtype)
    return labels, masks


def panoptic_targets(pan_seg: Tensor, segments_info: Sequence[dict]) -> tuple[Tensor, Tensor]:
    """One binary mask per non-crowd segment of segments_info (crowd segments dropped), in its order.

    A segment that augmentation cropped out of view keeps its label with an empty mask, as the released
    panoptic dataset mappers do (one mask `pan_seg == id` per non-crowd segment of the annotation).

    Args:
        pan_seg: [H, W] segment ids (0 = void).
        segments_info: dicts with "id", "category_id" (contiguous) and "iscrowd".
    Returns:
        labels: int64 [n]; masks: bool [n, H, W].
    """
    kept = [s for s in segments_info if not s["iscrowd"]]
    labels = torch.tensor([s["category_id"] for s in kept], dtype=torch.int64)
    ids = torch.tensor([s["id"] for s in kept], dtype=pan_seg.dtype)
    masks = pan_seg.unsqueeze(0) == ids.view(-1, 1, 1)
    return labels, masks


def _wrap_like(values: Tensor, like: Tensor) -> Tensor:
    """Arithmetic on a tv_tensor returns a plain tensor: re-attach the tv_tensor type."""
    return tv_tensors.wrap(values, like=like)


class ResizeShortestEdge:
    """Resize so the short side is a random choice from `short_sides`, the long side <= max_size.

    scale = s / min(H, W), reduced to max_size / max(H, W) if the long side would exceed
    max_size; new sizes are rounded to the nearest integer (`test_time.shortest_edge_size`, the rule the
    test-time resize uses too).
    """

    def __init__(self, short_sides: Sequence[int], max_size: int | None):
        if len(short_sides) == 0 or min(short_sides) <= 0:
            raise ValueError(f"short_sides must be a non-empty list of positive sizes, got {short_sides}")
        self.short_sides = [int(s) for s in short_sides]
        self.max_size = max_size

    def output_size(self, height: int, width: int, short_side: int) -> tuple[int, int]:
        return shortest_edge_size(height, width, short_side, self.max_size)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        height, width = sample["image"].shape[-2:]
        short_side = self.short_sides[int(torch.randint(len(self.short_sides), ()))]
        size = list(self.output_size(height, width, short_side))
        out = dict(sample)
        for key, value in sample.items():
            if isinstance(value, tv_tensors.Image):
                out[key] = F.resize(value, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            elif isinstance(value, tv_tensors.Mask):
                # Pixel-centre nearest neighbour, like PIL's NEAREST: torchvision's default
                # NEAREST for masks samples the top-left source pixel and would shift the labels
                # by up to half an input pixel against the bilinearly resized image.
                out[key] = F.resize(value, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return out


class RandomCropCategoryArea:
    """Random crop of `crop_size` (h, w), clipped to the image size.

    With single_category_max_area < 1, up to 10 crops are drawn until no single class covers
    more than that fraction of the crop's labeled pixels (and at least two classes are present);
    otherwise the 10th draw is kept. The released ADE20K configs use 1.0 (a plain random crop).
    """

    def __init__(self, crop_size: tuple[int, int], single_category_max_area: float = 1.0,
                 ignore_label: int = 255, max_tries: int = 10):
        if not 0.0 < single_category_max_area <= 1.0:
            raise ValueError(f"single_category_max_area must be in (0, 1], got {single_category_max_area}")
        self.crop_size = crop_size
        self.single_category_max_area = single_category_max_area
        self.ignore_label = ignore_label
        self.max_tries = max_tries

    def _acceptable(self, sem_seg: Tensor) -> bool:
        classes, counts = torch.unique(sem_seg, return_counts=True)
        counts = counts[classes != self.ignore_label]
        return len(counts) > 1 and counts.max().item() < self.single_category_max_area * counts.sum().item()

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        height, width = sample["image"].shape[-2:]
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
        tries = 1 if self.single_category_max_area >= 1.0 else self.max_tries
        for _ in range(tries):
            top = int(torch.randint(height - crop_h + 1, ()))
            left = int(torch.randint(width - crop_w + 1, ()))
            window = sample["sem_seg"][top:top + crop_h, left:left + crop_w]
            if tries == 1 or self._acceptable(window):
                break
        return _crop(sample, top, left, crop_h, crop_w)


def _crop(sample: dict[str, Any], top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """The window (top, left, height, width) of the image and every label map of a sample."""
    out = dict(sample)
    for key, value in sample.items():
        if isinstance(value, (tv_tensors.Image, tv_tensors.Mask)):
            out[key] = F.crop(value, top, left, height, width)
    return out


class RandomSizeCrop:
    """DETR's crop (detectron2 RandomCrop "absolute_range"): a window of height uniform in
    [min(H, min_size), min(H, max_size)] and width uniform in [min(W, min_size), min(W, max_size)], drawn
    independently, at a uniform position."""

    def __init__(self, min_size: int = 384, max_size: int = 600):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: expected 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        height, width = sample["image"].shape[-2:]
        crop_h = int(torch.randint(min(height, self.min_size), min(height, self.max_size) + 1, ()))
        crop_w = int(torch.randint(min(width, self.min_size), min(width, self.max_size) + 1, ()))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return _crop(sample, top, left, crop_h, crop_w)


class DetrResizeOrCrop:
    """DETR's scale augmentation (Carion et al. 2020, Sec. A.4; MaskFormer's released `detr_panoptic` mapper for
    COCO panoptic): with probability 0.5 resize the short side to one of `short_sides` (480, 512, ..., 800)
    with the long side <= max_size (1333); otherwise resize the short side to one of `crop_short_sides`
    (400, 500, 600; no cap), crop a random window of 384..600 per side (`RandomSizeCrop`), and then resize
    as in the first branch."""

    def __init__(self, short_sides: Sequence[int], max_size: int, crop_short_sides: Sequence[int] = (400, 500, 600),
                 crop_range: tuple[int, int] = (384, 600)):
        self.resize = ResizeShortestEdge(short_sides, max_size)
        self.crop = v2.Compose([ResizeShortestEdge(crop_short_sides, None), RandomSizeCrop(*crop_range)])

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if bool(torch.rand(()) < 0.5):
            sample = self.crop(sample)
        return self.resize(sample)


class PhotometricDistortion:
    """SSD colour augmentation as used by MaskFormer, on a uint8 RGB image; labels untouched.

    brightness: x + U(-32, 32); contrast: x * U(0.5, 1.5); saturation: HSV S * U(0.5, 1.5);
    hue: H + U{-18..18} on OpenCV's 0..180 hue scale (i.e. delta/180 of a full turn).
    Each is applied with probability 0.5; contrast goes either first or last (coin flip).
    Every step clips to [0, 255] and truncates to uint8, as the reference implementation does.
    """

    def __init__(self, brightness_delta: float = 32.0, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.rand(()) < 0.5)

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    @staticmethod
    def _to_uint8(values: Tensor) -> Tensor:
        return values.clamp(0, 255).to(torch.uint8)

    def _saturation(self, image: Tensor, alpha: float) -> Tensor:
        # Scaling HSV saturation S = (V - min) / V by alpha (clipped at 1) with H and V fixed
        # moves every channel away from V linearly: c' = V - (V - c) * min(alpha, V / (V - min)).
        x = image.float()
        v, m = x.amax(dim=0), x.amin(dim=0)
        chroma = v - m
        factor = torch.where(chroma > 0, torch.clamp(v / chroma.clamp_min(1e-6), max=alpha), 1.0)
        return self._to_uint8(v - (v - x) * factor)

    def _contrast(self, x: Tensor) -> Tensor:
        if self._coin():
            return self._to_uint8(x.float() * self._uniform(*self.contrast_range))
        return x

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        x = image.as_subclass(Tensor)
        if self.brightness_delta > 0 and self._coin():
            x = self._to_uint8(x.float() + self._uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = self._coin()
        if contrast_first:
            x = self._contrast(x)
        if self._coin():
            x = self._saturation(x, self._uniform(*self.saturation_range))
        if self.hue_delta > 0 and self._coin():
            delta = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()))
            x = F.adjust_hue(x, delta / 180.0)
        if not contrast_first:
            x = self._contrast(x)
        return {**sample, "image": _wrap_like(x, image)}


class PadToSize:
    """Pad bottom/right to at least `size` (h, w): image with `image_value`, sem_seg with the
    ignore label (the padding is not supervised), pan_seg with 0 (void)."""

    def __init__(self, size: tuple[int, int], ignore_label: int = 255, image_value: int = IMAGE_CROP_PAD_VALUE):
        self.size = size
        self.ignore_label = ignore_label
        self.image_value = image_value

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        height, width = sample["image"].shape[-2:]
        padding = [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]  # l, t, r, b
        fills = {"image": self.image_value, "sem_seg": self.ignore_label, "pan_seg": 0}
        out = dict(sample)
        for key, fill in fills.items():
            if key in sample:
                out[key] = F.pad(sample[key], padding, fill=fill)
        return out


def build_train_transform(crop_size: int | tuple[int, int], short_sides: Sequence[int], max_size: int,
                          single_category_max_area: float = 1.0, ignore_label: int = 255,
                          photometric: bool = True, hue_delta: int = 18, flip: bool = True) -> v2.Compose:
    """The paper's semantic training augmentation.

    ADE20K: crop 512, short_sides = [int(512 * r) for r in 0.5, 0.6, ..., 2.0] (256 .. 1024),
    max_size 2048. `hue_delta=0` switches off only the hue jitter (useful for synthetic data whose
    classes are partly told apart by hue).
    """
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    steps: list[Any] = [ResizeShortestEdge(short_sides, max_size),
                        RandomCropCategoryArea(crop, single_category_max_area, ignore_label)]
    if photometric:
        steps.append(PhotometricDistortion(hue_delta=hue_delta))
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps.append(PadToSize(crop, ignore_label))
    return v2.Compose(steps)


def build_detr_transform(short_sides: Sequence[int], max_size: int) -> v2.Compose:
    """DETR's training augmentation (COCO panoptic; released INPUT.DATASET_MAPPER_NAME "detr_panoptic",
    MIN_SIZE_TRAIN 480..800 step 32, MAX_SIZE_TRAIN 1333, Swin-L 1000): horizontal flip, then
    `DetrResizeOrCrop`. No colour augmentation, no padding: each image keeps its own size, and `collate` pads
    a batch to its largest image, padding the criterion never sees."""
    return v2.Compose([v2.RandomHorizontalFlip(p=0.5), DetrResizeOrCrop(short_sides, max_size)])


def collate(batch: Sequence[dict[str, Any]], size_divisibility: int = 32, ignore_label: int = 255,
            pad_value: Sequence[float] = PIXEL_MEAN) -> tuple[Tensor, list[dict[str, Any]]]:
    """Stack dataset samples into a padded image batch and a list of per-image targets.

    Images are padded bottom/right to a common size divisible by `size_divisibility` with the
    pixel mean, so that the padding becomes exactly 0 after the model's normalisation.
    Targets whose labels have the image's size (training) are padded to the batch size too:
    masks with False, sem_seg with ignore_label. Labels kept at the original resolution
    (evaluation with resizing) are left as they are.

    Returns:
        images: float [B, 3, Hp, Wp]; targets: B dicts with "labels" [n], "masks" [n, h, w],
        "sem_seg" [h, w], "image_size" (unpadded h, w), plus whatever metadata the sample had.
    """
    if len(batch) == 0:
        raise ValueError("collate() received an empty batch")
    images, sizes = pad_images([s["image"].as_subclass(Tensor).float() for s in batch], size_divisibility,
                               pad_value)
    pad_h, pad_w = images.shape[-2:]
    targets = []
    for sample, (h, w) in zip(batch, sizes):
        target = {k: v for k, v in sample.items() if k != "image"}
        target["image_size"] = (h, w)
        if tuple(sample["sem_seg"].shape[-2:]) == (h, w):
            sem_seg = torch.full((pad_h, pad_w), ignore_label, dtype=torch.int64)
            sem_seg[:h, :w] = sample["sem_seg"]
            masks = torch.zeros((len(sample["masks"]), pad_h, pad_w), dtype=torch.bool)
            masks[:, :h, :w] = sample["masks"]
            target["sem_seg"], target["masks"] = sem_seg, masks
        targets.append(target)
    return images, targets
