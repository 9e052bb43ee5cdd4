"""Synthetic scenes in which classes differ only by *region-level* evidence.

Two scene designs (`DESIGNS`), chosen with `design_classes(..., design=...)`; see data/README.md:

* "hue": a class is one of K hues evenly spaced on the colour circle, and every pixel's hue is
  drawn far from it (normal noise, 40 degrees by default). A pixel's neighbourhood averages too
  few draws to tell adjacent hues apart once K is large; the mean over the whole segment does.
  Segment borders are drawn (a dark contour) and segments get a random saturation and
  brightness, so grouping is visible but says nothing of the class. `HueDesign`.
* "pairs" (below): a class is a conjunction of two texture primitives. `ClassDesign`.

Both designs can draw region classes from long-tailed (Zipf) frequencies, as ADE20K-Full's
classes are mostly rare: `class_freq_exponent` > 0.

The "pairs" generator:

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
from typing import Any, ClassVar

import numpy as np

PATTERNS = ("flat", "hstripes", "vstripes", "checker")
SHAPES = ("disc", "square", "diamond", "triangle", "cross")
CORE_SCALE = 0.55  # a thing's core is its own shape shrunk by this factor (same centre)
DESIGNS = ("pairs", "hue")


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


@dataclass(frozen=True)
class HueDesign:
    """The "hue" design: class k is the hue class_hue[k]; things first (ids 0..num_things-1).

    Hues are a permutation of K evenly spaced angles, so that thing and stuff classes interleave
    on the circle and every class has two neighbours 360/K degrees away. A thing instance takes a
    random shape: only the hue statistic names its class.
    """

    class_hue: tuple[float, ...]  # [K] degrees
    num_things: int
    class_names: tuple[str, ...]
    class_freq: tuple[float, ...] = ()  # [K] relative frequency of each class; () = uniform
    hue_noise: float = 40.0  # std (degrees) of each pixel's hue around its class hue
    context: int = 0  # > 0: a scene's classes all lie within `context` hue steps of one anchor class
    name: ClassVar[str] = "hue"

    @property
    def num_classes(self) -> int:
        return len(self.class_hue)

    @property
    def thing_ids(self) -> tuple[int, ...]:
        return tuple(range(self.num_things))

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        return tuple(range(self.num_things, self.num_classes))

    def thing_shape(self, k: int, rng: np.random.Generator) -> int:
        """A random shape for each instance: the shape must not say which class it is."""
        return int(rng.integers(len(SHAPES)))

    def to_json(self) -> dict[str, Any]:
        return {"design": self.name, "num_classes": self.num_classes, "class_names": list(self.class_names),
                "thing_ids": list(self.thing_ids), "class_freq": list(self.class_freq),
                "class_hue": list(self.class_hue), "hue_noise": self.hue_noise, "context": self.context}

    def neighbours(self, anchor: int) -> list[int]:
        """Classes whose hue is within `context` steps (360/K degrees each) of class `anchor`'s, anchor included."""
        step = 360.0 / self.num_classes
        gap = [abs((h - self.class_hue[anchor] + 180.0) % 360.0 - 180.0) / step for h in self.class_hue]
        return [k for k, g in enumerate(gap) if g <= self.context + 1e-6]


def zipf_frequencies(num_classes: int, num_things: int, exponent: float, rng: np.random.Generator) -> tuple[float, ...]:
    """Relative class frequencies 1 / rank^exponent, ranks shuffled within things and within stuff.

    Shuffled so that frequency says nothing of a class's appearance (its hue or primitives).
    exponent 0 -> () (uniform). Returns [K] floats, each group's largest being 1.
    """
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"class_freq_exponent must be a finite number >= 0 (0 = uniform), got {exponent}")
    if exponent == 0:
        return ()
    freq = np.empty(num_classes)
    for ids in (np.arange(num_things), np.arange(num_things, num_classes)):
        freq[ids] = (1.0 + rng.permutation(len(ids))) ** -exponent
    return tuple(float(f) for f in freq)


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
        if not 0 < hue_noise < 360:
            raise ValueError(f"hue_noise must be in (0, 360) degrees, got {hue_noise}")
        if hue_context < 0:
            raise ValueError(f"hue_context must be >= 0 hue steps (0 = classes drawn independently), got {hue_context}")
        hues = tuple(float(j * 360.0 / num_classes) for j in rng.permutation(num_classes))
        names = tuple(f"thing_{k:03d}" if k < num_things else f"stuff_{k:03d}" for k in range(num_classes))
        freq = zipf_frequencies(num_classes, num_things, class_freq_exponent, rng)
        return HueDesign(hues, num_things, names, freq, float(hue_noise), int(hue_context))
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


