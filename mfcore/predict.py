"""Predictions on your own images: `python -m mfcore predict IMAGE|FOLDER... --checkpoint CKPT`.

Each image is decoded (`mfcore.data.formats.read_image`), resized to the checkpoint's test short side
(`test_time.resize_shortest_edge`), padded and run through the model, and the outputs are resized back
to the image's own size (`test_time.pad_images` / `postprocess_masks`, through the evaluation helpers), so a
prediction is made exactly as `mfcore evaluate` makes it. Per image, in `--out`:

* semantic: `<name>_semantic.png`, the label map (contiguous class ids, 8-bit, 16-bit past 255 classes);
* panoptic: `<name>_panoptic.png`, segment ids in COCO's RGB encoding (id = R + 256 G + 256^2 B, 0 = VOID),
  and one `panoptic.json` for the run in COCO's panoptic layout (`annotations` with `segments_info`,
  `categories`; `category_id` is the contiguous class index);
* instance: `<name>_instances.png`, instance ids (0 = none; where masks overlap, the higher score wins)
  and `<name>_instances.json` (id, category_id, name, score, area, bbox [x, y, w, h]);
* every task: `<name>_overlay.png`, the image blended with the class colours (`companion.viz.colorize`)
  with a legend of the classes present to its right.

Class names and thing classes come from the checkpoint (runs trained by mfcore store them), else from the
catalog of the dataset it was trained on, else "class <i>" with every class treated as stuff.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfcore.data.formats import IMAGE_EXTENSIONS, ids_to_rgb, read_image, write_image, write_label
from mfcore.files import write_json
from mfcore.inference import instance_inference, panoptic_inference
from mfcore.test_time import predict_semantic, resize_shortest_edge

TASKS = ("semantic", "panoptic", "instance")
IGNORE = 255


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by `inputs`: files as given, folders' images (by suffix, sorted, not recursive).
    A missing path is a FileNotFoundError; no image at all, or two images of one name, a ValueError."""
    images: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise ValueError(f"two images are named {image.stem!r} ({seen[image.stem]} and {image}): their "
                             f"outputs would overwrite each other; predict them into different --out folders")
        seen[image.stem] = image
    return images


def class_info(ckpt: dict, num_classes: int) -> tuple[list[str], list[int]]:
    """(class names, thing class ids) of a checkpoint: stored by training, else the dataset's catalog, else
    generic names with no thing classes."""
    stored = ckpt.get("classes")
    if isinstance(stored, dict) and len(stored.get("names", ())) == num_classes:
        return [str(n) for n in stored["names"]], [int(t) for t in stored.get("thing_ids", ())]
    from mfcore.data import catalog

    known = {"ade20k": (catalog.ADE20K_150_CLASSES, ()),
             "coco-stuff": (catalog.COCO_STUFF_171_CLASSES, catalog.COCO_STUFF_171_THING_IDS),
             "cityscapes": (catalog.CITYSCAPES_19_CLASSES, catalog.CITYSCAPES_19_THING_IDS),
             "mapillary": (catalog.MAPILLARY_VISTAS_65_CLASSES, ())}
    try:
        dataset = catalog.dataset_name(ckpt["config"]["train"]["dataset"])
    except (KeyError, TypeError, ValueError):
        dataset = None
    names, things = known.get(dataset, ((), ()))
    if len(names) == num_classes:
        return list(names), list(things)
    return [f"class {i}" for i in range(num_classes)], []


