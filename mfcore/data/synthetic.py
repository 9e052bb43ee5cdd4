"""Synthetic scenes in which classes differ only by *region-level* evidence.

Two scene designs (`DESIGNS`), chosen with `design_classes(..., design=...)`; see data/README.md:

* "hue" (design_hue.py): a class is one of K evenly spaced hues under strong per-pixel noise,
  named by the statistic of the whole segment, not by a pixel's neighbourhood. `HueDesign`.
* "pairs" (design_pairs.py): a class is a conjunction of two texture primitives. `ClassDesign`.

Both designs can draw region classes from long-tailed (Zipf) frequencies, as ADE20K-Full's
classes are mostly rare: `class_freq_exponent` > 0.

Everything is drawn from numpy Generators seeded by (seed, split, index): reproducible byte for
byte, and independent of generation order. Writing the scenes to disk in the ADE20K and COCO
panoptic layouts is done by mfcore.data.synthetic_writer.
"""
from __future__ import annotations

import numpy as np

from mfcore.data.design_hue import HueDesign, hue_design, paint_hue
from mfcore.data.design_pairs import CORE_SCALE, ClassDesign, pairs_design, paint_pairs
from mfcore.data.scene_layout import choose, grid, inner_border, shape_mask, stuff_regions

DESIGNS = ("pairs", "hue")


def design_classes(num_classes: int, num_things: int, seed: int, num_primitives: int | None = None,
                   design: str = "pairs", class_freq_exponent: float = 0.0,
                   hue_noise: float = 40.0, hue_context: int = 0) -> ClassDesign | HueDesign:
    """The K classes of a scene design (one of DESIGNS); things are classes 0..num_things-1.

    "pairs": each class a distinct primitive pair, things a shape (num_primitives: the bank size).
    "hue": each class one of K evenly spaced hues, pixel hues drawn with std `hue_noise` degrees.
    class_freq_exponent > 0 draws region classes with Zipf frequencies 1 / rank^exponent.
    """
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 <= num_things <= num_classes:
        raise ValueError(f"num_things must be in [0, num_classes={num_classes}], got {num_things}")
    rng = np.random.default_rng([seed, 7])
    if design == "hue":
        if num_primitives is not None:
            raise ValueError(f"num_primitives applies to the 'pairs' design only, got {num_primitives} with 'hue'")
        return hue_design(num_classes, num_things, rng, class_freq_exponent, hue_noise, hue_context)
    return pairs_design(num_classes, num_things, rng, class_freq_exponent, num_primitives)


def render_scene(design: ClassDesign | HueDesign, rng: np.random.Generator, size: int = 64, max_regions: int = 5,
                 max_things: int = 3, void_prob: float = 0.1, noise_std: float = 8.0,
                 dominant_class: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Draw one scene.

    With `dominant_class` set (classification images) the largest stuff region gets that class.
    Returns:
        image: uint8 [S, S, 3]; segments: int64 [S, S] segment index (0 = void / "other", 1..n);
        segment_classes: class id of segments 1..n (a segment may end up with no pixel).
    """
    image, segments, segment_classes, _ = render_scene_evidence(design, rng, size, max_regions, max_things,
                                                                void_prob, noise_std, dominant_class)
    return image, segments, segment_classes


def render_scene_evidence(design: ClassDesign | HueDesign, rng: np.random.Generator, size: int = 64,
                          max_regions: int = 5, max_things: int = 3, void_prob: float = 0.1,
                          noise_std: float = 8.0, dominant_class: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray | None]:
    """`render_scene` plus what each pixel shows, for learning-free measurements (separability.py).

    The fourth value is, for "pairs", the primitive each pixel shows (int64 [S, S], -1 = none);
    None for "hue", whose evidence is the image's hue itself.
    """
    stuff, things = design.stuff_ids, design.thing_ids
    if isinstance(design, HueDesign) and design.context > 0 and dominant_class is None:
        # confusable context: every segment of the scene takes a class hue-near one anchor class, as similar
        # classes co-occur in real scenes (wall, building, house): knowing which classes an image holds no
        # longer tells its segments apart, only each segment's own statistic does
        near = set(design.neighbours(int(choose(rng, range(design.num_classes), None, design.class_freq))))
        stuff, things = [k for k in stuff if k in near], [k for k in things if k in near]
    n_regions = int(rng.integers(2 if dominant_class is None else 1, max_regions + 1))
    regions = stuff_regions(rng, size, n_regions)
    pool = [k for k in stuff if k != dominant_class]
    region_classes = list(choose(rng, pool, min(n_regions, len(pool)), design.class_freq, replace=False)) if pool else []
    protected = -1  # the dominant region is never turned into void
    if dominant_class is not None:
        protected = int(np.bincount(regions.ravel(), minlength=n_regions).argmax())
        region_classes.insert(protected, dominant_class)
    segments = np.zeros((size, size), dtype=np.int64)
    segment_classes: list[int] = []
    for r in range(n_regions):
        is_void = r >= len(region_classes) or (r != protected and rng.random() < void_prob)
        if not is_void:
            segment_classes.append(int(region_classes[r]))
            segments[regions == r] = len(segment_classes)
    # Things: shapes placed without overlap, with a dark one-pixel contour (objects have edges; the
    # contour says nothing of the class). "pairs": a core of primitive a and a rim of primitive b.
    core = np.zeros((size, size), dtype=bool)
    taken = np.zeros((size, size), dtype=bool)
    contour = np.zeros((size, size), dtype=bool)
    yy, xx = (c.astype(np.float32) for c in grid(size))
    n_things = int(rng.integers(0, max_things + 1)) if things else 0
    for _ in range(n_things):
        k = int(choose(rng, things, None, design.class_freq))
        shape = design.thing_shape(k, rng)
        for _attempt in range(20):
            radius = rng.uniform(0.1, 0.22) * size
            cy, cx = rng.uniform(radius, size - radius, size=2)
            u, v = (xx - cx) / radius, (yy - cy) / radius
            mask = shape_mask(shape, u, v)
            if not (mask & taken).any():
                break
        else:
            continue
        segment_classes.append(k)
        segments[mask] = len(segment_classes)
        taken |= mask
        contour |= inner_border(mask)
        core |= shape_mask(shape, u / CORE_SCALE, v / CORE_SCALE)
    if isinstance(design, HueDesign):
        image = paint_hue(design, rng, segments, segment_classes, noise_std)
        return image, segments, segment_classes, None
    image, primitive = paint_pairs(design, rng, segments, segment_classes, core & taken, contour, noise_std)
    return image, segments, segment_classes, primitive
