"""Write synthetic scenes (mfcore.data.synthetic) to disk in the real datasets' layouts.

The same readers that load ADE20K and COCO panoptic load the result, so every code path used
on real data is exercised on synthetic data:

    out_dir/ADEChallengeData2016/images/{training,validation}/syn_<split>_<i>.png       RGB
    out_dir/ADEChallengeData2016/annotations/{training,validation}/syn_<split>_<i>.png  0 = other, 1..K
    out_dir/ADEChallengeData2016/synthetic_meta.json                                   K, names, things, design
    out_dir/coco/{train,val}2017/syn_<split>_<i>.png                                   RGB
    out_dir/coco/annotations/panoptic_{train,val}2017.json                             COCO panoptic JSON
    out_dir/coco/annotations/panoptic_{train,val}2017/syn_<split>_<i>.png              id = R + 256 G + 256^2 B

Images are PNG, not JPEG: JPEG artefacts would smear the 3-pixel stripes of 64x64 scenes.
Label maps are 8-bit PNG, or 16-bit when K > 255 (as ADE20K-Full). Scene i of a split is drawn
from numpy.random.default_rng([seed, split, i]), so the output is byte-identical across runs and
does not depend on how many worker processes rendered it.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfcore.data.formats import ids_to_rgb, write_image, write_json, write_label
from mfcore.data.synthetic import (
    DESIGNS,
    ClassDesign,
    HueDesign,
    design_classes,
    render_scene,
)

_SPLITS = {"train": ("training", "train2017", 0), "val": ("validation", "val2017", 1)}
_CHUNK = 200  # scenes per worker task


@dataclass(frozen=True)
class _Job:
    """Scenes [start, stop) of one split: everything a worker process needs, picklable."""

    design: ClassDesign | HueDesign
    out: Path
    split: str
    start: int
    stop: int
    image_size: int
    seed: int
    kind: str
    max_regions: int
    max_things: int


def _panoptic_annotation(rng: np.random.Generator, segments: np.ndarray, classes: list[int],
                         stem: str) -> tuple[dict, np.ndarray]:
    """COCO panoptic entry with random unique 24-bit segment ids, and the RGB-encoded PNG [S, S, 3]."""
    ids = np.zeros(len(classes) + 1, dtype=np.int64)  # index 0: void
    while True:  # draw until unique (never 0, which is VOID)
        ids[1:] = rng.integers(1, 256**3, size=len(classes))
        if len(set(ids[1:].tolist())) == len(classes):
            break
    infos = []
    for j, k in enumerate(classes, start=1):
        ys, xs = np.nonzero(segments == j)
        if len(ys):  # a stuff region entirely hidden by things leaves no segment
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            infos.append({"id": int(ids[j]), "category_id": k + 1, "iscrowd": 0, "area": len(ys), "bbox": bbox})
    return {"image_id": stem, "file_name": f"{stem}.png", "segments_info": infos}, ids_to_rgb(ids[segments])


def _write_scenes(job: _Job) -> list[tuple[dict, dict]]:
    """Render and write scenes; return their (COCO image entry, panoptic annotation) pairs."""
    ade, coco = job.out / "ADEChallengeData2016", job.out / "coco"
    ade_split, coco_split, code = _SPLITS[job.split]
    entries = []
    for i in range(job.start, job.stop):
        rng = np.random.default_rng([job.seed, code, i])
        image, segments, classes = render_scene(job.design, rng, job.image_size, job.max_regions, job.max_things)
        stem = f"syn_{job.split}_{i:06d}"
        if job.kind in ("semantic", "both"):
            write_image(ade / "images" / ade_split / f"{stem}.png", image)
            semantic = np.array([0] + [c + 1 for c in classes], dtype=np.int64)[segments]
            write_label(ade / "annotations" / ade_split / f"{stem}.png", semantic)
        if job.kind in ("panoptic", "both"):
            if job.kind == "both":  # the same scene: copy the encoded bytes instead of re-encoding
                shutil.copyfile(ade / "images" / ade_split / f"{stem}.png", coco / coco_split / f"{stem}.png")
            else:
                write_image(coco / coco_split / f"{stem}.png", image)
            annotation, rgb = _panoptic_annotation(rng, segments, classes, stem)
            write_image(coco / "annotations" / f"panoptic_{coco_split}" / f"{stem}.png", rgb)
            image_entry = {"id": stem, "file_name": f"{stem}.png", "height": job.image_size, "width": job.image_size}
            entries.append((image_entry, annotation))
    return entries


def _run(jobs: list[_Job], workers: int | None) -> list[list[tuple[dict, dict]]]:
    """Run jobs in order, in worker processes when there is more than one chunk."""
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [_write_scenes(job) for job in jobs]
    # fork: workers inherit the imported modules and only run numpy / PIL code.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_write_scenes, jobs))


def make_synthetic(out_dir: str | Path, num_classes: int = 20, num_train: int = 1000, num_val: int = 200,
                   image_size: int = 64, seed: int = 0, kind: str = "both", num_things: int | None = None,
                   num_primitives: int | None = None, max_regions: int = 5, max_things: int = 3,
                   workers: int | None = None, design: str = "pairs", class_freq_exponent: float = 0.0,
                   hue_noise: float = 40.0, hue_context: int = 0) -> ClassDesign | HueDesign:
    """Write num_train + num_val scenes of `num_classes` classes under out_dir (layout above).

    kind: "semantic" (ADE20K layout), "panoptic" (COCO panoptic layout) or "both" (same scenes).
    num_things defaults to 40% of the classes; num_primitives ("pairs" only) to the fewest giving K
    pairs; workers (processes) to the number of CPUs. design, class_freq_exponent, hue_noise, hue_context: see
    mfcore.data.synthetic.design_classes; synthetic_meta.json records them ("design", "class_freq").
    """
    if kind not in ("semantic", "panoptic", "both"):
        raise ValueError(f"kind must be 'semantic', 'panoptic' or 'both', got {kind!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    for name, value, low in (("num_classes", num_classes, 1), ("num_train", num_train, 0), ("num_val", num_val, 0)):
        if value < low:
            raise ValueError(f"{name}={value}: expected an integer >= {low}")
    if num_train + num_val < 1:
        raise ValueError("num_train + num_val = 0: expected at least one scene")
    out = Path(out_dir)
    things = round(0.4 * num_classes) if num_things is None else num_things
    classes = design_classes(num_classes, things, seed, num_primitives, design, class_freq_exponent, hue_noise,
                             hue_context)
    ade, coco = out / "ADEChallengeData2016", out / "coco"
    for split, count in (("train", num_train), ("val", num_val)):
        ade_split, coco_split, _ = _SPLITS[split]
        folders = {"semantic": [ade / "images" / ade_split, ade / "annotations" / ade_split],
                   "panoptic": [coco / coco_split, coco / "annotations" / f"panoptic_{coco_split}"]}
        for part in ("semantic", "panoptic"):
            if kind in (part, "both"):
                for folder in folders[part]:
                    folder.mkdir(parents=True, exist_ok=True)
        jobs = [_Job(classes, out, split, s, min(s + _CHUNK, count), image_size, seed, kind, max_regions, max_things)
                for s in range(0, count, _CHUNK)]
        entries = [e for chunk in _run(jobs, workers) for e in chunk]
        if kind in ("panoptic", "both"):
            categories = [{"id": k + 1, "name": classes.class_names[k], "isthing": int(k in classes.thing_ids),
                           "supercategory": "thing" if k in classes.thing_ids else "stuff"}
                          for k in range(num_classes)]
            write_json(coco / "annotations" / f"panoptic_{coco_split}.json",
                       {"images": [e[0] for e in entries], "annotations": [e[1] for e in entries],
                        "categories": categories})
    if kind in ("semantic", "both"):
        meta = {"name": "synthetic", "seed": seed, "image_size": image_size, **classes.to_json()}
        write_json(ade / "synthetic_meta.json", meta)
    return classes


def ensure_synthetic(root: str | Path, **options) -> Path:
    """The synthetic scenes `make_synthetic(root, **options)` writes, generated once (`generate_once`): the
    default set of `mfcore train` and the notebooks' per-profile sets."""
    return generate_once(root, lambda out: make_synthetic(out, **options),
                         Path("ADEChallengeData2016") / "synthetic_meta.json")


