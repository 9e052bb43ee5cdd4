"""Readers for the paper's benchmarks in their usual on-disk layouts (see data/README.md).

Every reader takes the *datasets root* (detectron2's $DETECTRON2_DATASETS: the folder holding
ADEChallengeData2016/, ADE20K_2021_17_01/, coco/, cityscapes/, mapillary_vistas/) and a split
("train" or "val"), and returns a dataset whose samples are

    {"image": float [3, H, W] RGB 0..255, "sem_seg": int64 [H, W], "labels": int64 [n],
     "masks": bool [n, H, W], "image_id": str, "file_name": str, "orig_size": (H0, W0)}

plus "pan_seg" (int32 [H, W], 0 = void) and "segments_info" for panoptic datasets.
Class ids are contiguous 0..K-1; unlabeled pixels carry `dataset.ignore_label`, which is 255,
or 65535 when K > 255 (ADE20K-Full: 255 is a real class there).
Targets follow the paper: semantic -> one mask per class present; panoptic -> one mask per
non-crowd segment (crowd pixels are ignore in sem_seg and produce no target).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mfcore.data import catalog
from mfcore.data.formats import IMAGE_EXTENSIONS, read_image, read_json, read_label, read_panoptic_png
from mfcore.data.transforms import panoptic_targets, semantic_targets

LAYOUT_HINT = "see data/README.md for the expected layout and how to prepare it"


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
        out = {key: value.as_subclass(torch.Tensor) for key, value in sample.items()}
        out["image"] = out["image"].float()
        out.update(labels=labels, masks=masks, image_id=record.image_id,
                   file_name=str(record.image_path), orig_size=tuple(image.shape[:2]))
        if record.segments_info:
            out["segments_info"] = [dict(s) for s in record.segments_info]
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


# ----------------------------------------------------------------------------- layout helpers
def _require_dir(path: Path, dataset: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: expected directory {path} does not exist ({LAYOUT_HINT})")
    return path


def _split_dir(split: str, names: dict[str, str], dataset: str) -> str:
    if split not in names:
        raise ValueError(f"{dataset}: unknown split {split!r}, expected one of {sorted(names)}")
    return names[split]


def _pair_images(image_dir: Path, label_dir: Path, label_names: Callable[[Path], Sequence[str]],
                 dataset: str, recursive: bool = False) -> list[Record]:
    """Pair every image with the first existing candidate label file (same relative folder)."""
    _require_dir(image_dir, dataset)
    _require_dir(label_dir, dataset)
    pattern = "**/*" if recursive else "*"
    images = sorted(p for p in image_dir.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"{dataset}: no images (.jpg/.png) found in {image_dir} ({LAYOUT_HINT})")
    records = []
    for image in images:
        folder = label_dir / image.parent.relative_to(image_dir)
        candidates = [folder / name for name in label_names(image)]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            raise FileNotFoundError(f"{dataset}: no label map for image {image}: expected {candidates[0]}")
        records.append(Record(image, label, image.stem))
    return records


def _lut(size: int, valid: dict[int, int]) -> np.ndarray:
    lut = np.full(size, -1, dtype=np.int64)
    for raw, mapped in valid.items():
        lut[raw] = mapped
    return lut


# ----------------------------------------------------------------------------- semantic readers
def ade20k(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """ADE20K-150: ADEChallengeData2016/{images,annotations}/{training,validation}.

    Label 0 ("other") -> ignore, labels 1..K -> 0..K-1. A synthetic_meta.json next to the
    folders (written by mfcore.data.synthetic) replaces the 150 ADE20K classes by its own K.
    """
    base = _require_dir(Path(root) / "ADEChallengeData2016", "ade20k")
    sub = _split_dir(split, {"train": "training", "val": "validation"}, "ade20k")
    name, class_names, thing_ids = "ade20k", list(catalog.ADE20K_150_CLASSES), []
    if (base / "synthetic_meta.json").is_file():
        meta = read_json(base / "synthetic_meta.json")
        name, class_names, thing_ids = meta["name"], meta["class_names"], meta["thing_ids"]
    records = _pair_images(base / "images" / sub, base / "annotations" / sub,
                           lambda p: [p.stem + ".png"], name)
    k = len(class_names)
    lut = _lut(k + 1, {0: ignore_label_for(k), **{i + 1: i for i in range(k)}})
    return SemanticSegDataset(name, split, records, class_names, thing_ids, lut, transform)


def ade20k_full(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """ADE20K-Full (847 classes): ADE20K_2021_17_01/{images,annotations}_detectron2/{training,validation};
    16-bit .tif (or .png) labels with values 0..846, 65535 = unlabeled."""
    base = _require_dir(Path(root) / "ADE20K_2021_17_01", "ade20k_full")
    sub = _split_dir(split, {"train": "training", "val": "validation"}, "ade20k_full")
    records = _pair_images(base / "images_detectron2" / sub, base / "annotations_detectron2" / sub,
                           lambda p: [p.stem + ".tif", p.stem + ".png"], "ade20k_full")
    k = catalog.ADE20K_FULL_NUM_CLASSES
    lut = _lut(65536, {65535: 65535, **{i: i for i in range(k)}})
    names = [f"ade20k_full_{i}" for i in range(k)]
    return SemanticSegDataset("ade20k_full", split, records, names, [], lut, transform)


def coco_stuff_10k(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """COCO-Stuff-10K (171 classes) as prepared for detectron2:
    coco/coco_stuff_10k/{images,annotations}_detectron2/{train,test}; labels 0..170, 255 ignore
    (the preparation subtracts 2 from the v1.0 .mat labels, turning 1 = unlabeled into 255)."""
    base = _require_dir(Path(root) / "coco" / "coco_stuff_10k", "coco_stuff_10k")
    sub = _split_dir(split, {"train": "train", "val": "test", "test": "test"}, "coco_stuff_10k")
    records = _pair_images(base / "images_detectron2" / sub, base / "annotations_detectron2" / sub,
                           lambda p: [p.stem + ".png"], "coco_stuff_10k")
    lut = _lut(256, {255: 255, **{i: i for i in range(171)}})
    return SemanticSegDataset("coco_stuff_10k", split, records, catalog.COCO_STUFF_171_CLASSES,
                              catalog.COCO_STUFF_171_THING_IDS, lut, transform)


def cityscapes(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """Cityscapes (19 train ids): leftImg8bit/<split>/<city>/*_leftImg8bit.png paired with
    gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (values 0..18, 255 ignore)."""
    base = _require_dir(Path(root) / "cityscapes", "cityscapes")
    sub = _split_dir(split, {"train": "train", "val": "val"}, "cityscapes")

    def label_names(image: Path) -> list[str]:
        return [image.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")]

    records = _pair_images(base / "leftImg8bit" / sub, base / "gtFine" / sub, label_names,
                           "cityscapes", recursive=True)
    lut = _lut(256, {255: 255, **{i: i for i in range(19)}})
    return SemanticSegDataset("cityscapes", split, records, catalog.CITYSCAPES_19_CLASSES,
                              catalog.CITYSCAPES_19_THING_IDS, lut, transform)


def mapillary_vistas(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """Mapillary Vistas v1.2 (65 classes): mapillary_vistas/{training,validation}/images/*.jpg and
    .../v1.2/labels/*.png (or .../labels/*.png); label 65 = unlabeled -> 255."""
    base = _require_dir(Path(root) / "mapillary_vistas", "mapillary_vistas")
    sub = _split_dir(split, {"train": "training", "val": "validation"}, "mapillary_vistas")
    label_dir = base / sub / "v1.2" / "labels"
    if not label_dir.is_dir() and (base / sub / "labels").is_dir():
        label_dir = base / sub / "labels"
    records = _pair_images(base / sub / "images", label_dir, lambda p: [p.stem + ".png"], "mapillary_vistas")
    lut = _lut(256, {65: 255, **{i: i for i in range(65)}})
    return SemanticSegDataset("mapillary_vistas", split, records, catalog.MAPILLARY_VISTAS_65_CLASSES,
                              [], lut, transform)


# ----------------------------------------------------------------------------- panoptic readers
def _panoptic(name: str, split: str, json_path: Path, png_dir: Path, image_dir: Path,
              transform: Callable | None) -> PanopticSegDataset:
    """Read a COCO-format panoptic JSON; contiguous ids follow the order of its categories list."""
    if not json_path.is_file():
        raise FileNotFoundError(f"{name}: expected panoptic JSON {json_path} does not exist ({LAYOUT_HINT})")
    _require_dir(png_dir, name)
    _require_dir(image_dir, name)
    data = read_json(json_path)
    categories = data["categories"]
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    thing_ids = [i for i, c in enumerate(categories) if c.get("isthing", 0)]
    image_files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    records = []
    for ann in data["annotations"]:
        png = png_dir / ann["file_name"]
        if not png.is_file():
            raise FileNotFoundError(f"{name}: {json_path} names panoptic PNG {png}, which does not exist")
        image = image_dir / image_files.get(ann["image_id"], Path(ann["file_name"]).stem + ".jpg")
        if not image.is_file():
            raise FileNotFoundError(f"{name}: {json_path} names image {image}, which does not exist")
        segments = []
        for s in ann["segments_info"]:
            if s["category_id"] not in contiguous:
                raise ValueError(f"{name}: {json_path} gives segment {s['id']} of {png.name} the unknown "
                                 f"category_id {s['category_id']}")
            cat = contiguous[s["category_id"]]
            segments.append({"id": int(s["id"]), "category_id": cat, "iscrowd": int(s.get("iscrowd", 0)),
                             "isthing": int(cat in thing_ids), "area": int(s.get("area", 0))})
        records.append(Record(image, png, str(ann["image_id"]), tuple(segments)))
    class_names = [c["name"] for c in categories]
    return PanopticSegDataset(name, split, records, class_names, thing_ids, transform)


def coco_panoptic(root: str | Path, split: str = "train", transform: Callable | None = None,
                  name: str = "coco_panoptic") -> PanopticSegDataset:
    """COCO panoptic 2017: coco/annotations/panoptic_{train,val}2017.json + PNG folders
    coco/annotations/panoptic_{train,val}2017/, images in coco/{train,val}2017/."""
    base = _require_dir(Path(root) / "coco", name)
    sub = _split_dir(split, {"train": "train2017", "val": "val2017"}, name)
    return _panoptic(name, split, base / "annotations" / f"panoptic_{sub}.json",
                     base / "annotations" / f"panoptic_{sub}", base / sub, transform)


def ade20k_panoptic(root: str | Path, split: str = "train", transform: Callable | None = None) -> PanopticSegDataset:
    """ADE20K panoptic: ADEChallengeData2016/ade20k_panoptic_{train,val}.json + PNG folders of the
    same name, images in ADEChallengeData2016/images/{training,validation}/."""
    base = _require_dir(Path(root) / "ADEChallengeData2016", "ade20k_panoptic")
    sub = _split_dir(split, {"train": "train", "val": "val"}, "ade20k_panoptic")
    images = base / "images" / {"train": "training", "val": "validation"}[sub]
    return _panoptic("ade20k_panoptic", split, base / f"ade20k_panoptic_{sub}.json",
                     base / f"ade20k_panoptic_{sub}", images, transform)


DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "ade20k": ade20k,
    "ade20k_full": ade20k_full,
    "coco_stuff_10k": coco_stuff_10k,
    "cityscapes": cityscapes,
    "mapillary_vistas": mapillary_vistas,
    "coco_panoptic": coco_panoptic,
    "ade20k_panoptic": ade20k_panoptic,
    # The synthetic generator writes these two real layouts; the same readers load them.
    "synthetic_semantic": ade20k,
    "synthetic_panoptic": functools.partial(coco_panoptic, name="synthetic_panoptic"),
}


def build_dataset(name: str, root: str | Path, split: str = "train",
                  transform: Callable | None = None) -> SegmentationDataset:
    """Build a registered dataset, e.g. build_dataset("ade20k", "datasets", "val")."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    return DATASETS[name](root, split, transform=transform)
