"""`mfcore predict` on a folder of images with a 2-iteration checkpoint: outputs, sizes, and bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfcore.cli import main
from mfcore.data.formats import read_image, read_label, read_panoptic_png
from mfcore.predict import predict
from mfcore.training.train import train

FAST = dict(crop_size=(32, 32), short_sides=(32,), max_size=64, test_short_side=32, batch_size=4, num_workers=0,
            log_period=1, checkpoint_period=100, eval_period=0, iters=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    from mfcore.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_classes=6, num_train=4, num_val=1, image_size=32, workers=1)
    out = tmp_path_factory.mktemp("run")
    train("synthetic-panoptic-maskformer-tiny", out, root, train_overrides=FAST, model_overrides=dict(dec_layers=2),
          progress="off")
    images = tmp_path_factory.mktemp("images")
    source = sorted((root / "coco" / "train2017").glob("*.png"))
    Image.open(source[0]).save(images / "a.png")
    Image.open(source[1]).convert("RGB").resize((40, 24)).save(images / "b.jpg")  # another size and shape
    (images / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    return {"checkpoint": out / "last.pt", "images": images}


SIZES = {"a": (32, 32), "b": (24, 40)}


def _overlay_ok(path: Path, size: tuple[int, int]) -> None:
    overlay = read_image(path)
    assert overlay.shape[0] >= size[0] and overlay.shape[1] > size[1]  # the image, then the legend on its right


def test_predict_semantic_folder_writes_label_and_overlay(run, tmp_path, capsys):
    main(["predict", str(run["images"]), "--checkpoint", str(run["checkpoint"]), "--out", str(tmp_path),
          "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2]") and "a_semantic.png" in lines[0]
    for stem, size in SIZES.items():
        label = read_label(tmp_path / f"{stem}_semantic.png")
        assert label.shape == size and label.max() < 6
        _overlay_ok(tmp_path / f"{stem}_overlay.png", size)


def test_predict_panoptic_writes_coco_png_and_json(run, tmp_path, monkeypatch):
    import mfcore.predict as module

    # after 2 iterations every query says "no object" with empty masks: drop that column, centre the mask logits
    # and keep every query, so that segments exist
    real = module.panoptic_inference
    monkeypatch.setattr(module, "panoptic_inference", lambda logits, masks, things, *_: real(
        torch.cat([logits[:, :-1], torch.full_like(logits[:, :1], -1e4)], 1),
        masks - masks.mean(dim=(1, 2), keepdim=True), things, 0, 0))
    result = predict([run["images"]], run["checkpoint"], task="panoptic", out_dir=tmp_path, device="cpu", log=None)
    assert len(result["images"]) == 2
    data = json.loads((tmp_path / "panoptic.json").read_text())
    assert [a["image_id"] for a in data["annotations"]] == ["a", "b"] and len(data["categories"]) == 6
    for stem, size in SIZES.items():
        ids = read_panoptic_png(tmp_path / f"{stem}_panoptic.png")
        assert ids.shape == size
        annotation = next(a for a in data["annotations"] if a["image_id"] == stem)
        assert annotation["segments_info"]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in annotation["segments_info"]}
        assert all(s["area"] == int((ids == s["id"]).sum()) for s in annotation["segments_info"])
        _overlay_ok(tmp_path / f"{stem}_overlay.png", size)


def test_predict_instance_writes_ids_and_json(run, tmp_path, monkeypatch):
    import mfcore.predict as module

    real = module.instance_inference  # as in the panoptic test: instances despite 2 iterations of training
    monkeypatch.setattr(module, "instance_inference", lambda logits, masks: real(
        torch.cat([logits[:, :-1], torch.full_like(logits[:, :1], -1e4)], 1),
        masks - masks.mean(dim=(1, 2), keepdim=True)))
    predict([run["images"] / "b.jpg"], run["checkpoint"], task="instance", out_dir=tmp_path, device="cpu", log=None)
    ids = read_label(tmp_path / "b_instances.png")
    records = json.loads((tmp_path / "b_instances.json").read_text())["instances"]
    assert ids.shape == SIZES["b"] and records and ids.max() <= len(records)
    assert all(r["area"] > 0 and r["name"] for r in records)
    assert [r["id"] for r in records] == list(range(1, len(records) + 1))
    assert all(a["score"] >= b["score"] for a, b in zip(records, records[1:]))


@pytest.mark.parametrize("case", ["missing checkpoint", "non-image file", "missing image", "empty folder"])
def test_bad_inputs_are_one_line_and_exit_2(run, tmp_path, capsys, case):
    checkpoint, inputs = str(run["checkpoint"]), [str(run["images"])]
    if case == "missing checkpoint":
        checkpoint = str(tmp_path / "nope.pt")
    elif case == "non-image file":
        (tmp_path / "fake.png").write_text("hello")
        inputs = [str(tmp_path / "fake.png")]
    elif case == "missing image":
        inputs = [str(tmp_path / "missing.jpg")]
    else:
        (tmp_path / "empty").mkdir()
        inputs = [str(tmp_path / "empty")]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *inputs, "--checkpoint", checkpoint, "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("mfcore predict: error: ")
    assert {"missing checkpoint": "nope.pt", "non-image file": "fake.png", "missing image": "missing.jpg",
            "empty folder": "no images"}[case] in err[0]
