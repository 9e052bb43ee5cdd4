"""Model predictions kept for analysis: collected once, saved to / loaded from one .npz without pickle.

The query statistics and `QueryExplorer` (mfcore.companion.query_stats, mfcore.explorer) work on a list of plain dicts of
numpy arrays, one per image, so they run equally on a live model and on a file written earlier:

    {"image": uint8 [H, W, 3] RGB, "pred_logits": float32 [N, K+1] (last column "no object"),
     "pred_masks": float32 [N, H, W] mask logits at the image size, "gt": int64 [H, W] or None,
     "image_id": str}
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfcore.files import atomic_write

PREDICTIONS_FORMAT = "mfcore-predictions-1"


def to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from an RGB image given as [H, W, 3] or [3, H, W] (tensor or array, 0..255)."""
    image = to_numpy(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] or [3, H, W], got shape {image.shape}")
    return np.clip(image, 0, 255).round().astype(np.uint8) if image.dtype != np.uint8 else image


def collect_predictions(model: torch.nn.Module, dataset: Any, num_images: int,
                        device: str | torch.device = "cpu") -> list[dict]:
    """Run a MaskFormer model (eval mode, no gradients) on the first `num_images` samples of `dataset`
    (dicts with "image" float [3, H, W] 0..255 and optionally "sem_seg" [H, W]); masks are resized to the
    label's size (the image is resized to it too when a transform changed its size)."""
    from mfcore.training.evaluate import mask_predictions

    if num_images < 1:
        raise ValueError(f"collect_predictions: num_images={num_images}, expected >= 1")
    was_training, device = model.training, torch.device(device)
    model.eval().to(device)
    out = []
    try:
        for index in range(min(num_images, len(dataset))):
            sample = dataset[index]
            image = torch.as_tensor(sample["image"], dtype=torch.float32)
            gt = sample.get("sem_seg")
            size = tuple(gt.shape[-2:]) if gt is not None else tuple(image.shape[-2:])
            with torch.inference_mode():
                logits, masks = mask_predictions(model, image.to(device), size)
                if tuple(image.shape[-2:]) != size:
                    image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0]
            out.append({"image": to_rgb(image), "pred_logits": to_numpy(logits.float()),
                        "pred_masks": to_numpy(masks.float()),
                        "gt": None if gt is None else to_numpy(gt).astype(np.int64),
                        "image_id": str(sample.get("image_id", index))})
    finally:
        model.train(was_training)
    return out


def save_predictions(path: str | Path, predictions: Sequence[Mapping], class_names: Sequence[str],
                     thing_ids: Sequence[int] = ()) -> Path:
    """Write predictions (see module docstring) and their class metadata to one .npz, without pickling
    (strings are stored as fixed-width unicode arrays); atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"format": np.array(PREDICTIONS_FORMAT), "count": np.array(len(predictions)),
                                     "class_names": np.array(list(class_names), dtype=str),
                                     "thing_ids": np.array(list(thing_ids), dtype=np.int64)}
    for i, p in enumerate(predictions):
        arrays.update({f"image_{i}": to_rgb(p["image"]), f"pred_logits_{i}": to_numpy(p["pred_logits"]),
                       f"pred_masks_{i}": to_numpy(p["pred_masks"]),
                       f"image_id_{i}": np.array(str(p.get("image_id", i)))})
        if p.get("gt") is not None:
            arrays[f"gt_{i}"] = to_numpy(p["gt"])
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def load_predictions(path: str | Path) -> tuple[list[dict], dict]:
    """(predictions, {"class_names": [...], "thing_ids": [...]}) from `save_predictions`'s file."""
    with np.load(path, allow_pickle=False) as data:
        if "format" not in data.files or str(data["format"]) != PREDICTIONS_FORMAT:
            raise ValueError(f"{path} is not an mfcore predictions file (expected format={PREDICTIONS_FORMAT!r})")
        predictions = [{"image": data[f"image_{i}"], "pred_logits": data[f"pred_logits_{i}"],
                        "pred_masks": data[f"pred_masks_{i}"], "image_id": str(data[f"image_id_{i}"]),
                        "gt": data[f"gt_{i}"] if f"gt_{i}" in data.files else None}
                       for i in range(int(data["count"]))]
        meta = {"class_names": [str(n) for n in data["class_names"]], "thing_ids": data["thing_ids"].tolist()}
    return predictions, meta
