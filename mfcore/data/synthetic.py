"""Synthetic scenes in which classes differ only by *region-level* evidence.

The generator is built to expose the paper's point cheaply (see data/README.md):

* A bank of P texture *primitives*, primitive = (hue, pattern); patterns are flat,
  horizontal stripes, vertical stripes and checker (all unchanged by a horizontal flip).
* A class is an unordered *pair* of primitives {a, b}. Stuff classes fill amorphous regions
  with a mosaic of square cells, each cell showing a or b at random; a thing class is a
  compact shape (disc, square, ...) with a core of primitive a and a rim of primitive b.
* P is the smallest bank with P(P-1)/2 >= K pairs, so each primitive is shared by about
  sqrt(2K) classes: any small neighbourhood (one cell) shows one primitive that many classes
  contain, and only the statistics over the whole region (both primitives, the shape) name the
  class. A per-pixel classifier fragments a region among the classes sharing the primitive it
  sees; a per-segment classifier pools the evidence of the whole mask.
* Grouping is made learnable but class-agnostic: each segment gets a random brightness offset.

Everything is drawn from numpy Generators seeded by (seed, split, index): reproducible byte for
byte, and independent of generation order. Writing the scenes to disk in the ADE20K and COCO
panoptic layouts is done by mfcore.data.synthetic_writer.
"""
from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PATTERNS = ("flat", "hstripes", "vstripes", "checker")
SHAPES = ("disc", "square", "diamond", "triangle", "cross")
CORE_SCALE = 0.55  # a thing's core is its own shape shrunk by this factor (same centre)


@dataclass(frozen=True)
class ClassDesign:
    """Which primitives make up each class. Class ids are contiguous 0..K-1; things come first."""

    primitive_hue: tuple[float, ...]  # [P] degrees
    primitive_pattern: tuple[int, ...]  # [P] index into PATTERNS
    class_primitives: tuple[tuple[int, int], ...]  # [K] (a, b): a = thing core, b = thing rim
    class_shapes: tuple[int, ...]  # [K] index into SHAPES, -1 for stuff
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_primitives)

    @property
    def num_primitives(self) -> int:
        return len(self.primitive_hue)

    @property
    def thing_ids(self) -> tuple[int, ...]:
        return tuple(k for k, s in enumerate(self.class_shapes) if s >= 0)

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        return tuple(k for k, s in enumerate(self.class_shapes) if s < 0)

    @functools.cached_property
    def primitive_rgb(self) -> np.ndarray:
        """[P, 3] float32 base colour of each primitive (HSV with S = 0.7, V = 0.9), 0..255."""
        rgb = [colorsys.hsv_to_rgb(h / 360.0, 0.7, 0.9) for h in self.primitive_hue]
        return np.array(rgb, dtype=np.float32) * 255.0

    def classes_with_primitive(self, primitive: int) -> list[int]:
        return [k for k, pair in enumerate(self.class_primitives) if primitive in pair]

    def to_json(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": list(self.class_names),
                "thing_ids": list(self.thing_ids), "num_primitives": self.num_primitives,
                "primitives": [{"hue": h, "pattern": PATTERNS[p]}
                               for h, p in zip(self.primitive_hue, self.primitive_pattern)],
                "class_primitives": [list(pair) for pair in self.class_primitives],
                "class_shapes": [SHAPES[s] if s >= 0 else None for s in self.class_shapes]}


def primitives_needed(num_classes: int) -> int:
    """Smallest P >= 3 with P(P-1)/2 >= K distinct pairs."""
    p = 3
    while p * (p - 1) // 2 < num_classes:
        p += 1
    return p


