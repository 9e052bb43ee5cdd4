"""Readers for the paper's benchmarks in their usual on-disk layouts (see data/README.md).

Every reader takes the *datasets root* (detectron2's $DETECTRON2_DATASETS: the folder holding
ADEChallengeData2016/, ADE20K_2021_17_01/, coco/, cityscapes/, mapillary_vistas/) and a split
("train" or "val"), checks the layout (FileNotFoundError naming the missing path), and returns a
SemanticSegDataset or PanopticSegDataset (mfcore.data.base) mapping raw labels to contiguous ids.
"""
from __future__ import annotations

import collections
import functools
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mfcore.data import catalog
from mfcore.data.base import (
    PanopticSegDataset,
    Record,
    SegmentationDataset,
    SemanticSegDataset,
    ignore_label_for,
)
from mfcore.data.formats import IMAGE_EXTENSIONS, read_json

LAYOUT_HINT = "see data/README.md for the expected layout and how to prepare it"


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
        missing = [k for k in ("name", "class_names", "thing_ids") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ValueError(f"{base / 'synthetic_meta.json'}: missing {', '.join(missing)}; expected an object with "
                             f"name, class_names and thing_ids (rewrite it with `python -m mfcore make-synthetic`)")
        name, class_names, thing_ids = catalog.dataset_name(meta["name"]), meta["class_names"], meta["thing_ids"]
    records = _pair_images(base / "images" / sub, base / "annotations" / sub,
                           lambda p: [p.stem + ".png"], name)
    k = len(class_names)
    lut = _lut(k + 1, {0: ignore_label_for(k), **{i + 1: i for i in range(k)}})
    return SemanticSegDataset(name, split, records, class_names, thing_ids, lut, transform)


def ade20k_full(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """ADE20K-Full (847 classes): ADE20K_2021_17_01/{images,annotations}_detectron2/{training,validation};
    16-bit .tif (or .png) labels with values 0..846, 65535 = unlabeled."""
    base = _require_dir(Path(root) / "ADE20K_2021_17_01", "ade20k-full")
    sub = _split_dir(split, {"train": "training", "val": "validation"}, "ade20k-full")
    records = _pair_images(base / "images_detectron2" / sub, base / "annotations_detectron2" / sub,
                           lambda p: [p.stem + ".tif", p.stem + ".png"], "ade20k-full")
    k = catalog.ADE20K_FULL_NUM_CLASSES
    lut = _lut(65536, {65535: 65535, **{i: i for i in range(k)}})
    names = [f"ade20k_full_{i}" for i in range(k)]
    return SemanticSegDataset("ade20k-full", split, records, names, [], lut, transform)


def coco_stuff_10k(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """COCO-Stuff-10K (171 classes) as prepared for detectron2:
    coco/coco_stuff_10k/{images,annotations}_detectron2/{train,test}; labels 0..170, 255 ignore
    (the preparation subtracts 2 from the v1.0 .mat labels, turning 1 = unlabeled into 255)."""
    base = _require_dir(Path(root) / "coco" / "coco_stuff_10k", "coco-stuff")
    sub = _split_dir(split, {"train": "train", "val": "test", "test": "test"}, "coco-stuff")
    records = _pair_images(base / "images_detectron2" / sub, base / "annotations_detectron2" / sub,
                           lambda p: [p.stem + ".png"], "coco-stuff")
    lut = _lut(256, {255: 255, **{i: i for i in range(171)}})
    return SemanticSegDataset("coco-stuff", split, records, catalog.COCO_STUFF_171_CLASSES,
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
    base = _require_dir(Path(root) / "mapillary_vistas", "mapillary")
    sub = _split_dir(split, {"train": "training", "val": "validation"}, "mapillary")
    label_dir = base / sub / "v1.2" / "labels"
    if not label_dir.is_dir() and (base / sub / "labels").is_dir():
        label_dir = base / sub / "labels"
    records = _pair_images(base / sub / "images", label_dir, lambda p: [p.stem + ".png"], "mapillary")
    lut = _lut(256, {65: 255, **{i: i for i in range(65)}})
    return SemanticSegDataset("mapillary", split, records, catalog.MAPILLARY_VISTAS_65_CLASSES,
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
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{name}: {json_path} is not a COCO panoptic file: expected a JSON object with "
                         f"'categories' and 'annotations' lists")
    if not data["annotations"]:
        raise ValueError(f"{name}: {json_path} has no annotations (an empty split cannot be trained or scored)")
    categories = data["categories"]
    try:
        contiguous = {c["id"]: i for i, c in enumerate(categories)}
        image_files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    except (KeyError, TypeError) as err:
        raise ValueError(f"{name}: {json_path}: a category or image entry lacks {err} (expected 'id', "
                         f"'file_name')") from None
    if len(contiguous) != len(categories):
        raise ValueError(f"{name}: {json_path} lists a category id twice")
    thing_ids = [i for i, c in enumerate(categories) if c.get("isthing", 0)]
    records, seen = [], {}
    for number, ann in enumerate(data["annotations"]):
        missing = [k for k in ("file_name", "image_id", "segments_info") if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise ValueError(f"{name}: annotation {number} in {json_path} lacks {', '.join(missing)}")
        for what, key in (("image_id", ann["image_id"]), ("file_name", ann["file_name"])):
            if (what, key) in seen:
                raise ValueError(f"{name}: {json_path} annotates {what} {key!r} twice (annotations "
                                 f"{seen[what, key]} and {number})")
            seen[what, key] = number
        for file_name in (ann["file_name"], image_files.get(ann["image_id"], "")):
            if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
                raise ValueError(f"{name}: {json_path} names file {file_name!r}; expected a name relative to "
                                 f"its folder, without '..'")
        if not isinstance(ann["segments_info"], list) or not all(
                isinstance(s, dict) and "id" in s and "category_id" in s for s in ann["segments_info"]):
            raise ValueError(f"{name}: {json_path}: segments_info of {ann['file_name']} must be a list of objects "
                             f"with 'id' and 'category_id'")
        counts = collections.Counter(s["id"] for s in ann["segments_info"])
        duplicates = sorted((i for i, n in counts.items() if n > 1), key=str)
        if duplicates:
            raise ValueError(f"{name}: {json_path} lists segment id(s) {duplicates} of {ann['file_name']} more "
                             f"than once; every segment needs its own id")
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
                  name: str = "coco-panoptic") -> PanopticSegDataset:
    """COCO panoptic 2017: coco/annotations/panoptic_{train,val}2017.json + PNG folders
    coco/annotations/panoptic_{train,val}2017/, images in coco/{train,val}2017/."""
    base = _require_dir(Path(root) / "coco", name)
    sub = _split_dir(split, {"train": "train2017", "val": "val2017"}, name)
    return _panoptic(name, split, base / "annotations" / f"panoptic_{sub}.json",
                     base / "annotations" / f"panoptic_{sub}", base / sub, transform)


def ade20k_panoptic(root: str | Path, split: str = "train", transform: Callable | None = None) -> PanopticSegDataset:
    """ADE20K panoptic: ADEChallengeData2016/ade20k_panoptic_{train,val}.json + PNG folders of the
    same name, images in ADEChallengeData2016/images/{training,validation}/."""
    base = _require_dir(Path(root) / "ADEChallengeData2016", "ade20k-panoptic")
    sub = _split_dir(split, {"train": "train", "val": "val"}, "ade20k-panoptic")
    images = base / "images" / {"train": "training", "val": "validation"}[sub]
    return _panoptic("ade20k-panoptic", split, base / f"ade20k_panoptic_{sub}.json",
                     base / f"ade20k_panoptic_{sub}", images, transform)


def synthetic_semantic(root: str | Path, split: str = "train", transform: Callable | None = None) -> SemanticSegDataset:
    """Synthetic scenes in the ADE20K layout (mfcore.data.synthetic_writer): the ade20k reader,
    insisting on the synthetic_meta.json so that real ADE20K is never read by mistake."""
    meta = Path(root) / "ADEChallengeData2016" / "synthetic_meta.json"
    _split_dir(split, {"train": "training", "val": "validation"}, "synthetic_semantic")
    if not meta.is_file():
        raise FileNotFoundError(f"synthetic: expected {meta}; write the scenes with "
                                f"`python -m mfcore make-synthetic {root}` ({LAYOUT_HINT})")
    return ade20k(root, split, transform)


def _custom_classes(path: Path) -> tuple[list[str], list[int]]:
    """Class names and thing ids of a custom dataset's classes.json: a list of {"name": str, "isthing": bool}
    in class-id order (isthing optional, default false)."""
    data = read_json(path)
    example = '[{"name": "road", "isthing": false}, {"name": "car", "isthing": true}]'
    if not isinstance(data, list) or not data:
        raise ValueError(f"custom: {path}: expected a non-empty JSON list of classes in id order, e.g. {example}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"] \
                or entry.get("isthing", False) not in (True, False) or set(entry) - {"name", "isthing"}:
            raise ValueError(f"custom: {path}: class {i} is {json.dumps(entry)}; expected an object with a "
                             f"\"name\" and optionally \"isthing\" (true/false), e.g. {example}")
    return [c["name"] for c in data], [i for i, c in enumerate(data) if c.get("isthing", False)]


def custom(root: str | Path, split: str = "train", transform: Callable | None = None) -> SegmentationDataset:
    """Your own data (data/README.md, "Your own data"), images in DIR/images/{train,val}/ and either
    * DIR/classes.json + DIR/labels/{train,val}/<image stem>.png: label maps, pixel value = class id
      0..K-1 in classes.json's order, 255 = unlabelled (16-bit PNGs with 65535 when K > 255), or
    * DIR/panoptic_{train,val}.json + DIR/panoptic_{train,val}/: COCO panoptic (categories with isthing).
    K, the class names and the thing classes come from these files."""
    base = _require_dir(Path(root), "custom")
    sub = _split_dir(split, {"train": "train", "val": "val"}, "custom")
    classes, panoptic = base / "classes.json", base / f"panoptic_{sub}.json"
    if classes.is_file() and panoptic.is_file():
        raise ValueError(f"custom: {base} holds both classes.json (label maps) and {panoptic.name} (COCO "
                         f"panoptic); expected one of the two layouts")
    if not classes.is_file():
        if not any(base.glob("panoptic_*.json")):
            raise FileNotFoundError(f"custom: expected {classes} (with label maps in labels/) or {panoptic} "
                                    f"(COCO panoptic) in {base} ({LAYOUT_HINT})")
        return _panoptic("custom", split, panoptic, base / f"panoptic_{sub}", base / "images" / sub, transform)
    names, thing_ids = _custom_classes(classes)
    records = _pair_images(base / "images" / sub, base / "labels" / sub, lambda p: [p.stem + ".png"], "custom")
    ignore = ignore_label_for(len(names))
    lut = _lut(ignore + 1, {ignore: ignore, **{i: i for i in range(len(names))}})
    return SemanticSegDataset("custom", split, records, names, thing_ids, lut, transform)


# keyed by the one spelling of each name (mfcore.data.catalog.DATASET_NAMES)
DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "ade20k": ade20k,
    "ade20k-full": ade20k_full,
    "coco-stuff": coco_stuff_10k,
    "cityscapes": cityscapes,
    "mapillary": mapillary_vistas,
    "coco-panoptic": coco_panoptic,
    "ade20k-panoptic": ade20k_panoptic,
    # The synthetic generator writes these two real layouts; the same readers load them.
    "synthetic": synthetic_semantic,
    "synthetic-panoptic": functools.partial(coco_panoptic, name="synthetic-panoptic"),
    "custom": custom,
}


def build_dataset(name: str, root: str | Path, split: str = "train",
                  transform: Callable | None = None) -> SegmentationDataset:
    """Build a dataset by name (mfcore.data.catalog.dataset_name), e.g. build_dataset("ade20k", "datasets", "val")."""
    return DATASETS[catalog.dataset_name(name)](root, split, transform=transform)
