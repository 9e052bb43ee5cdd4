"""Synthetic scenes: determinism, real on-disk formats, and the class-design property."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfcore.data import (
    build_dataset,
    design_classes,
    make_classification_set,
    make_synthetic,
    render_scene,
    synthetic_writer,
)
from mfcore.data.separability import box_sums, separability
from mfcore.data.design_hue import hsv_to_rgb, rgb_hue
from mfcore.data.design_pairs import balanced_pairs, primitives_needed


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
    assert (ds.name, ds.num_classes, len(ds), ds.ignore_label) == ("synthetic", 12, 6, 255)
    assert ds.thing_ids == tuple(range(round(0.4 * 12)))
    for i in range(len(ds)):
        raw = np.asarray(Image.open(scenes / f"ADEChallengeData2016/annotations/training/syn_train_{i:06d}.png"))
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)  # ADE convention: 0 = other
        sample = ds[i]
        assert np.array_equal(sample["sem_seg"].numpy(), expected)
        assert sample["labels"].tolist() == sorted(set(expected.ravel().tolist()) - {255})


def test_panoptic_layout_agrees_with_semantic_layout(scenes):
    semantic = build_dataset("synthetic", scenes, "val")
    panoptic = build_dataset("synthetic-panoptic", scenes, "val")
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


# ----------------------------------------------------------------------------- the "hue" design
def _hue_digest(tmp_path: Path, name: str, **kwargs) -> str:
    make_synthetic(tmp_path / name, **{"num_classes": 32, "num_train": 4, "num_val": 2, "image_size": 64,
                                       "seed": 0, "kind": "both", "workers": 1, "design": "hue", **kwargs})
    return _digest(tmp_path / name)


def test_hue_design_is_deterministic_and_recorded_in_the_meta(tmp_path):
    assert _hue_digest(tmp_path, "a") == _hue_digest(tmp_path, "b")
    assert _hue_digest(tmp_path, "c", seed=1) != _hue_digest(tmp_path, "a")
    first = Image.open(tmp_path / "a/ADEChallengeData2016/images/training/syn_train_000000.png").tobytes()
    second = Image.open(tmp_path / "a/ADEChallengeData2016/images/training/syn_train_000001.png").tobytes()
    assert first != second
    ds = build_dataset("synthetic", tmp_path / "a", "train")
    assert ds.num_classes == 32 and ds.thing_ids == tuple(range(13))
    meta = json.loads((tmp_path / "a/ADEChallengeData2016/synthetic_meta.json").read_text())
    assert meta["design"] == "hue" and sorted(meta["class_hue"]) == [k * 360 / 32 for k in range(32)]


def test_pairs_is_the_default_design():
    assert design_classes(12, 4, seed=3).name == "pairs"
    assert design_classes(12, 4, seed=3) == design_classes(12, 4, seed=3, design="pairs")


def test_hue_scene_pixels_scatter_around_the_class_hue():
    """Inside a segment (contours excluded) the mean hue is the class hue, and single pixels stray
    by about the design's hue noise: one pixel says little at K = 32 (11.25 degrees apart)."""
    design = design_classes(32, 0, seed=0, design="hue")
    image, segments, classes = render_scene(design, np.random.default_rng(0), void_prob=0.0)
    hue, chroma = rgb_hue(image)
    for j, k in enumerate(classes, start=1):
        inside = (segments == j) & (chroma > 0.2)
        if inside.sum() < 300:
            continue
        offset = (hue[inside] - design.class_hue[k] + 180.0) % 360.0 - 180.0
        mean = np.rad2deg(np.angle(np.exp(1j * np.deg2rad(offset)).mean()))
        assert abs(mean) < 5.0
        assert 25.0 < offset.std() < 55.0


def test_hsv_round_trip():
    rng = np.random.default_rng(0)
    hue, sat, val = rng.uniform(0, 360, 500), rng.uniform(0.3, 1, 500), rng.uniform(0.3, 1, 500)
    image = np.round(hsv_to_rgb(hue, sat, val) * 255).astype(np.uint8)
    back, chroma = rgb_hue(image)
    assert np.abs((back - hue + 180) % 360 - 180).max() < 2.0
    assert np.allclose(chroma, sat * val, atol=0.01)


def test_long_tailed_class_frequencies():
    """Zipf exponent 1: region classes follow 1 / rank, ranks shuffled (not tied to the hue order)."""
    design = design_classes(32, 0, seed=0, design="hue", class_freq_exponent=1.0)
    assert sorted(design.class_freq, reverse=True) == pytest.approx([1 / r for r in range(1, 33)])
    assert list(design.class_freq) != sorted(design.class_freq, reverse=True)
    rng = np.random.default_rng(0)
    counts = Counter(k for _ in range(400) for k in render_scene(design, rng, max_things=0)[2])
    common = [k for k, f in enumerate(design.class_freq) if f >= 1 / 3]
    rare = [k for k, f in enumerate(design.class_freq) if f <= 1 / 24]
    assert sum(counts[k] for k in common) > 3 * sum(counts[k] for k in rare)
    assert design_classes(32, 0, seed=0, design="hue").class_freq == ()  # exponent 0: uniform


