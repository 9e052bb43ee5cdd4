"""Dataset classes shared by every reader: load -> augment -> build mask-classification targets.

A sample is

    {"image": float [3, H, W] RGB 0..255, "sem_seg": int64 [H, W], "labels": int64 [n],
     "masks": bool [n, H, W], "image_id": str, "file_name": str, "orig_size": (H0, W0)}

plus "pan_seg" (int32 [H, W], 0 = void) and "segments_info" for panoptic datasets.
Class ids are contiguous 0..K-1; unlabeled pixels carry `dataset.ignore_label`, which is 255,
or 65535 when K > 255 (ADE20K-Full: 255 is a real class there).
Targets follow the paper: semantic -> one mask per class present; panoptic -> one mask per
non-crowd segment (crowd pixels are ignore in sem_seg and produce no target; a segment cropped out of
view stays as an empty mask). They are built after the transform, from the augmented labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mfcore.data.formats import read_image, read_label, read_panoptic_png
from mfcore.data.transforms import panoptic_targets, semantic_targets


@dataclass(frozen=True)
class Record:
    """One image on disk and its annotation (label map, or panoptic PNG + segments)."""

    image_path: Path
    label_path: Path
    image_id: str
    segments_info: tuple[dict, ...] = ()


def ignore_label_for(num_classes: int) -> int:
    """255 unless it would collide with a class id, then the 16-bit maximum 65535."""
    return 255 if num_classes <= 255 else 65535


class SegmentationDataset(Dataset):
    """Common part: metadata, loading, transform, then targets from the transformed labels."""

    def __init__(self, name: str, split: str, records: Sequence[Record], class_names: Sequence[str],
                 thing_ids: Sequence[int], transform: Callable | None = None):
        self.name, self.split = name, split
        self.records = list(records)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.thing_ids = tuple(sorted(thing_ids))
        self.ignore_label = ignore_label_for(self.num_classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes})"

    def _load_labels(self, record: Record, image_hw: tuple[int, int]) -> dict[str, tv_tensors.Mask]:
        raise NotImplementedError

    def _targets(self, sample: dict[str, Any], record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        return semantic_targets(sample["sem_seg"].as_subclass(torch.Tensor), self.ignore_label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = read_image(record.image_path)
        sample: dict[str, Any] = self._load_labels(record, image.shape[:2])
        sample["image"] = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        if self.transform is not None:
            sample = self.transform(sample)
        labels, masks = self._targets(sample, record)
        # Plain tensors out: tv_tensor subclasses would leak into the model's arithmetic.
        out = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
        out["image"] = out["image"].float()
        out.update(labels=labels, masks=masks, image_id=record.image_id,
                   file_name=str(record.image_path), orig_size=tuple(image.shape[:2]))
        return out


def _check_size(label: np.ndarray, image_hw: tuple[int, int], record: Record) -> None:
    if label.shape[:2] != tuple(image_hw):
        raise ValueError(f"label map {record.label_path} has size {label.shape[:2]} but its image "
                         f"{record.image_path} has size {tuple(image_hw)}")


class SemanticSegDataset(SegmentationDataset):
    """Label maps whose raw values are mapped to contiguous ids by a lookup table.

    lut[raw] = contiguous id, ignore_label, or -1 for a value that must not occur.
    """

    def __init__(self, name: str, split: str, records: Sequence[Record], class_names: Sequence[str],
                 thing_ids: Sequence[int], lut: np.ndarray, transform: Callable | None = None):
        super().__init__(name, split, records, class_names, thing_ids, transform)
        self.lut = lut

    def _load_labels(self, record: Record, image_hw: tuple[int, int]) -> dict[str, tv_tensors.Mask]:
        raw = read_label(record.label_path)
        _check_size(raw, image_hw, record)
        inside = (raw >= 0) & (raw < len(self.lut))
        mapped = np.where(inside, self.lut[np.clip(raw, 0, len(self.lut) - 1)], -1)
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0])[:10].tolist()
            raise ValueError(f"label map {record.label_path} contains values {bad} outside the "
                             f"{self.num_classes} classes of {self.name} and its ignore value")
        return {"sem_seg": tv_tensors.Mask(torch.from_numpy(mapped))}


class PanopticSegDataset(SegmentationDataset):
    """COCO-format panoptic annotations: RGB-id PNGs + segments_info with contiguous categories."""

    def _load_labels(self, record: Record, image_hw: tuple[int, int]) -> dict[str, tv_tensors.Mask]:
        ids = read_panoptic_png(record.label_path)
        _check_size(ids, image_hw, record)
        known = {s["id"] for s in record.segments_info}
        unknown = sorted(set(np.unique(ids).tolist()) - known - {0})
        if unknown:
            raise ValueError(f"panoptic PNG {record.label_path} has segment ids {unknown[:10]} that "
                             f"its JSON segments_info does not list")
        # Semantic view: non-crowd segments give their category; void and crowd are ignored.
        sem_seg = np.full(ids.shape, self.ignore_label, dtype=np.int64)
        for segment in record.segments_info:
            if not segment["iscrowd"]:
                sem_seg[ids == segment["id"]] = segment["category_id"]
        return {"sem_seg": tv_tensors.Mask(torch.from_numpy(sem_seg)),
                "pan_seg": tv_tensors.Mask(torch.from_numpy(ids.astype(np.int32)))}

    def _targets(self, sample: dict[str, Any], record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        return panoptic_targets(sample["pan_seg"].as_subclass(torch.Tensor), record.segments_info)

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = super().__getitem__(index)
        out["segments_info"] = [dict(s) for s in self.records[index].segments_info]
        return out