def generate_once(root: str | Path, write: Callable[[Path], Any], written_last: str | Path) -> Path:
    """The one cache of generated data: `write(folder)` fills a temporary folder beside `root` that is
    renamed into place when complete, so a reader (another run, a notebook kernel, a DDP process) sees no
    data or all of it, never half; two processes generating the same data at once each write their own
    copy, and the one renamed second is dropped (the copies are identical: generation is seeded).

    A folder written in place (`mfcore make-synthetic`, or an older mfcore) counts as complete when it
    holds `written_last`, the file its writer writes last; one without it may be half-written and is
    regenerated.
    """
    root = Path(root)
    if (root / "DONE").is_file() or (root / written_last).is_file():
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of this process id
    root.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    (tmp / "DONE").write_text("complete\n")
    if root.is_dir():  # half-written in place by an older, non-atomic writer
        stale = root.with_name(f".{root.name}.stale-{os.getpid()}")
        try:
            os.rename(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # another process moved it first
            pass
    try:
        os.rename(tmp, root)
    except OSError:  # another process renamed its identical copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_classification_set(out_dir: str | Path, num_classes: int, num_train: int = 1000, num_val: int = 200,
                            image_size: int = 64, seed: int = 0, num_primitives: int | None = None,
                            design: str = "pairs", hue_noise: float = 40.0) -> ClassDesign | HueDesign:
    """Image-level pretraining data: each image is dominated by one texture class (its label).

    Written in torchvision ImageFolder layout: out_dir/{train,val}/<class_name>/<index>.png, plus
    out_dir/classification_meta.json. Classes are primitive pairs drawn from the same kind of
    bank as the scenes (stuff only: no shapes). With the scenes' num_primitives and
    num_classes = P(P-1)/2 the backbone learns every pair, the way ImageNet pretraining knows
    much of ADE20K's vocabulary but none of its masks. With design="hue" the classes are K evenly
    spaced hues: the scenes' hues when K is theirs.
    """
    classes = design_classes(num_classes, 0, seed + 1, num_primitives, design, hue_noise=hue_noise)
    out = Path(out_dir)
    for split, count in (("train", num_train), ("val", num_val)):
        code = _SPLITS[split][2]
        for i in range(count):
            rng = np.random.default_rng([seed, 100 + code, i])
            label = int(rng.integers(num_classes))
            image, _, _ = render_scene(classes, rng, image_size, max_regions=3, max_things=0, dominant_class=label)
            write_image(out / split / classes.class_names[label] / f"{i:06d}.png", image)
    write_json(out / "classification_meta.json", {"seed": seed, "image_size": image_size, **classes.to_json()})
    return classes


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m mfcore make-synthetic`."""
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=("semantic", "panoptic", "both"), default="both")
    parser.add_argument("--num-things", type=int, default=None, help="default: 40%% of the classes")
    parser.add_argument("--num-primitives", type=int, default=None, help="'pairs' only; default: fewest giving K pairs")
    parser.add_argument("--design", choices=DESIGNS, default="pairs",
                        help="'pairs': a class is a pair of texture primitives; 'hue': a noisy hue statistic")
    parser.add_argument("--class-freq-exponent", type=float, default=0.0,
                        help="Zipf exponent of the class frequencies (0 = uniform)")
    parser.add_argument("--hue-noise", type=float, default=40.0, help="'hue' only: per-pixel hue std, degrees")
    parser.add_argument("--hue-context", type=int, default=0,
                        help="'hue' only: a scene's classes lie within this many hue steps of one anchor (0 = off)")
    parser.add_argument("--workers", type=int, default=None, help="processes; default: all CPUs")
    parser.add_argument("--classification-per-class", type=int, default=0, metavar="N",
                        help="also write about N training images per class of the classification set "
                             "(every primitive pair for 'pairs', the K hues for 'hue') to out_dir/classification")


def main(args: argparse.Namespace) -> None:
    design = make_synthetic(args.out_dir, args.num_classes, args.num_train, args.num_val, args.image_size,
                            args.seed, args.kind, args.num_things, args.num_primitives, workers=args.workers,
                            design=args.design, class_freq_exponent=args.class_freq_exponent,
                            hue_noise=args.hue_noise, hue_context=args.hue_context)
    bank = f", {design.num_primitives} primitives" if isinstance(design, ClassDesign) else ""
    print(f"wrote {args.num_train} + {args.num_val} '{design.name}' scenes of {design.num_classes} classes "
          f"({len(design.thing_ids)} things{bank}) to {args.out_dir}")
    if args.classification_per_class > 0:
        p = design.num_primitives if isinstance(design, ClassDesign) else None
        count = p * (p - 1) // 2 if p else design.num_classes
        n = args.classification_per_class
        make_classification_set(args.out_dir / "classification", count, n * count, max(1, n // 5) * count,
                                args.image_size, args.seed, p, design.name, args.hue_noise)
        print(f"wrote a {count}-class classification set to {args.out_dir / 'classification'}")
