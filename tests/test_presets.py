"""Every real dataset preset carries the released recipe's values, written here as literals (the paper's
Sec. 4 and Appendix, and the released detectron2 configs: SOLVER.MAX_ITER, SOLVER.IMS_PER_BATCH,
INPUT.CROP.SIZE, INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN, INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST,
TEST.AUG.MIN_SIZES / MAX_SIZE, the dataset's ignore label)."""
from __future__ import annotations

import pytest

from mfcore.presets import BACKBONES, DATASETS, MODELS, get_preset

ADE_TRAIN = (256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024)
AT_640 = (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1088, 1152, 1216, 1280)
CITYSCAPES_TRAIN = (512, 614, 716, 819, 921, 1024, 1126, 1228, 1331, 1433, 1536, 1638, 1740, 1843, 1945, 2048)
MAPILLARY_TRAIN = (1024, 1228, 1433, 1638, 1843, 2048, 2252, 2457, 2662, 2867, 3072, 3276, 3481, 3686, 3891, 4096)
TTA_512 = (256, 384, 512, 640, 768, 896)
TTA_640 = (320, 480, 640, 800, 960, 1120)

# preset: (train short sides, train max size, crop, test short side, test max size, test scales, their max size,
#          test scales are long sides, ignore label, iterations, batch)
RELEASED = {
    "ade20k-maskformer-r50": (ADE_TRAIN, 2048, (512, 512), 512, 2048, TTA_512, 3584, False, 255, 160_000, 16),
    "ade20k-maskformer-swin-b": (AT_640, 2560, (640, 640), 640, 2560, TTA_640, 4480, False, 255, 160_000, 16),
    "ade20k-full-maskformer-r50": (ADE_TRAIN, 2048, (512, 512), 512, 2048, TTA_512, 3584, False, 65535, 200_000,
                                   16),
    "coco-stuff-maskformer-r50": ((320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960), 2560, (640, 640),
                                  640, 2560, TTA_640, 4480, False, 255, 60_000, 32),
    "cityscapes-maskformer-r101": (CITYSCAPES_TRAIN, 4096, (512, 1024), 1024, 2048,
                                   (512, 768, 1024, 1280, 1536, 1792), 4096, False, 255, 90_000, 16),
    "mapillary-maskformer-r50": (MAPILLARY_TRAIN, 8192, (1280, 1280), 2048, 2048,
                                 (1024, 2048, 3072), None, True, 255, 300_000, 16),
    "ade20k-panoptic-maskformer-r50": (AT_640, 2560, (640, 640), 640, 2560, TTA_640, 4480, False, 255, 720_000,
                                       16),
    "coco-panoptic-maskformer-r50": (tuple(range(480, 801, 32)), 1333, None, 800, 1333, None, None, False, 255,
                                     554_400, 64),
    "coco-panoptic-maskformer-swin-l": (tuple(range(480, 801, 32)), 1000, None, 800, 1333, None, None, False, 255,
                                        554_400, 64),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_has_the_released_values(name):
    (short_sides, max_size, crop, test_short, test_max, tta, tta_max, tta_long, ignore, iters,
     batch) = RELEASED[name]
    cfg = get_preset(name).train
    if short_sides is not None:
        assert cfg.short_sides == short_sides
    if crop is not None:
        assert cfg.crop_size == crop
    assert cfg.max_size == max_size
    assert (cfg.test_short_side, cfg.test_max_size) == (test_short, test_max)
    if tta is not None:
        assert cfg.tta_short_sides == tta
    if tta_max is not None:
        assert cfg.tta_max_size == tta_max
    assert (cfg.tta_side == "long") == tta_long
    assert (cfg.ignore_label, cfg.iters, cfg.batch_size) == (ignore, iters, batch)


def test_coco_panoptic_trains_with_detr_augmentation_every_other_dataset_with_the_semantic_one():
    """COCO panoptic uses DETR's augmentation (released INPUT.DATASET_MAPPER_NAME "detr_panoptic"); the
    semantic datasets and ADE20K panoptic the semantic recipe (crop, colour, pad to the crop)."""
    for dataset in DATASETS:
        for backbone in BACKBONES:
            want = "detr" if dataset == "coco-panoptic" else "semantic"
            assert get_preset(f"{dataset}-maskformer-{backbone}").train.augmentation == want


def test_every_dataset_preset_is_in_the_table():
    datasets = {name.split("-maskformer-")[0] for name in RELEASED}
    assert datasets == set(DATASETS)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_dataset_values_do_not_depend_on_model(dataset):
    """The data recipe is the dataset's (Swin-B/L on ADE20K at 640 aside): the same for every model."""
    fields = ("short_sides", "max_size", "test_short_side", "test_max_size", "tta_short_sides", "tta_max_size",
              "tta_side", "ignore_label", "iters", "batch_size")
    ref = get_preset(f"{dataset}-maskformer-r50").train
    for model in MODELS:
        for backbone in BACKBONES:
            if (dataset, backbone) in (("ade20k", "swin-b"), ("ade20k", "swin-l"), ("coco-panoptic", "swin-l")):
                continue  # Swin-B/L on ADE20K at 640; Swin-L on COCO at max size 1000
            cfg = get_preset(f"{dataset}-{model}-{backbone}").train
            assert [getattr(cfg, f) for f in fields] == [getattr(ref, f) for f in fields]


def test_code_cites_the_paper_not_a_file_outside_the_repository():
    """Comments cite the paper (section, table, equation) or a released config key, never a notes file that
    is not part of this repository."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    outside = ("REFERENCE" + ".md", "# REFERENCE" + ":")
    hits = [f"{path.relative_to(root)}:{i}" for folder in ("mfcore", "tests", "benchmarks")
            for path in sorted((root / folder).rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if any(o in line for o in outside)]
    assert hits == []
