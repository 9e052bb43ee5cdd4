"""How well can a class be read from a pixel's neighbourhood, and how well from its whole segment?

A learning-free measure of the mechanism a scene design is meant to exercise (data/README.md):
every pixel is given the class whose statistic is nearest to the statistic of (a) an s x s box
around it, or (b) its true segment (an oracle mask, as a perfect mask classifier would pool).
Per-pixel classification sees (a) at best, with s its receptive field; mask classification (b).

The statistic, per design:
* "hue": the circular mean of the pixels' HSV hue, weighted by chroma (so that the grey contours
  and void clutter barely count), read from the rendered bytes; the nearest class hue wins.
* "pairs": the histogram of the primitives the pixels show (the generator's own map, i.e. a
  perfect primitive detector); the class whose two primitives cover most of the box wins, ties
  to the lowest class id (a 1x1 box shows one primitive, which about sqrt(2K) classes share).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mfcore.data.design_hue import HueDesign, rgb_hue
from mfcore.data.design_pairs import ClassDesign
from mfcore.data.synthetic import design_classes, render_scene_evidence
from mfcore.metrics import SemSegEvaluator


def _features(design: ClassDesign | HueDesign, image: np.ndarray, primitive: np.ndarray | None) -> np.ndarray:
    """Per-pixel evidence [S, S, F]: chroma-weighted hue vectors (F = 2) or primitive one-hots (F = P)."""
    if isinstance(design, HueDesign):
        hue, chroma = rgb_hue(image)
        angle = np.deg2rad(hue)
        return np.stack([chroma * np.cos(angle), chroma * np.sin(angle)], axis=-1)
    onehot = np.zeros(primitive.shape + (design.num_primitives,))
    shown = primitive >= 0
    onehot[shown, primitive[shown]] = 1.0
    return onehot


def _templates(design: ClassDesign | HueDesign) -> np.ndarray:
    """[K, F] class statistics; a pixel's class is argmax over K of features @ templates.T."""
    if isinstance(design, HueDesign):
        angle = np.deg2rad(np.array(design.class_hue))
        return np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    templates = np.zeros((design.num_classes, design.num_primitives))
    for k, (a, b) in enumerate(design.class_primitives):
        templates[k, [a, b]] = 1.0
    return templates


def box_sums(features: np.ndarray, box: int) -> np.ndarray:
    """Sum of features [S, S, F] over the box x box window centred on each pixel (cut at the image
    border; the scores only compare directions / proportions, so sums need no normalising)."""
    if box < 1 or box % 2 == 0:
        raise ValueError(f"box must be an odd number >= 1, got {box}")
    r = box // 2
    padded = np.pad(features, ((r + 1, r), (r + 1, r), (0, 0)))
    table = padded.cumsum(0).cumsum(1)
    return table[box:, box:] - table[:-box, box:] - table[box:, :-box] + table[:-box, :-box]


def separability(design: str = "hue", num_classes: int = 32, num_scenes: int = 200,
                 boxes: Sequence[int] = (1, 9, 17), seed: int = 0, size: int = 64,
                 num_things: int | None = None, **design_options) -> dict:
    """Nearest-class-statistic accuracy over boxes and over true segments, on generated scenes.

    Scenes are the validation scenes `make_synthetic` would write with the same arguments
    (scene i from default_rng([seed, 1, i])); design_options go to `design_classes`
    (class_freq_exponent, hue_noise, num_primitives). Void pixels are not scored.
    "box_<s>_in_image" is the same box choosing only among the classes the image holds: what a per-pixel
    classifier with image-level context (PerPixelBaseline+'s class queries see the whole image) can reach.
    Returns {"design", "num_classes", "num_scenes", "box_<s>": {"pixel_acc", "mIoU"} per s,
    "box_<s>_in_image": ..., "region": {"pixel_acc", "mIoU"}}, values in percent (mIoU over classes present, as in
    mfcore.metrics).
    """
    things = round(0.4 * num_classes) if num_things is None else num_things
    classes = design_classes(num_classes, things, seed, design=design, **design_options)
    templates = _templates(classes)
    names = [f"box_{b}" for b in boxes] + [f"box_{b}_in_image" for b in boxes] + ["region"]
    evaluators = {name: SemSegEvaluator(num_classes, ignore_label=-1) for name in names}
    for i in range(num_scenes):
        image, segments, segment_classes, primitive = render_scene_evidence(classes, np.random.default_rng([seed, 1, i]),
                                                                            size)
        gt = np.array([-1] + segment_classes)[segments]
        features = _features(classes, image, primitive)
        present = np.full(num_classes, -np.inf)
        present[sorted(set(segment_classes))] = 0.0  # the classes this image holds, known to an image-level model
        for box in boxes:
            scores = box_sums(features, box) @ templates.T
            evaluators[f"box_{box}"].update(scores.argmax(-1), gt)
            evaluators[f"box_{box}_in_image"].update((scores + present).argmax(-1), gt)
        # region: one statistic per segment (index 0, void, is scored nowhere)
        flat = segments.ravel()
        sums = np.zeros((len(segment_classes) + 1, features.shape[-1]))
        np.add.at(sums, flat, features.reshape(-1, features.shape[-1]))
        evaluators["region"].update((sums @ templates.T).argmax(-1)[segments], gt)
    result: dict = {"design": design, "num_classes": num_classes, "num_scenes": num_scenes}
    for name, evaluator in evaluators.items():
        metrics = evaluator.compute()
        result[name] = {"pixel_acc": metrics["pixel_acc"], "mIoU": metrics["mIoU"]}
    return result