def balanced_pairs(num_primitives: int) -> list[tuple[int, int]]:
    """All P(P-1)/2 pairs ordered so that every prefix spreads the primitives evenly.

    Pairs come in rings (i, i+d mod P) for d = 1, 2, ...: each complete ring uses every
    primitive exactly twice (once when d = P/2), so after the first ring each primitive
    already belongs to at least two classes.
    """
    p = num_primitives
    pairs = []
    for d in range(1, p // 2 + 1):
        starts = range(p // 2) if 2 * d == p else range(p)
        pairs.extend((i, (i + d) % p) for i in starts)
    return pairs


def design_classes(num_classes: int, num_things: int, seed: int, num_primitives: int | None = None) -> ClassDesign:
    """Assign each of K classes a distinct primitive pair (and things a shape)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 <= num_things <= num_classes:
        raise ValueError(f"num_things must be in [0, num_classes={num_classes}], got {num_things}")
    p = num_primitives or primitives_needed(num_classes)
    if p * (p - 1) // 2 < num_classes:
        raise ValueError(f"{p} primitives give only {p * (p - 1) // 2} pairs, fewer than {num_classes} classes")
    # Hues as far apart as the bank allows (>= 3 of them, 120 degrees apart at most).
    n_hues = max(3, math.ceil(p / len(PATTERNS)))
    hues = tuple(float((i % n_hues) * 360.0 / n_hues) for i in range(p))
    patterns = tuple(i // n_hues for i in range(p))
    rng = np.random.default_rng([seed, 7])
    pairs = balanced_pairs(p)[:num_classes]
    order = rng.permutation(num_classes)  # so that class k and k+1 are not ring neighbours
    class_pairs = tuple(pairs[j] for j in order)
    shapes = tuple(k % len(SHAPES) if k < num_things else -1 for k in range(num_classes))
    names = tuple(f"thing_{k:03d}_{SHAPES[s]}" if s >= 0 else f"stuff_{k:03d}" for k, s in enumerate(shapes))
    return ClassDesign(hues, patterns, class_pairs, shapes, names)


# ----------------------------------------------------------------------------- scene geometry
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row / column coordinates [S, S] (cached: every scene of a run has the same size)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return yy, xx


def _stuff_regions(rng: np.random.Generator, size: int, num_regions: int) -> np.ndarray:
    """Amorphous regions: Voronoi cells of random seeds on domain-warped coordinates. [H, W] int."""
    yy, xx = (c.astype(np.float32) for c in _grid(size))
    warped = []
    for coord in (yy, xx):
        offset = np.zeros_like(coord)
        for _ in range(3):  # a few low-frequency waves bend the straight Voronoi borders
            fy, fx = rng.uniform(-2.0, 2.0, size=2) / size
            offset += rng.uniform(0.04, 0.1) * size * np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
        warped.append(coord + offset)
    seeds = rng.uniform(0, size, size=(num_regions, 2))
    dist = (warped[0][None] - seeds[:, 0, None, None]) ** 2 + (warped[1][None] - seeds[:, 1, None, None]) ** 2
    return dist.argmin(axis=0)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape in normalised coordinates (u right, v down, radius 1); star-shaped about 0."""
    name = SHAPES[shape]
    if name == "disc":
        return u**2 + v**2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.15
    if name == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * 0.5)
    return ((np.abs(u) <= 0.35) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.35) & (np.abs(u) <= 1.0))


