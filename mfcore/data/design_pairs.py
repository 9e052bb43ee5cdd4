"""The "pairs" scene design: a class is a conjunction of two texture primitives (the honest boundary of the
embedded benchmark: where a class is a conjunction, a class-agnostic query names it slowly). See data/README.md.

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
"""
from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mfcore.data.scene_layout import SHAPES, grid, zipf_frequencies

PATTERNS = ("flat", "hstripes", "vstripes", "checker")
CORE_SCALE = 0.55  # a thing's core is its own shape shrunk by this factor (same centre)


@dataclass(frozen=True)
class ClassDesign:
    """Which primitives make up each class. Class ids are contiguous 0..K-1; things come first."""

    primitive_hue: tuple[float, ...]  # [P] degrees
    primitive_pattern: tuple[int, ...]  # [P] index into PATTERNS
    class_primitives: tuple[tuple[int, int], ...]  # [K] (a, b): a = thing core, b = thing rim
    class_shapes: tuple[int, ...]  # [K] index into SHAPES, -1 for stuff
    class_names: tuple[str, ...]
    class_freq: tuple[float, ...] = ()  # [K] relative frequency of each class; () = uniform
    name: ClassVar[str] = "pairs"

    @property
    def num_classes(self) -> int:
        return len(self.class_primitives)

    def thing_shape(self, k: int, rng: np.random.Generator) -> int:
        """The shape of an instance of thing class k: the class's own shape (part of its identity)."""
        return self.class_shapes[k]

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
        return {"design": self.name, "num_classes": self.num_classes, "class_names": list(self.class_names),
                "thing_ids": list(self.thing_ids), "class_freq": list(self.class_freq),
                "num_primitives": self.num_primitives,
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


def pairs_design(num_classes: int, num_things: int, rng: np.random.Generator, class_freq_exponent: float,
                 num_primitives: int | None = None) -> ClassDesign:
    """Each class a distinct primitive pair, things a shape (num_primitives: the bank size, default the smallest)."""
    p = num_primitives or primitives_needed(num_classes)
    if p * (p - 1) // 2 < num_classes:
        raise ValueError(f"{p} primitives give only {p * (p - 1) // 2} pairs, fewer than {num_classes} classes")
    # Hues as far apart as the bank allows (>= 3 of them, 120 degrees apart at most).
    n_hues = max(3, math.ceil(p / len(PATTERNS)))
    hues = tuple(float((i % n_hues) * 360.0 / n_hues) for i in range(p))
    patterns = tuple(i // n_hues for i in range(p))
    pairs = balanced_pairs(p)[:num_classes]
    order = rng.permutation(num_classes)  # so that class k and k+1 are not ring neighbours
    class_pairs = tuple(pairs[j] for j in order)
    shapes = tuple(k % len(SHAPES) if k < num_things else -1 for k in range(num_classes))
    names = tuple(f"thing_{k:03d}_{SHAPES[s]}" if s >= 0 else f"stuff_{k:03d}" for k, s in enumerate(shapes))
    freq = zipf_frequencies(num_classes, num_things, class_freq_exponent, rng)
    return ClassDesign(hues, patterns, class_pairs, shapes, names, freq)


def paint_pairs(design: ClassDesign, rng: np.random.Generator, segments: np.ndarray, segment_classes: list[int],
           core: np.ndarray, contour: np.ndarray, noise_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour a "pairs" scene: primitive textures, void clutter, per-segment brightness, pixel noise.

    Returns the image (uint8 [S, S, 3]) and the primitive each pixel shows (int64 [S, S], -1 = void).
    """
    size = segments.shape[0]
    cell = max(4, round(size / 7))  # mosaic cell: one primitive per cell
    period = max(4, round(size / 10))  # stripe / checker period
    yy, xx = grid(size)
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
    return np.clip(np.round(image), 0, 255).astype(np.uint8), primitive
