"""Scene layout shared by the synthetic designs: amorphous stuff regions, thing shapes, their contours, and
long-tailed class frequencies. What a class looks like is each design's (design_hue.py, design_pairs.py)."""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

SHAPES = ("disc", "square", "diamond", "triangle", "cross")


@functools.lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row / column coordinates [S, S] (cached: every scene of a run has the same size)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return yy, xx


def stuff_regions(rng: np.random.Generator, size: int, num_regions: int) -> np.ndarray:
    """Amorphous regions: Voronoi cells of random seeds on domain-warped coordinates. [H, W] int."""
    yy, xx = (c.astype(np.float32) for c in grid(size))
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


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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


def inner_border(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` [S, S] with a 4-neighbour outside it."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


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


def choose(rng: np.random.Generator, ids: list[int] | tuple[int, ...], count: int | None,
            class_freq: tuple[float, ...], replace: bool = True) -> Any:
    """rng.choice over class ids, weighted by class_freq (uniform when it is empty)."""
    if not class_freq:
        return rng.choice(ids) if count is None else rng.choice(ids, size=count, replace=replace)
    weights = np.array([class_freq[k] for k in ids])
    return rng.choice(ids, size=count, replace=replace, p=weights / weights.sum())