def render_scene(design: ClassDesign, rng: np.random.Generator, size: int = 64, max_regions: int = 5,
                 max_things: int = 3, void_prob: float = 0.1, noise_std: float = 8.0,
                 dominant_class: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Draw one scene.

    With `dominant_class` set (classification images) the largest stuff region gets that class.
    Returns:
        image: uint8 [S, S, 3]; segments: int64 [S, S] segment index (0 = void / "other", 1..n);
        segment_classes: class id of segments 1..n (a segment may end up with no pixel).
    """
    stuff, things = design.stuff_ids, design.thing_ids
    n_regions = int(rng.integers(2 if dominant_class is None else 1, max_regions + 1))
    regions = _stuff_regions(rng, size, n_regions)
    pool = [k for k in stuff if k != dominant_class]
    region_classes = list(rng.choice(pool, size=min(n_regions, len(pool)), replace=False)) if pool else []
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
    # Things: shapes with a core of primitive a and a rim of primitive b, placed without overlap,
    # with a dark one-pixel contour (objects have edges; the contour says nothing of the class).
    core = np.zeros((size, size), dtype=bool)
    taken = np.zeros((size, size), dtype=bool)
    contour = np.zeros((size, size), dtype=bool)
    yy, xx = (c.astype(np.float32) for c in _grid(size))
    n_things = int(rng.integers(0, max_things + 1)) if things else 0
    for _ in range(n_things):
        k = int(rng.choice(things))
        for _attempt in range(20):
            radius = rng.uniform(0.1, 0.22) * size
            cy, cx = rng.uniform(radius, size - radius, size=2)
            u, v = (xx - cx) / radius, (yy - cy) / radius
            mask = _shape_mask(design.class_shapes[k], u, v)
            if not (mask & taken).any():
                break
        else:
            continue
        segment_classes.append(k)
        segments[mask] = len(segment_classes)
        taken |= mask
        contour |= _inner_border(mask)
        core |= _shape_mask(design.class_shapes[k], u / CORE_SCALE, v / CORE_SCALE)
    image = _paint(design, rng, segments, segment_classes, core & taken, contour, noise_std)
    return image, segments, segment_classes


def _inner_border(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` [S, S] with a 4-neighbour outside it."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _paint(design: ClassDesign, rng: np.random.Generator, segments: np.ndarray, segment_classes: list[int],
           core: np.ndarray, contour: np.ndarray, noise_std: float) -> np.ndarray:
    """Colour a scene: primitive textures, void clutter, per-segment brightness, pixel noise."""
    size = segments.shape[0]
    cell = max(4, round(size / 7))  # mosaic cell: one primitive per cell
    period = max(4, round(size / 10))  # stripe / checker period
    yy, xx = _grid(size)
    oy, ox = rng.integers(0, cell, size=2)
    n_cells = size // cell + 2
    cell_bits = rng.integers(0, 2, size=(n_cells, n_cells))[(yy + oy) // cell, (xx + ox) // cell]
    # Which of its class's two primitives each pixel shows: stuff -> the cell's coin, thing ->
    # core (a) or rim (b).
    seg_class = np.array([-1] + segment_classes, dtype=np.int64)[segments]
    is_thing = np.array([False] + [design.class_shapes[c] >= 0 for c in segment_classes])[segments]
    bit = np.where(is_thing, (~core).astype(np.int64), cell_bits)
    pairs = np.array(design.class_primitives, dtype=np.int64)
    primitive = np.where(seg_class >= 0, pairs[np.maximum(seg_class, 0), bit], -1)
    # Pattern modulation maps, one per pattern: 1 = bright phase, 0 = dark phase.
    py, px = rng.integers(0, period, size=2)
    h_on, v_on = ((yy + py) % period) < period / 2, ((xx + px) % period) < period / 2
    modulation = np.stack([np.ones_like(h_on), h_on, v_on, h_on ^ v_on]).astype(np.float32)
    prim = np.maximum(primitive, 0)
    pattern = np.array(design.primitive_pattern)[prim]
    shade = 0.45 + 0.55 * modulation[pattern, yy, xx]
    image = design.primitive_rgb[prim] * shade[..., None]
    # Void ("other") pixels: grey clutter with no primitive.
    image[primitive < 0] = rng.uniform(60, 190)
    image[contour] *= 0.35
    # Per-segment brightness offset: a class-agnostic cue that pixels belong together.
    offsets = np.concatenate([[0.0], rng.uniform(-20, 20, size=len(segment_classes))]).astype(np.float32)
    image = image + offsets[segments][..., None] + rng.normal(0.0, noise_std, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
