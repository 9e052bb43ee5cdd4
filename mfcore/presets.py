"""Named presets `<dataset>-<model>-<backbone>` for every model of the paper's tables, plus small CPU ones.

A preset bundles the three configs a run needs: `model` (ModelConfig), `loss` (LossConfig) and `train`
(TrainConfig). Dataset facts (classes, crop, schedule, test sizes) come from the paper (Sec. 4 and the
Appendix's implementation details) and the released detectron2 configs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mfcore.config import LossConfig, ModelConfig, TrainConfig, override
from mfcore.data.catalog import CLASSES_FROM_DATA


@dataclass
class Preset:
    name: str
    model: ModelConfig
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _short_sides(base: int, last: int = 20) -> tuple[int, ...]:
    """Short-side jitter of the released configs: int(x * 0.1 * base) for x in 5..last, i.e. base * {0.5, 0.6,
    ..., last / 10}: 2.0 for most datasets, 1.5 for COCO-Stuff-10K (320..960)."""
    return tuple(int(x * 0.1 * base) for x in range(5, last + 1))


def _tta_sides(base: int) -> tuple[int, ...]:
    """Multi-scale test sizes of the released configs (TEST.AUG.MIN_SIZES): base * {0.5, 0.75, ..., 1.75}."""
    return tuple(base * x // 4 for x in range(2, 8))


# The evaluation sizes of a model trained at crop 512 / 640 (released INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST,
# TEST.AUG.MIN_SIZES, TEST.AUG.MAX_SIZE): single scale at the crop size, long side <= 4x it; multi-scale
# 0.5x..1.75x with the long side <= 7x.
TEST_512 = dict(test_short_side=512, test_max_size=2048, tta_short_sides=_tta_sides(512), tta_max_size=3584)
TEST_640 = dict(test_short_side=640, test_max_size=2560, tta_short_sides=_tta_sides(640), tta_max_size=4480)

# dataset -> (num_classes, TrainConfig fields), from the paper's Sec. 4 / Appendix and the released configs
# (SOLVER.MAX_ITER, SOLVER.IMS_PER_BATCH, INPUT.CROP.SIZE, INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN, the
# test sizes above and the dataset's ignore label)
DATASETS: dict[str, tuple[int, dict]] = {
    "ade20k": (150, dict(dataset="ade20k", iters=160_000, **TEST_512)),
    # ADE20K-Full: 847 classes, so 255 is a class; unlabelled pixels and every padding carry 65535
    "ade20k-full": (847, dict(dataset="ade20k-full", iters=200_000, ignore_label=65535, **TEST_512)),
    "coco-stuff": (171, dict(dataset="coco-stuff", iters=60_000, batch_size=32, crop_size=(640, 640),
                             short_sides=_short_sides(640, last=15), max_size=2560, **TEST_640)),
    "cityscapes": (19, dict(dataset="cityscapes", iters=90_000, crop_size=(512, 1024),
                            short_sides=_short_sides(1024), max_size=4096, test_short_side=1024,
                            test_max_size=2048, tta_short_sides=_tta_sides(1024), tta_max_size=4096)),
    # Mapillary Vistas tests at a long side of 2048 (MIN_SIZE_TEST = MAX_SIZE_TEST = 2048); multi-scale at
    # 0.5, 1.0, 1.5 of that long side
    "mapillary": (65, dict(dataset="mapillary", iters=300_000, crop_size=(1280, 1280),
                           short_sides=_short_sides(2048), max_size=8192, test_short_side=2048,
                           test_max_size=2048, tta_short_sides=(1024, 2048, 3072), tta_side="long")),
    # COCO panoptic: DETR's augmentation, no fixed canvas (crop_size is only the size FLOPs are counted at)
    "coco-panoptic": (133, dict(dataset="coco-panoptic", iters=554_400, batch_size=64, lr_schedule="step",
                                lr_steps=(369_600,), augmentation="detr", crop_size=(800, 1216),
                                short_sides=tuple(range(480, 801, 32)), max_size=1333, test_short_side=800,
                                test_max_size=1333)),
    "ade20k-panoptic": (150, dict(dataset="ade20k-panoptic", iters=720_000, crop_size=(640, 640),
                                  short_sides=_short_sides(640), max_size=2560, object_mask_threshold=0.7,
                                  **TEST_640)),
}
PANOPTIC = ("coco-panoptic", "ade20k-panoptic")
MODELS = ("maskformer", "maskformer-fixed", "maskformer-boxmatch", "perpixel", "perpixelplus")
BACKBONES = ("r50", "r101", "r101c", "swin-t", "swin-s", "swin-b", "swin-l")
SWIN_TRAIN = dict(lr=6e-5, weight_decay=0.01, backbone_lr_mult=1.0, warmup_iters=1500)

# Small presets that train in minutes on a laptop CPU, on the generated synthetic scenes (64x64).
SMALL_MODEL = dict(conv_dim=64, mask_dim=64, hidden_dim=64, nheads=4, dim_feedforward=256, gn_groups=8,
                   num_queries=20, dropout=0.0, memory_feature="res3")
SMALL_DATASETS: dict[str, tuple[int, dict]] = {
    "synthetic": (32, dict(dataset="synthetic", iters=800, crop_size=(64, 64), short_sides=(48, 56, 64, 72, 80),
                           max_size=160, test_short_side=64, test_max_size=160, tta_short_sides=(48, 64, 80),
                           tta_max_size=320, lr=1e-3,
                           backbone_lr_mult=1.0, clip_grad_norm=1.0)),
    "synthetic-panoptic": (32, dict(dataset="synthetic-panoptic", iters=800, crop_size=(64, 64),
                                    short_sides=(48, 56, 64, 72, 80), max_size=160, test_short_side=64,
                                    test_max_size=160, tta_short_sides=(48, 64, 80), tta_max_size=320, lr=1e-3,
                                    backbone_lr_mult=1.0, clip_grad_norm=1.0)),
}
SMALL_BACKBONES = ("tiny", "tiny8", "r18")
SMALL_SCENE_SIZE = 64  # the scene size SMALL_DATASETS' crop, jitter and test sizes are written for


def scene_sizes(image_size: int) -> dict:
    """The small presets' crop, scale jitter and test sizes for scenes of `image_size` pixels: those written for
    64x64 scenes, scaled by image_size / 64, so that larger scenes train and test at their own resolution instead
    of being resized down to 64 (which would also average away their per-pixel noise)."""
    scale = image_size / SMALL_SCENE_SIZE
    base = SMALL_DATASETS["synthetic"][1]

    def sized(v: int) -> int:
        return int(round(v * scale))
    return dict(crop_size=(image_size, image_size), short_sides=tuple(sized(s) for s in base["short_sides"]),
                max_size=sized(base["max_size"]), test_short_side=sized(base["test_short_side"]),
                test_max_size=sized(base["test_max_size"]), tta_short_sides=tuple(sized(s) for s in base["tta_short_sides"]),
                tta_max_size=sized(base["tta_max_size"]))


def one_query_per_class(model: ModelConfig, loss: LossConfig) -> bool:
    """Whether the model has N = K queries, query i standing for class i: PerPixelBaseline+ (its queries
    are the class embeddings) and the fixed-matching MaskFormer of Table 4a. The one place this rule lives."""
    return model.arch == "perpixelplus" or loss.matcher == "fixed"


def with_classes(model: ModelConfig, loss: LossConfig, num_classes: int) -> ModelConfig:
    """`model` for K = `num_classes`, keeping N = K where `one_query_per_class`."""
    fields = {"num_classes": num_classes}
    if one_query_per_class(model, loss):
        fields["num_queries"] = num_classes
    return override(model, **fields)


def adapt_to_data(preset: Preset, model: ModelConfig, num_classes: int, explicit: dict | None = None) -> ModelConfig:
    """The model config of a run of `preset` on a dataset with K = `num_classes` classes.

    K comes from the data. A run on the synthetic scenes or on your own data (`CLASSES_FROM_DATA`) takes it
    (and N = K where `one_query_per_class`); a benchmark dataset must have its preset's K. `explicit`: the
    ModelConfig fields the user set (e.g. --set); an explicit num_classes, or an explicit num_queries of an
    N = K model, that differs from the data's K is an error naming both values, never silently replaced.
    """
    explicit = explicit or {}
    for key in ("num_classes", "num_queries"):
        if key in explicit and explicit[key] != num_classes and (
                key == "num_classes" or one_query_per_class(model, preset.loss)):
            rule = "" if key == "num_classes" else f" (a {model.arch} model with the {preset.loss.matcher} " \
                                                    f"matcher has one query per class, N = K)"
            raise ValueError(f"{key}={explicit[key]} was set explicitly, but the {preset.train.dataset} data has "
                             f"K={num_classes} classes{rule}")
    if num_classes == model.num_classes:
        return model
    if preset.train.dataset not in CLASSES_FROM_DATA:
        raise ValueError(f"dataset {preset.train.dataset} has {num_classes} classes but the model has "
                         f"{model.num_classes} (preset {preset.name})")
    return with_classes(model, preset.loss, num_classes)


def _model_variant(model: str, num_classes: int, base: ModelConfig) -> tuple[ModelConfig, LossConfig]:
    """Model/loss configs of one of MODELS on top of a base config (of K = num_classes)."""
    r = dataclasses.replace
    if model == "maskformer":
        variant, loss = base, LossConfig()
    elif model == "maskformer-fixed":  # Table 4a: N = K, query i <-> class i
        variant, loss = base, LossConfig(matcher="fixed")
    elif model == "maskformer-boxmatch":  # Table 5: DETR box head and box costs
        variant, loss = r(base, box_head=True), LossConfig(matcher="box")
    elif model == "perpixel":
        variant, loss = r(base, arch="perpixel"), LossConfig(matcher="perpixel")
    elif model == "perpixelplus":
        variant, loss = r(base, arch="perpixelplus"), LossConfig(matcher="perpixel")
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return with_classes(variant, loss, num_classes), loss


def _make(dataset: str, model: str, backbone: str, num_classes: int, train_fields: dict, small: bool) -> Preset:
    train = dict(train_fields)
    base = ModelConfig(backbone=backbone, num_classes=num_classes, **(SMALL_MODEL if small else {}))
    if backbone.startswith("swin"):
        base = dataclasses.replace(base, drop_path=0.3)
        train.update(SWIN_TRAIN)
        if backbone in ("swin-b", "swin-l") and dataset == "ade20k":  # Table 1: Swin-B/L at 640
            train.update(crop_size=(640, 640), short_sides=_short_sides(640), max_size=2560, **TEST_640)
    if dataset == "coco-panoptic" and backbone == "swin-l":  # released Swin-L COCO config: MAX_SIZE_TRAIN 1000
        train.update(max_size=1000)
    if dataset in PANOPTIC and backbone in ("r50", "r101"):
        base = dataclasses.replace(base, enc_layers=6)  # "R50/R101 + 6 Enc"
    model_cfg, loss_cfg = _model_variant(model, num_classes, base)
    name = f"{dataset}-{model}-{backbone}"
    return Preset(name, model_cfg, loss_cfg, TrainConfig(**train))


def _all_presets() -> dict[str, Preset]:
    presets = {}
    for table, backbones, small in ((DATASETS, BACKBONES, False), (SMALL_DATASETS, SMALL_BACKBONES, True)):
        for dataset, (k, train) in table.items():
            for model in MODELS:
                for backbone in backbones:
                    p = _make(dataset, model, backbone, k, train, small)
                    presets[p.name] = p
    return presets


PRESETS: dict[str, Preset] = _all_presets()


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (callers may modify it)."""
    if name not in PRESETS:
        close = [n for n in PRESETS if name.split("-")[0] in n][:8]
        raise ValueError(f"unknown preset {name!r}; names are <dataset>-<model>-<backbone>, e.g. "
                         f"ade20k-maskformer-r50 or synthetic-maskformer-tiny; similar: {close}")
    return dataclasses.replace(PRESETS[name], model=dataclasses.replace(PRESETS[name].model),
                               loss=dataclasses.replace(PRESETS[name].loss),
                               train=dataclasses.replace(PRESETS[name].train))
