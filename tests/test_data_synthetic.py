"""Synthetic scenes: determinism, real on-disk formats, and the class-design property."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfcore.data import build_dataset, design_classes, make_classification_set, make_synthetic, render_scene
from mfcore.data import synthetic_writer
from mfcore.data.synthetic import balanced_pairs, primitives_needed


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    make_synthetic(out, num_classes=12, num_train=6, num_val=3, image_size=32, seed=3, kind="both", workers=1)
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path, scenes, monkeypatch):
    # Chunks of 2 scenes rendered by 2 processes must give the same bytes as 1 process.
    monkeypatch.setattr(synthetic_writer, "_CHUNK", 2)
    make_synthetic(tmp_path / "a", num_classes=12, num_train=6, num_val=3, image_size=32, seed=3, kind="both",
                   workers=2)
    make_synthetic(tmp_path / "b", num_classes=12, num_train=6, num_val=3, image_size=32, seed=4, kind="both",
                   workers=1)
    assert _digest(tmp_path / "a") == _digest(scenes)
    assert _digest(tmp_path / "b") != _digest(scenes)


def test_semantic_layout_read_by_ade20k_reader(scenes):
    ds = build_dataset("ade20k", scenes, "train")
    assert (ds.name, ds.num_classes, len(ds), ds.ignore_label) == ("synthetic_semantic", 12, 6, 255)
    assert ds.thing_ids == tuple(range(round(0.4 * 12)))
    for i in range(len(ds)):
        raw = np.asarray(Image.open(scenes / f"ADEChallengeData2016/annotations/training/syn_train_{i:06d}.png"))
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)  # ADE convention: 0 = other
        sample = ds[i]
        assert np.array_equal(sample["sem_seg"].numpy(), expected)
        assert sample["labels"].tolist() == sorted(set(expected.ravel().tolist()) - {255})


def test_panoptic_layout_agrees_with_semantic_layout(scenes):
    semantic = build_dataset("synthetic_semantic", scenes, "val")
    panoptic = build_dataset("synthetic_panoptic", scenes, "val")
    assert panoptic.thing_ids == semantic.thing_ids and panoptic.class_names == semantic.class_names
    for i in range(len(panoptic)):
        p, s = panoptic[i], semantic[i]
        assert torch.equal(p["image"], s["image"]) and torch.equal(p["sem_seg"], s["sem_seg"])
        # one mask per segment: masks are disjoint, areas match the JSON, things may repeat a class
        assert p["masks"].sum(0).max() <= 1
        assert p["masks"].sum((1, 2)).tolist() == [seg["area"] for seg in p["segments_info"]]
        stuff = [c for c, seg in zip(p["labels"].tolist(), p["segments_info"]) if not seg["isthing"]]
        assert len(stuff) == len(set(stuff))


def test_many_classes_use_16bit_labels_and_65535_ignore(tmp_path):
    make_synthetic(tmp_path, num_classes=300, num_train=3, num_val=0, image_size=32, seed=0, kind="semantic")
    ds = build_dataset("ade20k", tmp_path, "train")
    assert ds.num_classes == 300 and ds.ignore_label == 65535
    labels = torch.cat([ds[i]["labels"] for i in range(3)])
    assert labels.max() > 255 and labels.max() < 300  # values above 255 survive the round trip


@pytest.mark.parametrize("num_classes", [5, 20, 150, 847])
def test_every_primitive_is_shared_by_several_classes(num_classes):
    design = design_classes(num_classes, round(0.4 * num_classes), seed=0)
    pairs = [tuple(sorted(p)) for p in design.class_primitives]
    assert len(set(pairs)) == num_classes and all(a != b for a, b in pairs)
    users = Counter(p for pair in pairs for p in pair)
    assert set(users) == set(range(design.num_primitives))  # no primitive is wasted
    # Local evidence never names a class: each primitive belongs to >= 2 classes, and the
    # sharing grows with K (about sqrt(2K)), so region-level statistics are required.
    assert min(users.values()) >= 2
    if num_classes >= 20:  # nearly every pair is a class: each primitive is in ~P-1 of them
        assert min(users.values()) >= 0.8 * (design.num_primitives - 1)


def test_sharing_grows_with_the_number_of_classes():
    sharing = [min(Counter(p for pair in design_classes(k, 0, 0).class_primitives for p in pair).values())
               for k in (10, 50, 150, 847)]
    assert sharing == sorted(sharing) and sharing[-1] >= 30 > sharing[0]


def test_balanced_pairs_and_bank_size():
    assert primitives_needed(3) == 3 and primitives_needed(4) == 4 and primitives_needed(150) == 18
    for p in (4, 5, 18):
        pairs = balanced_pairs(p)
        assert len(pairs) == len({frozenset(x) for x in pairs}) == p * (p - 1) // 2
        first_ring = Counter(q for pair in pairs[:p] for q in pair)
        assert set(first_ring.values()) == {2}


def test_scene_regions_show_both_primitives_of_their_class():
    """Every stuff region large enough shows a mosaic of its two primitives (different colours or
    patterns), so no single pixel neighbourhood carries the whole class identity."""
    design = design_classes(6, 0, seed=0)
    rng = np.random.default_rng(0)
    two_tone = 0
    for _ in range(5):
        image, segments, classes = render_scene(design, rng, size=64, max_things=0, void_prob=0.0, noise_std=0.0)
        for j in range(1, len(classes) + 1):
            region = image[segments == j]
            if len(region) >= 400:
                two_tone += len(np.unique(region // 8, axis=0)) > 2
    assert two_tone >= 5


def test_dominant_class_is_largest_segment():
    design = design_classes(10, 0, seed=1)
    for i in range(10):
        _, segments, classes = render_scene(design, np.random.default_rng(i), size=32, max_regions=3,
                                            max_things=0, dominant_class=i % 10)
        areas = np.bincount(segments.ravel(), minlength=len(classes) + 1)[1:]
        assert classes[int(areas.argmax())] == i % 10


def test_classification_set_imagefolder_layout(tmp_path):
    design = make_classification_set(tmp_path, num_classes=6, num_train=12, num_val=4, image_size=32, seed=0)
    train = sorted((tmp_path / "train").rglob("*.png"))
    assert len(train) == 12 and len(list((tmp_path / "val").rglob("*.png"))) == 4
    assert {p.parent.name for p in train} <= set(design.class_names)
    assert (tmp_path / "classification_meta.json").is_file()


def test_a_scene_with_a_single_segment_gets_a_nonzero_panoptic_id():
    import numpy as np

    from mfcore.data.synthetic_writer import _panoptic_annotation

    info, _ = _panoptic_annotation(np.random.default_rng(0), np.ones((4, 4), dtype=np.int64), [3], "x")
    assert info["segments_info"][0]["id"] != 0