def _choose(rng: np.random.Generator, ids: list[int] | tuple[int, ...], count: int | None,
            class_freq: tuple[float, ...], replace: bool = True) -> Any:
    """rng.choice over class ids, weighted by class_freq (uniform when it is empty)."""
    if not class_freq:
        return rng.choice(ids) if count is None else rng.choice(ids, size=count, replace=replace)
    weights = np.array([class_freq[k] for k in ids])
    return rng.choice(ids, size=count, replace=replace, p=weights / weights.sum())


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
        near = set(design.neighbours(int(_choose(rng, range(design.num_classes), None, design.class_freq))))
        stuff, things = [k for k in stuff if k in near], [k for k in things if k in near]
    n_regions = int(rng.integers(2 if dominant_class is None else 1, max_regions + 1))
    regions = _stuff_regions(rng, size, n_regions)
    pool = [k for k in stuff if k != dominant_class]
    region_classes = list(_choose(rng, pool, min(n_regions, len(pool)), design.class_freq, replace=False)) if pool else []
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
    yy, xx = (c.astype(np.float32) for c in _grid(size))
    n_things = int(rng.integers(0, max_things + 1)) if things else 0
    for _ in range(n_things):
        k = int(_choose(rng, things, None, design.class_freq))
        shape = design.thing_shape(k, rng)
        for _attempt in range(20):
            radius = rng.uniform(0.1, 0.22) * size
            cy, cx = rng.uniform(radius, size - radius, size=2)
            u, v = (xx - cx) / radius, (yy - cy) / radius
            mask = _shape_mask(shape, u, v)
            if not (mask & taken).any():
                break
        else:
            continue
        segment_classes.append(k)
        segments[mask] = len(segment_classes)
        taken |= mask
        contour |= _inner_border(mask)
        core |= _shape_mask(shape, u / CORE_SCALE, v / CORE_SCALE)
    if isinstance(design, HueDesign):
        image = _paint_hue(design, rng, segments, segment_classes, noise_std)
        return image, segments, segment_classes, None
    image, primitive = _paint(design, rng, segments, segment_classes, core & taken, contour, noise_std)
    return image, segments, segment_classes, primitive


def _inner_border(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` [S, S] with a 4-neighbour outside it."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _paint(design: ClassDesign, rng: np.random.Generator, segments: np.ndarray, segment_classes: list[int],
           core: np.ndarray, contour: np.ndarray, noise_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour a "pairs" scene: primitive textures, void clutter, per-segment brightness, pixel noise.

    Returns the image (uint8 [S, S, 3]) and the primitive each pixel shows (int64 [S, S], -1 = void).
    """
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
    return np.clip(np.round(image), 0, 255).astype(np.uint8), primitive


def hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB: hue in degrees (any real), sat and val in 0..1 ([...] each) -> [..., 3] in 0..1."""
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = (n + hue / 60.0) % 6.0
        channels.append(val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(channels, axis=-1)


def rgb_hue(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue (degrees, 0..360) and chroma (max - min, 0..1) of an RGB image [..., 3] (uint8 or 0..255).

    The inverse of `hsv_to_rgb`'s hue, so class hues read back from the rendered bytes as drawn.
    Grey pixels (chroma 0) get hue 0; weigh hues by chroma to discount them.
    """
    rgb = image.astype(np.float64) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, chroma = rgb.max(-1), np.ptp(rgb, axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(top == r, ((g - b) / safe) % 6.0, np.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return np.where(chroma > 0, hue * 60.0, 0.0), chroma


def _paint_hue(design: HueDesign, rng: np.random.Generator, segments: np.ndarray, segment_classes: list[int],
               noise_std: float) -> np.ndarray:
    """Colour a "hue" scene: each pixel's hue ~ N(class hue, hue_noise); saturation and brightness
    drawn per segment (class-independent); a dark grey contour wherever the segment changes to the
    right or below (every border, one pixel wide); grey clutter for void; RGB noise. uint8 [S, S, 3]."""
    n = len(segment_classes)
    class_hue = np.array([0.0] + [design.class_hue[k] for k in segment_classes])
    sat = np.concatenate([[0.0], rng.uniform(0.45, 0.9, size=n)])
    val = np.concatenate([[0.0], rng.uniform(0.5, 0.95, size=n)])
    hue = class_hue[segments] + rng.normal(0.0, design.hue_noise, size=segments.shape)
    pixel_sat = np.clip(sat[segments] + rng.normal(0.0, 0.05, size=segments.shape), 0.0, 1.0)
    pixel_val = np.clip(val[segments] + rng.normal(0.0, 0.05, size=segments.shape), 0.0, 1.0)
    image = hsv_to_rgb(hue, pixel_sat, pixel_val).astype(np.float32) * 255.0
    image[segments == 0] = rng.uniform(60, 190)
    border = np.zeros(segments.shape, dtype=bool)
    border[:, :-1] |= segments[:, :-1] != segments[:, 1:]
    border[:-1, :] |= segments[:-1, :] != segments[1:, :]
    image[border] = 30.0
    image += rng.normal(0.0, noise_std, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
