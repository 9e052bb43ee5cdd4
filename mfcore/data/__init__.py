"""Data: real benchmark readers, synthetic scenes, augmentation and batching.

    build_dataset(name, root, split, transform)  -> dataset of sample dicts (see datasets.py)
    build_train_transform(...), collate(batch)
    make_synthetic(out_dir, ..., design="pairs" | "hue"), make_classification_set(out_dir, ...)
    ensure_synthetic(root, **make_synthetic_options)  -> root, generated once, atomically
"""
from mfcore.data.base import PanopticSegDataset, SegmentationDataset, SemanticSegDataset
from mfcore.data.datasets import DATASETS, build_dataset
from mfcore.data.synthetic import (
    DESIGNS,
    ClassDesign,
    HueDesign,
    design_classes,
    render_scene,
)
from mfcore.data.synthetic_writer import (
    ensure_synthetic,
    make_classification_set,
    make_synthetic,
)
from mfcore.data.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    build_train_transform,
    collate,
    panoptic_targets,
    semantic_targets,
)

__all__ = [
    "DATASETS",
    "DESIGNS",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ClassDesign",
    "HueDesign",
    "PanopticSegDataset",
    "SegmentationDataset",
    "SemanticSegDataset",
    "build_dataset",
    "build_train_transform",
    "collate",
    "design_classes",
    "ensure_synthetic",
    "make_classification_set",
    "make_synthetic",
    "panoptic_targets",
    "render_scene",
    "semantic_targets",
]
