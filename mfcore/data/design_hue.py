"""The "hue" scene design: a class is one of K hues evenly spaced on the colour circle, and every pixel's hue
is drawn far from it (normal noise, 40 degrees by default). A pixel's neighbourhood averages too few draws to
tell adjacent hues apart once K is large; the mean over the whole segment does. Segment borders are drawn (a
dark contour) and segments get a random saturation and brightness, so grouping is visible but says nothing of
the class. See data/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mfcore.data.scene_layout import SHAPES, zipf_frequencies


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


def hue_design(num_classes: int, num_things: int, rng: np.random.Generator, class_freq_exponent: float,
               hue_noise: float, hue_context: int) -> HueDesign:
    """K evenly spaced hues in a random order (things first), pixel hues drawn with std `hue_noise` degrees."""
    if not 0 < hue_noise < 360:
        raise ValueError(f"hue_noise must be in (0, 360) degrees, got {hue_noise}")
    if hue_context < 0:
        raise ValueError(f"hue_context must be >= 0 hue steps (0 = classes drawn independently), got {hue_context}")
    hues = tuple(float(j * 360.0 / num_classes) for j in rng.permutation(num_classes))
    names = tuple(f"thing_{k:03d}" if k < num_things else f"stuff_{k:03d}" for k in range(num_classes))
    freq = zipf_frequencies(num_classes, num_things, class_freq_exponent, rng)
    return HueDesign(hues, num_things, names, freq, float(hue_noise), int(hue_context))


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


def paint_hue(design: HueDesign, rng: np.random.Generator, segments: np.ndarray, segment_classes: list[int],
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
