"""On-disk formats shared by the dataset readers and the synthetic generator.

Images are 8-bit RGB (JPEG or PNG). Semantic label maps are single-channel PNG or TIFF
files, 8-bit (ADE20K, COCO-Stuff, Cityscapes, Mapillary) or 16-bit (ADE20K-Full, whose 847
classes do not fit in a byte). COCO-style panoptic PNGs store a segment id per pixel in the
three colour channels, id = R + 256 * G + 256^2 * B, with id 0 meaning "void".

Every reader here turns a failure into a ValueError / FileNotFoundError that names the file,
because a dataset of 20k images with one corrupt file is otherwise very hard to debug.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mfcore import files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# PIL modes that hold one integer per pixel ("P" is a palette PNG, e.g. Mapillary labels:
# the palette index *is* the label, so we never convert it to RGB).
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        image: uint8 [H, W, 3].
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but cannot be decoded (corrupt or not an image).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # convert("RGB") would clip to 0 / 255
                raise ValueError(f"image {path} has PIL mode {im.mode!r} (16/32-bit single channel); expected an "
                                 f"8-bit RGB or grayscale image")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label map (8- or 16-bit PNG/TIFF) without any value remapping.

    Returns:
        label: int64 [H, W] raw values as stored in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in _LABEL_MODES:
                raise ValueError(
                    f"label map {path} has PIL mode {im.mode!r}; expected a single-channel "
                    f"integer image (one of {_LABEL_MODES})"
                )
            return np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read label map {path}: {err}") from err


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Read a COCO-style panoptic PNG and decode segment ids: id = R + 256*G + 256^2*B.

    Returns:
        ids: int64 [H, W], 0 = void.
    """
    rgb = read_image(path).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Encode segment ids [H, W] (0 <= id < 2^24) as uint8 RGB [H, W, 3] (inverse of the above)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"segment ids must lie in [0, 2^24), got range [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write uint8 RGB [H, W, 3]; the format follows the suffix (.png lossless, .jpg quality 95)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] to write to {path}, got shape {image.shape}")
    Image.fromarray(image).save(path, **options)


def write_label(path: str | Path, label: np.ndarray) -> None:
    """Write a label map [H, W] as an 8-bit PNG when all values fit in a byte, else 16-bit."""
    label = np.asarray(label)
    if label.size and (label.min() < 0 or label.max() > 65535):
        raise ValueError(f"label values must lie in [0, 65535] to be written to {path}")
    dtype = np.uint8 if (label.size == 0 or label.max() < 256) else np.uint16
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(dtype)).save(path)


def read_json(path: str | Path) -> Any:
    """Load a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON in {path}: {err}") from err


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON with sorted keys, atomically, so that regenerated files are byte-identical."""
    files.write_json(path, obj, compact=True)