@pytest.mark.parametrize("kwargs, words", [
    ({"design": "checker"}, "design must be one of"),
    ({"design": "hue", "class_freq_exponent": -1.0}, "class_freq_exponent"),
    ({"design": "hue", "class_freq_exponent": float("nan")}, "class_freq_exponent"),
    ({"design": "hue", "num_primitives": 5}, "num_primitives"),
    ({"design": "hue", "hue_noise": 0.0}, "hue_noise"),
    ({"design": "hue", "hue_context": -1}, "hue_context"),
])
def test_bad_design_arguments_raise(kwargs, words):
    with pytest.raises(ValueError, match=words):
        design_classes(32, 4, seed=0, **kwargs)


def test_box_sums_match_a_direct_sum():
    features = np.random.default_rng(0).normal(size=(7, 7, 2))
    sums = box_sums(features, 3)
    assert np.allclose(sums[3, 3], features[2:5, 2:5].sum((0, 1)))
    assert np.allclose(sums[0, 0], features[:2, :2].sum((0, 1)))  # cut at the border
    with pytest.raises(ValueError, match="odd"):
        box_sums(features, 4)


def test_hue_classes_need_the_region_at_32_and_boxes_get_worse_with_k():
    """The design's promise, learning-free: at K = 32 the mean hue of a 9x9 box confuses adjacent
    classes while the segment's mean hue does not, and a box's accuracy falls as K grows."""
    results = {k: separability("hue", k, num_scenes=40, boxes=(9,)) for k in (8, 32, 128)}
    at32 = results[32]
    assert at32["region"]["mIoU"] > 88 and at32["box_9"]["mIoU"] < 50
    assert at32["region"]["pixel_acc"] > at32["box_9"]["pixel_acc"] + 30
    box = [results[k]["box_9"]["pixel_acc"] for k in (8, 32, 128)]
    assert box[0] > box[1] + 15 and box[1] > box[2] + 15


def test_hue_context_puts_only_hue_neighbours_in_a_scene():
    design = design_classes(32, 13, seed=0, design="hue", hue_context=4)
    step = 360.0 / 32
    for i in range(30):
        _, segments, classes = render_scene(design, np.random.default_rng([0, 1, i]))
        hues = [design.class_hue[k] for k in classes]
        spread = max(abs((a - b + 180.0) % 360.0 - 180.0) for a in hues for b in hues) if hues else 0.0
        assert spread <= 8 * step + 1e-6  # two classes at most 4 steps either side of one anchor
    assert len(design.neighbours(0)) == 9
    independent = design_classes(32, 13, seed=0, design="hue")
    assert independent.context == 0 and "context" in independent.to_json()


def test_image_context_explains_little_once_hue_neighbours_share_a_scene():
    """Knowing which classes an image holds (what PerPixelBaseline+'s class queries can learn) nearly solves
    independent scenes at K = 32, but not scenes of hue neighbours, where only the segment's statistic does."""
    independent = separability("hue", 32, num_scenes=40, boxes=(9,))
    context = separability("hue", 32, num_scenes=40, boxes=(9,), hue_context=4)
    assert independent["box_9_in_image"]["mIoU"] > context["box_9_in_image"]["mIoU"] + 8
    assert context["region"]["mIoU"] > context["box_9_in_image"]["mIoU"] + 30


def test_ensure_synthetic_is_atomic_and_generated_once(tmp_path, monkeypatch):
    import mfcore.data.synthetic_writer as writer
    from mfcore.data import ensure_synthetic

    options = {"num_classes": 4, "num_train": 2, "num_val": 1, "image_size": 32, "workers": 1}
    real = writer.make_synthetic

    def killed(out_dir, **kw):  # a run killed half-way through writing the set
        real(out_dir, **kw)
        (Path(out_dir) / "ADEChallengeData2016" / "synthetic_meta.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "make_synthetic", killed)
    root = tmp_path / "cache" / "set"
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, **options)
    assert not root.exists()  # readers never see the half-written set under its name
    monkeypatch.setattr(writer, "make_synthetic", real)
    assert ensure_synthetic(root, **options) == root and (root / "DONE").is_file()
    assert build_dataset("synthetic", root, "train").num_classes == 4
    assert sorted(p.name for p in root.parent.iterdir()) == ["set"]  # the temporary copies are gone

    def fail(*args, **kw):
        raise AssertionError("a complete set is never generated again")

    monkeypatch.setattr(writer, "make_synthetic", fail)
    assert ensure_synthetic(root, **options) == root
    # a folder without the marker (e.g. written half-way by an older version) is replaced by a whole set
    legacy = tmp_path / "cache" / "legacy"
    (legacy / "ADEChallengeData2016").mkdir(parents=True)
    monkeypatch.setattr(writer, "make_synthetic", real)
    ensure_synthetic(legacy, **options)
    assert (legacy / "DONE").is_file() and len(build_dataset("synthetic", legacy, "val")) == 1