def legend_overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str], alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB: `image` [H, W, 3] blended with the class colours of `labels` [H, W] (IGNORE left as is),
    and to its right a legend (colour swatch + name) of the classes present, largest area first."""
    from PIL import Image, ImageDraw, ImageFont

    from mfcore.companion.viz import overlay, palette

    blended = overlay(image, labels, len(names), alpha=alpha, ignore=IGNORE)
    present, counts = np.unique(labels[labels != IGNORE], return_counts=True)
    order = [int(c) for c in present[np.argsort(-counts, kind="stable")]]
    colours = palette(len(names))
    font = ImageFont.load_default()
    row, pad = 14, 4
    entries = [f"{c}: {names[c]}" for c in order] or ["(no class)"]
    text_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in entries)
    width = pad * 3 + 10 + text_w
    height, w = image.shape[0], image.shape[1]
    canvas = Image.new("RGB", (w + width, max(height, pad * 2 + row * len(entries))), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(entries):
        y = pad + i * row
        if order:
            draw.rectangle([w + pad, y + 1, w + pad + 10, y + 11], fill=tuple(int(v) for v in colours[order[i]]),
                           outline=(0, 0, 0))
        draw.text((w + pad * 2 + 10, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@torch.inference_mode()
def predict_image(model: torch.nn.Module, image: torch.Tensor, task: str, train_cfg: Any,
                  thing_ids: Sequence[int]) -> dict:
    """One image [3, H, W] (float, 0..255, on the model's device) at the checkpoint's test size.
    Returns {"labels": [H, W] class map (IGNORE = none)} plus, for panoptic, {"segmentation", "segments"},
    for instance, {"instances"} (masks, labels, scores), all on the CPU."""
    from mfcore.training.evaluate import mask_labels, mask_predictions

    size = (int(image.shape[-2]), int(image.shape[-1]))
    resized = resize_shortest_edge(image, train_cfg.test_short_side, train_cfg.max_size)
    if task == "semantic":
        if model.cfg.arch == "maskformer":
            labels = mask_labels(model, resized, size)
        else:
            labels = predict_semantic(model, resized, size).argmax(0)
        return {"labels": labels.cpu().numpy().astype(np.int64)}
    logits, masks = mask_predictions(model, resized, size)
    if task == "panoptic":
        seg, segments = panoptic_inference(logits, masks, thing_ids, train_cfg.object_mask_threshold,
                                           train_cfg.overlap_threshold)
        seg = seg.cpu().numpy().astype(np.int64)
        lut = np.full(len(segments) + 1, IGNORE, dtype=np.int64)
        for s in segments:
            lut[s["id"]] = s["category_id"]
        return {"labels": lut[seg], "segmentation": seg, "segments": segments}
    out = {k: v.cpu() for k, v in instance_inference(logits, masks).items()}
    labels = np.full(size, IGNORE, dtype=np.int64)
    for j in torch.argsort(out["scores"]).tolist():  # ascending: the highest score is painted last
        labels[out["masks"][j].numpy()] = int(out["labels"][j])
    return {"labels": labels, "instances": out}


def predict(inputs: Sequence[str | Path], checkpoint: str | Path, task: str = "semantic",
            out_dir: str | Path = "predictions", device: str = "auto",
            log: Callable[[str], None] | None = print) -> dict:
    """Predict every image of `inputs` (files and folders) with an mfcore checkpoint; see the module docstring
    for the files written. `log` gets one line per image (None: silent).
    Returns {"images": [{"image", "outputs": [paths], "classes": [ids present]}], "out": folder}."""
    from mfcore.training.checkpoint import configs_from_checkpoint, load_trained_model
    from mfcore.training.runtime import resolve_device, set_tf32

    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    images = find_images(inputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    device_ = resolve_device(device)
    model, ckpt = load_trained_model(checkpoint)
    preset, model_cfg, _, train_cfg = configs_from_checkpoint(ckpt)
    set_tf32(train_cfg.tf32, device_)
    if task != "semantic" and model_cfg.arch != "maskformer":
        raise ValueError(f"--task {task} needs a mask-classification model; {checkpoint} is a {model_cfg.arch} "
                         f"model ({preset}): use --task semantic")
    model.to(device_)
    names, thing_ids = class_info(ckpt, model_cfg.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    annotations, results = [], []
    for index, path in enumerate(images, 1):
        start = time.perf_counter()
        rgb = read_image(path)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().to(device_)
        pred = predict_image(model, image, task, train_cfg, thing_ids)
        written = []
        if task == "semantic":
            written.append(out / f"{path.stem}_semantic.png")
            write_label(written[-1], pred["labels"])
        elif task == "panoptic":
            written.append(out / f"{path.stem}_panoptic.png")
            write_image(written[-1], ids_to_rgb(pred["segmentation"]))
            annotations.append({"image_id": path.stem, "file_name": written[-1].name, "segments_info": [
                {"id": s["id"], "category_id": s["category_id"], "name": names[s["category_id"]],
                 "isthing": int(s["isthing"]), "score": round(s["score"], 6),
                 "area": int((pred["segmentation"] == s["id"]).sum()), "bbox": _bbox(pred["segmentation"] == s["id"])}
                for s in pred["segments"] if (pred["segmentation"] == s["id"]).any()]})
        else:
            inst = pred["instances"]
            ids = np.zeros(pred["labels"].shape, dtype=np.int64)
            order = torch.argsort(inst["scores"], descending=True).tolist()
            for rank, j in enumerate(reversed(order)):  # instance ids by descending score; the best painted last
                ids[inst["masks"][j].numpy()] = len(order) - rank
            written.append(out / f"{path.stem}_instances.png")
            write_label(written[-1], ids)
            records = [{"id": i + 1, "category_id": int(inst["labels"][j]), "name": names[int(inst["labels"][j])],
                        "score": round(float(inst["scores"][j]), 6), "area": int(inst["masks"][j].sum()),
                        "bbox": _bbox(inst["masks"][j].numpy())} for i, j in enumerate(order)]
            written.append(out / f"{path.stem}_instances.json")
            write_json(written[-1], {"image": str(path), "instances": records})
        written.append(out / f"{path.stem}_overlay.png")
        write_image(written[-1], legend_overlay(rgb, pred["labels"], names))
        present = sorted(int(c) for c in np.unique(pred["labels"]) if c != IGNORE)
        results.append({"image": str(path), "outputs": [str(p) for p in written], "classes": present})
        if log is not None:
            log(f"[{index}/{len(images)}] {path} ({rgb.shape[1]}x{rgb.shape[0]}): {len(present)} class(es) -> "
                f"{', '.join(p.name for p in written)} ({time.perf_counter() - start:.2f} s)")
    if task == "panoptic":
        panoptic_json = out / "panoptic.json"
        write_json(panoptic_json, {"annotations": annotations, "categories": [
            {"id": c, "name": n, "isthing": int(c in set(thing_ids))} for c, n in enumerate(names)],
            "checkpoint": str(checkpoint)})
        if log is not None:
            log(f"wrote {panoptic_json}")
    return {"images": results, "out": str(out)}


__all__ = ["predict", "predict_image", "find_images", "class_info", "legend_overlay", "TASKS"]
