"""`train --dataset custom --data-root DIR`: your own images, label maps and classes (data/README.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mfcore.cli import main
from mfcore.data import build_dataset
from mfcore.training.checkpoint import load_checkpoint

CLASSES = [{"name": "grass", "isthing": False}, {"name": "sky"}, {"name": "ball", "isthing": True}]
FAST = ["--iters", "2", "--batch-size", "2", "--num-workers", "0", "--set", "train.crop_size=[32,32]",
        "--set", "train.short_sides=[32]", "--set", "train.max_size=64", "--set", "train.test_short_side=32",
        "--set", "train.log_period=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _scene(i: int) -> tuple[np.ndarray, np.ndarray]:
    """A 32x32 image and its label map: grass below, sky above (row 16 unlabelled), a ball in image 1."""
    label = np.zeros((32, 32), np.uint8)
    label[:16], label[16] = 1, 255
    if i % 2:
        label[20:26, 8:14] = 2
    colours = np.array([[40, 160, 40], [120, 170, 250], [230, 60, 30]] + [[0, 0, 0]] * 253, np.uint8)
    return colours[label], label


def make_semantic(root: Path, images: int = 4) -> Path:
    (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(CLASSES))
    for split in ("train", "val"):
        for folder in ("images", "labels"):
            (root / folder / split).mkdir(parents=True)
        for i in range(images):
            image, label = _scene(i)
            Image.fromarray(image).save(root / "images" / split / f"img{i}.jpg")
            Image.fromarray(label).save(root / "labels" / split / f"img{i}.png")
    return root


def make_panoptic(root: Path, images: int = 4) -> Path:
    categories = [{"id": 10 + i, "name": c["name"], "isthing": int(c.get("isthing", False))}
                  for i, c in enumerate(CLASSES)]
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / f"panoptic_{split}").mkdir(parents=True)
        annotations = []
        for i in range(images):
            image, label = _scene(i)
            ids = np.where(label == 255, 0, label.astype(np.int32) + 1)  # segment id = class + 1, 0 = void
            Image.fromarray(image).save(root / "images" / split / f"img{i}.png")
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(root / f"panoptic_{split}" / f"img{i}.png")
            segments = [{"id": int(s), "category_id": 10 + int(s) - 1, "iscrowd": 0} for s in np.unique(ids) if s]
            annotations.append({"image_id": i, "file_name": f"img{i}.png", "segments_info": segments})
        images_list = [{"id": i, "file_name": f"img{i}.png"} for i in range(images)]
        (root / f"panoptic_{split}.json").write_text(json.dumps(
            {"images": images_list, "annotations": annotations, "categories": categories}))
    return root


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_both_layouts_give_the_data_classes(tmp_path):
    semantic = build_dataset("custom", make_semantic(tmp_path / "sem"), "train")
    panoptic = build_dataset("custom", make_panoptic(tmp_path / "pan"), "val")
    for data in (semantic, panoptic):
        assert data.num_classes == 3 and data.class_names == ["grass", "sky", "ball"] and data.thing_ids == (2,)
        sample = data[1]
        assert sample["labels"].tolist() == [0, 1, 2] and (sample["sem_seg"][16] == 255).all()
    assert "pan_seg" in panoptic[0] and "pan_seg" not in semantic[0]


@pytest.mark.parametrize("layout", [make_semantic, make_panoptic])
def test_a_custom_dataset_trains_and_evaluates(layout, tmp_path, capsys):
    root, run = layout(tmp_path / "data"), tmp_path / "run"
    main(["train", "--preset", "synthetic-maskformer-tiny", "--dataset", "custom", "--data-root", str(root),
          "--output", str(run), "--device", "cpu", "--progress", "off", *FAST])
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["model"]["num_classes"] == 3 and ckpt["config"]["train"]["dataset"] == "custom"
    assert ckpt["classes"] == {"names": ["grass", "sky", "ball"], "thing_ids": [2]}
    capsys.readouterr()
    main(["evaluate", str(run / "last.pt"), "--data-root", str(root), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "mIoU" in out and "eval: 4/4 images" in out and (run / "eval_val.json").is_file()  # progress lines


def _no_classes(root: Path) -> None:
    (root / "classes.json").unlink()


def _both_layouts(root: Path) -> None:
    (root / "panoptic_train.json").write_text("{}")


def _bad_class(root: Path) -> None:
    (root / "classes.json").write_text(json.dumps([{"name": "grass"}, {"label": "sky"}]))


def _not_a_list(root: Path) -> None:
    (root / "classes.json").write_text(json.dumps({"grass": 0}))


def _missing_label(root: Path) -> None:
    (root / "labels" / "train" / "img2.png").unlink()


def _no_images(root: Path) -> None:
    for path in (root / "images" / "train").iterdir():
        path.unlink()


def _label_out_of_range(root: Path) -> None:
    for path in (root / "labels" / "train").iterdir():
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(path)


@pytest.mark.parametrize("damage, expected", [
    (_no_classes, "classes.json (with label maps in labels/) or"), (_both_layouts, "holds both classes.json"),
    (_bad_class, "classes.json: class 1 is"), (_not_a_list, "classes.json: expected a non-empty JSON list"),
    (_missing_label, "img2.png"), (_no_images, "no images"), (_label_out_of_range, "contains values [7]")])
def test_bad_layouts_are_refused_in_one_line(damage, expected, tmp_path, capsys):
    root = make_semantic(tmp_path / "data")
    damage(root)
    code, err = _cli(["train", "--preset", "synthetic-maskformer-tiny", "--dataset", "custom", "--data-root",
                      str(root), "--output", str(tmp_path / "run"), "--device", "cpu", "--progress", "off", *FAST],
                     capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_custom_needs_its_data_root_and_a_known_name(tmp_path, capsys):
    code, err = _cli(["train", "--preset", "synthetic-maskformer-tiny", "--dataset", "custom", "--output",
                      str(tmp_path / "run")], capsys)
    assert code == 2 and "needs --data-root" in err
    code, err = _cli(["train", "--preset", "synthetic-maskformer-tiny", "--dataset", "mine", "--output",
                      str(tmp_path / "run2")], capsys)
    assert code == 2 and "unknown dataset 'mine'" in err and not (tmp_path / "run2").exists()
