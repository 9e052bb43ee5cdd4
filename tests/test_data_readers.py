"""Readers of the real datasets, each on a tiny fixture written in its exact on-disk layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfcore.data import build_dataset
from mfcore.data.formats import ids_to_rgb, read_panoptic_png

H, W = 6, 8


def _image(path: Path, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _label(path: Path, values: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(values)
    if mode == "P":  # Mapillary stores labels as palette PNGs: the palette index is the label
        im = im.convert("P")
        im.putpalette(list(range(256)) * 3)
    im.save(path)


def _stripes(values: list[int], dtype=np.uint8) -> np.ndarray:
    """An H x W label map whose columns cycle through `values` (every value present)."""
    return np.array([values[x % len(values)] for x in range(W)], dtype=dtype)[None].repeat(H, 0)


def _expected_masks(sem_seg: torch.Tensor, ignore: int) -> tuple[list[int], torch.Tensor]:
    labels = sorted(v for v in set(sem_seg.flatten().tolist()) if v != ignore)
    return labels, torch.stack([sem_seg == v for v in labels])


def test_ade20k_maps_0_to_ignore_and_shifts_classes(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _image(base / "images/training/ADE_train_00000001.jpg")
    _label(base / "annotations/training/ADE_train_00000001.png", _stripes([0, 1, 150, 7]))
    ds = build_dataset("ade20k", tmp_path, "train")
    assert (ds.num_classes, ds.ignore_label, ds.class_names[0], ds.class_names[149]) == (150, 255, "wall", "flag")
    s = ds[0]
    assert s["sem_seg"][0, :4].tolist() == [255, 0, 149, 6]
    labels, masks = _expected_masks(s["sem_seg"], 255)
    assert s["labels"].tolist() == labels == [0, 6, 149]
    assert torch.equal(s["masks"], masks)
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
    assert s["image_id"] == "ADE_train_00000001" and s["file_name"].endswith(".jpg")


def test_cityscapes_reads_train_ids_from_city_folders(tmp_path):
    base = tmp_path / "cityscapes"
    stem = "aachen_000000_000019"
    _image(base / f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png")
    _label(base / f"gtFine/val/aachen/{stem}_gtFine_labelTrainIds.png", _stripes([0, 18, 255, 11]))
    ds = build_dataset("cityscapes", tmp_path, "val")
    assert ds.num_classes == 19 and ds.thing_ids == tuple(range(11, 19))
    s = ds[0]
    assert s["sem_seg"][0, :4].tolist() == [0, 18, 255, 11]
    assert s["labels"].tolist() == [0, 11, 18]


def test_mapillary_maps_65_to_ignore(tmp_path):
    base = tmp_path / "mapillary_vistas"
    _image(base / "training/images/abc.jpg")
    _label(base / "training/v1.2/labels/abc.png", _stripes([0, 64, 65, 3]), mode="P")
    ds = build_dataset("mapillary", tmp_path, "train")
    assert ds.num_classes == 65
    assert ds[0]["sem_seg"][0, :4].tolist() == [0, 64, 255, 3]


def test_coco_stuff_10k_reads_prepared_labels(tmp_path):
    base = tmp_path / "coco/coco_stuff_10k"
    _image(base / "images_detectron2/test/COCO_train2014_000000000077.jpg")
    _label(base / "annotations_detectron2/test/COCO_train2014_000000000077.png", _stripes([0, 170, 255, 80]))
    ds = build_dataset("coco-stuff", tmp_path, "val")
    assert ds.num_classes == 171 and ds.thing_ids == tuple(range(80))
    assert ds.class_names[80] == "banner" and ds.class_names[170] == "wood"
    assert ds[0]["sem_seg"][0, :4].tolist() == [0, 170, 255, 80]


def test_ade20k_full_16bit_labels_and_65535_ignore(tmp_path):
    base = tmp_path / "ADE20K_2021_17_01"
    _image(base / "images_detectron2/validation/ADE_frame_1.jpg")
    values = _stripes([0, 255, 846, 65535, 300], dtype=np.uint16)
    _label(base / "annotations_detectron2/validation/ADE_frame_1.tif", values)
    ds = build_dataset("ade20k-full", tmp_path, "val")
    assert ds.num_classes == 847 and ds.ignore_label == 65535
    s = ds[0]
    assert s["sem_seg"][0, :5].tolist() == [0, 255, 846, 65535, 300]
    # 255 is a real class among 847: it must produce a target, only 65535 is ignored.
    assert s["labels"].tolist() == [0, 255, 300, 846]


def _write_panoptic(root: Path, json_path: Path, png_dir: Path, image_dir: Path, image_file: str) -> dict:
    """One image with: a thing (id 300: needs the G channel), a crowd thing, a stuff region, void."""
    _image(image_dir / image_file)
    ids = np.zeros((H, W), dtype=np.int64)
    ids[:, 0:2] = 300
    ids[:, 2:4] = 5
    ids[:, 4:7] = 70000  # uses the B channel
    png_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids_to_rgb(ids)).save(png_dir / "p1.png")
    data = {
        # deliberately not sorted by id: contiguous ids follow the list order
        "categories": [{"id": 7, "name": "car", "isthing": 1}, {"id": 1, "name": "person", "isthing": 1},
                       {"id": 200, "name": "sky", "isthing": 0}],
        "images": [{"id": 42, "file_name": image_file, "height": H, "width": W}],
        "annotations": [{"image_id": 42, "file_name": "p1.png", "segments_info": [
            {"id": 300, "category_id": 1, "iscrowd": 0, "area": 12},
            {"id": 5, "category_id": 7, "iscrowd": 1, "area": 12},
            {"id": 70000, "category_id": 200, "iscrowd": 0, "area": 18}]}],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data))
    return data


def _coco_fixture(root: Path) -> dict:
    coco = root / "coco"
    return _write_panoptic(root, coco / "annotations/panoptic_val2017.json", coco / "annotations/panoptic_val2017",
                           coco / "val2017", "000000000042.jpg")


def test_coco_panoptic_decodes_rgb_ids_and_drops_crowd(tmp_path):
    _coco_fixture(tmp_path)
    ds = build_dataset("coco-panoptic", tmp_path, "val")
    assert ds.class_names == ["car", "person", "sky"] and ds.thing_ids == (0, 1)
    s = ds[0]
    assert s["pan_seg"][0].tolist() == [300, 300, 5, 5, 70000, 70000, 70000, 0]
    # person -> 1, crowd car -> ignore, sky -> 2, void -> ignore
    assert s["sem_seg"][0].tolist() == [1, 1, 255, 255, 2, 2, 2, 255]
    assert s["labels"].tolist() == [1, 2]
    assert torch.equal(s["masks"], torch.stack([s["pan_seg"] == 300, s["pan_seg"] == 70000]))
    assert s["image_id"] == "42" and [x["isthing"] for x in s["segments_info"]] == [1, 1, 0]


def test_ade20k_panoptic_layout(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _write_panoptic(tmp_path, base / "ade20k_panoptic_train.json", base / "ade20k_panoptic_train",
                    base / "images/training", "ADE_train_00000001.jpg")
    s = build_dataset("ade20k-panoptic", tmp_path, "train")[0]
    assert s["labels"].tolist() == [1, 2]


def test_rgb_id_round_trip(tmp_path):
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 1, 123456]])
    Image.fromarray(ids_to_rgb(ids)).save(tmp_path / "x.png")
    assert np.array_equal(read_panoptic_png(tmp_path / "x.png"), ids)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, expected", [
    ("ade20k", "ADEChallengeData2016"), ("ade20k-full", "ADE20K_2021_17_01"),
    ("coco-stuff", "coco/coco_stuff_10k"), ("cityscapes", "cityscapes"),
    ("mapillary", "mapillary_vistas"), ("coco-panoptic", "coco"),
    ("ade20k-panoptic", "ADEChallengeData2016")])
def test_missing_layout_names_expected_path(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, tmp_path, "train")
    assert str(tmp_path / expected) in str(err.value) and "data/README.md" in str(err.value)


def test_partial_layout_names_missing_folder(tmp_path):
    _image(tmp_path / "ADEChallengeData2016/images/training/a.jpg")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ADEChallengeData2016/annotations/training")):
        build_dataset("ade20k", tmp_path, "train")


def test_image_without_label_names_expected_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _image(base / "images/training/a.jpg")
    (base / "annotations/training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(base / "annotations/training/a.png")):
        build_dataset("ade20k", tmp_path, "train")


def test_corrupt_image_names_file(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    (base / "images/training").mkdir(parents=True)
    (base / "images/training/a.jpg").write_bytes(b"not a jpeg at all")
    _label(base / "annotations/training/a.png", _stripes([1]))
    ds = build_dataset("ade20k", tmp_path, "train")
    with pytest.raises(ValueError, match="cannot read image .*a.jpg"):
        ds[0]


def test_label_size_mismatch_names_both_files(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _image(base / "images/training/a.jpg", h=H + 1)
    _label(base / "annotations/training/a.png", _stripes([1]))
    with pytest.raises(ValueError, match=r"annotations/training/a.png has size \(6, 8\).*a.jpg has size \(7, 8\)"):
        build_dataset("ade20k", tmp_path, "train")[0]


@pytest.mark.parametrize("name, folder, bad", [
    ("ade20k", "ADEChallengeData2016/annotations/training", 151),
    ("cityscapes", None, 19),
    ("coco-stuff", "coco/coco_stuff_10k/annotations_detectron2/train", 171)])
def test_label_value_out_of_range_names_file_and_value(tmp_path, name, folder, bad):
    images = {"ade20k": "ADEChallengeData2016/images/training",
              "coco-stuff": "coco/coco_stuff_10k/images_detectron2/train"}
    if name == "cityscapes":
        _image(tmp_path / "cityscapes/leftImg8bit/train/x/x_1_leftImg8bit.png")
        label = tmp_path / "cityscapes/gtFine/train/x/x_1_gtFine_labelTrainIds.png"
    else:
        _image(tmp_path / images[name] / "a.jpg")
        label = tmp_path / folder / "a.png"
    _label(label, _stripes([0, bad]))
    with pytest.raises(ValueError, match=rf"{label}.*\[{bad}\]"):
        build_dataset(name, tmp_path, "train")[0]


def test_panoptic_json_naming_missing_png(tmp_path):
    data = _coco_fixture(tmp_path)
    data["annotations"][0]["file_name"] = "gone.png"
    (tmp_path / "coco/annotations/panoptic_val2017.json").write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "coco/annotations/panoptic_val2017/gone.png")):
        build_dataset("coco-panoptic", tmp_path, "val")


def test_panoptic_png_with_unlisted_segment(tmp_path):
    data = _coco_fixture(tmp_path)
    data["annotations"][0]["segments_info"].pop()  # segment 70000 is in the PNG but not listed
    (tmp_path / "coco/annotations/panoptic_val2017.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"p1.png has segment ids \[70000\]"):
        build_dataset("coco-panoptic", tmp_path, "val")[0]


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'ade21k'"):
        build_dataset("ade21k", tmp_path)
    (tmp_path / "ADEChallengeData2016").mkdir()
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_dataset("ade20k", tmp_path, "dev")


# ----------------------------------------------------------------------------- dataset names
def test_one_spelling_per_dataset_and_aliases(tmp_path):
    from mfcore.data import DATASETS
    from mfcore.data.catalog import DATASET_ALIASES, DATASET_NAMES, dataset_name
    from mfcore.presets import DATASETS as PRESET_DATASETS
    from mfcore.presets import SMALL_DATASETS

    assert tuple(DATASETS) == DATASET_NAMES  # the readers are keyed by the one spelling
    assert set(PRESET_DATASETS) | set(SMALL_DATASETS) <= set(DATASET_NAMES)
    assert {dataset_name(n) for n in DATASET_NAMES} == set(DATASET_NAMES)
    assert dataset_name("ade20k_full") == "ade20k-full" and dataset_name("mapillary_vistas") == "mapillary"
    assert set(DATASET_ALIASES.values()) <= set(DATASET_NAMES) and not set(DATASET_ALIASES) & set(DATASET_NAMES)
    with pytest.raises(ValueError, match="unknown dataset 'ade20k full'.*ade20k-full"):
        dataset_name("ade20k full")
    # a former spelling reads the same dataset, under its one name
    base = tmp_path / "ADE20K_2021_17_01"
    _image(base / "images_detectron2/validation/a.jpg")
    _label(base / "annotations_detectron2/validation/a.tif", _stripes([0, 846], dtype=np.uint16))
    assert build_dataset("ade20k_full", tmp_path, "val").name == "ade20k-full"
