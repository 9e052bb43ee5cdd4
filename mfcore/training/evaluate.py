"""Evaluation of a checkpoint, as the paper reports it.

Semantic: mIoU (dataset-level confusion matrix) and PQ^St, where every class region of the prediction
and of the ground truth is one segment and all classes count as stuff (Table 2). Panoptic datasets and
mask-classification models add panoptic PQ / PQ^Th / PQ^St / SQ / RQ from general inference (Sec. 3.4)
with the preset's object-mask threshold (COCO 0.8, ADE20K 0.7) and overlap threshold 0.8, and the
instance output's COCO mask AP over the thing classes (`instance_inference`: one instance per query).

Single-scale test: the image is resized to the preset's test short side, predictions are resized back to
the label's original size. `tta=True`: the multi-scale + flip test of Table 1 (semantic metrics only;
the panoptic numbers stay single-scale, as in the paper). `inference="general"`: Table VII's general
inference (the panoptic rule with object threshold 0.3) read out as the semantic prediction.
`inference="detr"`: the panoptic numbers from DETR's post-processing instead of general inference (Table 3's
"MaskFormer (DETR post-processing)" row); the semantic numbers stay those of semantic inference.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mfcore import fast
from mfcore.config import PIXEL_MEAN, TrainConfig
from mfcore.data.datasets import PanopticSegDataset
from mfcore.fast.semantic_labels import semantic_labels
from mfcore.files import write_json
from mfcore.inference import (
    detr_panoptic_inference,
    general_semantic_inference,
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from mfcore.test_time import pad_images, postprocess_masks, predict_semantic, predict_semantic_tta, resize_shortest_edge
from mfcore.metrics import MaskAPAccumulator, SemSegEvaluator
from mfcore.panoptic_quality import PQAccumulator, semantic_categories
from mfcore.training import distributed as du
from mfcore.training.checkpoint import (
    config_dict,
    configs_from_checkpoint,
    load_trained_model,
)
from mfcore.training.runtime import checkpoint_dataset, resolve_device, set_tf32

GENERAL_THRESHOLD = 0.3  # Table VII: object-mask threshold of the general inference for semantic output
INFERENCE = ("semantic", "general", "detr")


def _padded_outputs(model: nn.Module, image: Tensor) -> tuple[dict, tuple[int, int], tuple[int, int]]:
    """The model's outputs for one image [3, h, w] (0..255) padded to its size divisibility, the padded
    size and the image's size."""
    batch, (size,) = pad_images([image], model.size_divisibility, PIXEL_MEAN)
    return model(batch), tuple(batch.shape[-2:]), size


@torch.inference_mode()
def mask_predictions(model: nn.Module, image: Tensor, output_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """MaskFormer's pairs for one image [3, h, w] (0..255): pred_logits [N, K+1] and mask logits
    [N, H_out, W_out] resized to `output_size` (upsampled to the padded input, padding cropped)."""
    outputs, padded, size = _padded_outputs(model, image)
    return outputs["pred_logits"][0], postprocess_masks(outputs["pred_masks"][0], padded, size, output_size)


@torch.inference_mode()
def mask_labels(model: nn.Module, image: Tensor, output_size: tuple[int, int]) -> Tensor:
    """MaskFormer's semantic label map [H_out, W_out] for one image [3, h, w] (0..255): the argmax of
    semantic inference (paper Sec. 3.4); with the speed paths on, straight from the stride-4 outputs
    (`semantic_labels`: the full-resolution masks and scores are never materialised)."""
    outputs, padded, size = _padded_outputs(model, image)
    if fast.enabled():
        return semantic_labels(outputs["pred_logits"], outputs["pred_masks"], padded, size, output_size)[0]
    masks = postprocess_masks(outputs["pred_masks"][0], padded, size, output_size)
    return semantic_inference(outputs["pred_logits"][0], masks, inplace=True).argmax(0)


def _gather_pq(acc: PQAccumulator) -> PQAccumulator:
    """An accumulator holding the PQ counts of all processes (`acc` itself in a single process)."""
    if not du.is_initialized():
        return acc
    gathered: list[Any] = [None] * du.get_world_size()
    torch.distributed.all_gather_object(gathered, acc.stats)
    total = PQAccumulator(acc.categories)
    for stats in gathered:
        part = PQAccumulator(acc.categories)
        part.stats = stats
        total.merge(part)
    return total


def _pq_summary(result: dict, names: list[str], suffix: str) -> dict:
    """{"PQ<suffix>", "SQ<suffix>", "RQ<suffix>"} of the "All" average plus a per-class table."""
    out = {f"{k.upper()}{suffix}": result["All"][k] for k in ("pq", "sq", "rq")}
    out["per_class"] = [{"id": c, "name": names[c], **{k: v[k] for k in ("pq", "sq", "rq", "tp", "fp", "fn")}}
                        for c, v in sorted(result["per_class"].items())]
    return out


def _thing_instances(sample: dict) -> dict:
    """Ground-truth instances of a panoptic sample: one mask per thing segment (crowd ones flagged)."""
    things = [s for s in sample["segments_info"] if s["isthing"]]
    pan_seg = sample["pan_seg"]
    masks = torch.stack([pan_seg == s["id"] for s in things]) if things else \
        torch.zeros((0, *pan_seg.shape[-2:]), dtype=torch.bool)
    return {"masks": masks, "labels": [s["category_id"] for s in things], "iscrowd": [s["iscrowd"] for s in things]}


def _thing_predictions(logits: Tensor, masks: Tensor, thing_ids: Any) -> dict:
    """`instance_inference`'s instances of thing classes (COCO's instance task scores things only)."""
    out = instance_inference(logits, masks)
    keep = torch.isin(out["labels"], torch.as_tensor(list(thing_ids), dtype=torch.int64, device=out["labels"].device))
    return {k: v[keep].cpu() for k, v in out.items()}


def evaluate_model(model: nn.Module, dataset: Any, cfg: TrainConfig, device: torch.device, tta: bool = False,
                   max_images: int | None = None, inference: str = "semantic",
                   log: Callable[[str], None] | None = None) -> dict:
    """Metrics of `model` on `dataset` (built without transform: original images and labels).

    Under torchrun each process scores images rank, rank + world, ... and the counts are summed.
    Returns {"num_images", "semantic": {"mIoU", "pixel_acc", "mAcc", "PQ_St", "SQ_St", "RQ_St",
    "per_class"}, "panoptic" (panoptic datasets with a mask-classification model): {"PQ", "PQ_Th",
    "PQ_St", "SQ", "RQ", "per_class"}, "instance" (the same): mask AP of the thing classes {"AP", "AP50",
    "AP75", "APs", "APm", "APl"}}; values in percent.
    inference: "semantic" (marginalisation, the default), "general" (MaskFormer only; Table VII) or "detr"
    (panoptic datasets and MaskFormer only: PQ from DETR's post-processing; Table 3).
    log: gets about 20 progress lines ("eval: 100/2000 images, 4.1 img/s, eta 7.7 min"; this process's share).
    """
    if inference not in INFERENCE:
        raise ValueError(f"inference={inference!r}: expected one of {INFERENCE}")
    if inference != "semantic" and (tta or model.cfg.arch != "maskformer"):
        raise ValueError(f"{inference} inference needs a MaskFormer model and single-scale testing")
    if inference == "detr" and not isinstance(dataset, PanopticSegDataset):
        raise ValueError("detr inference is DETR's panoptic post-processing: it needs a panoptic dataset")
    was_training = model.training
    model.eval()
    k, names = dataset.num_classes, list(dataset.class_names)
    mask_classification = model.cfg.arch == "maskformer"
    semseg = SemSegEvaluator(k, dataset.ignore_label)
    pq_st = PQAccumulator(semantic_categories(k))
    pq = ap = None
    if isinstance(dataset, PanopticSegDataset) and mask_classification:
        pq = PQAccumulator([{"id": c, "isthing": int(c in dataset.thing_ids)} for c in range(k)])
        ap = MaskAPAccumulator(k)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = range(du.get_rank(), count, du.get_world_size())
    start, every = time.perf_counter(), max(1, len(indices) // 20)
    for done, index in enumerate(indices, 1):
        sample = dataset[index]
        gt = sample["sem_seg"]
        out_size = tuple(gt.shape[-2:])
        image = sample["image"].to(device)
        resized = resize_shortest_edge(image, cfg.test_short_side, cfg.test_max_size)
        logits = masks = None
        if tta:
            pred = predict_semantic_tta(model, image, cfg.tta_short_sides, True, cfg.tta_max_size,
                                        long_side=cfg.tta_side == "long").argmax(0)
        elif mask_classification and inference == "semantic" and pq is None:
            pred = mask_labels(model, resized, out_size)  # no full-resolution masks needed
        elif mask_classification:
            logits, masks = mask_predictions(model, resized, out_size)
            if inference != "general":
                pred = semantic_inference(logits, masks).argmax(0)
            else:  # Table VII's general inference: the panoptic rule read out as a label map
                pred = general_semantic_inference(logits, masks, GENERAL_THRESHOLD, cfg.overlap_threshold,
                                                  dataset.ignore_label)
        else:
            pred = predict_semantic(model, resized, out_size).argmax(0)
        pred = pred.cpu()
        semseg.update(pred, gt)
        pq_st.add_semantic(pred.numpy(), gt.numpy(), dataset.ignore_label)
        if pq is not None:
            if logits is None:
                logits, masks = mask_predictions(model, resized, out_size)
            if inference == "detr":
                seg, segments = detr_panoptic_inference(logits, masks, dataset.thing_ids)
            else:
                seg, segments = panoptic_inference(logits, masks, dataset.thing_ids, cfg.object_mask_threshold,
                                                   cfg.overlap_threshold)
            pq.add(sample["pan_seg"].numpy(), sample["segments_info"], seg.cpu().numpy(), segments)
            ap.add(_thing_instances(sample), _thing_predictions(logits, masks, dataset.thing_ids))
        if log is not None and (done % every == 0 or done == len(indices)):
            rate, left = done / (time.perf_counter() - start), len(indices) - done
            log(f"eval: {done}/{len(indices)} images, {rate:.1f} img/s, eta {left / rate / 60:.1f} min")
    model.train(was_training)

    semseg.sync()
    sem = semseg.compute()
    st = _pq_summary(_gather_pq(pq_st).compute(), names, "_St")
    st_rows = {row["id"]: row for row in st.pop("per_class")}
    nan = float("nan")
    per_class = [{"id": c, "name": names[c], "iou": iou,
                  **{f"{m}_st": st_rows.get(c, {}).get(m, nan) for m in ("pq", "sq", "rq")}}
                 for c, iou in enumerate(sem["per_class_iou"])]
    result: dict = {"num_images": count, "semantic": {"mIoU": sem["mIoU"], "pixel_acc": sem["pixel_acc"],
                                                      "mAcc": sem["mAcc"], **st, "per_class": per_class}}
    if pq is not None:
        pan = _gather_pq(pq).compute()
        result["panoptic"] = {**_pq_summary(pan, names, ""), "PQ_Th": pan["Things"]["pq"], "PQ_St": pan["Stuff"]["pq"]}
        ap.sync()
        result["instance"] = ap.compute()
    return result


def evaluate(checkpoint: str | Path, data_root: str | Path | None = None, tta: bool = False, split: str = "val",
             output: str | Path | None = None, device: str = "auto", max_images: int | None = None,
             inference: str = "semantic", log: Callable[[str], None] | None = None) -> dict:
    """Evaluate a checkpoint (from `train` or `convert-checkpoint`) and write the results as JSON.
    log: gets the progress lines of the main process (`evaluate_model`).

    The JSON goes to `output`, by default next to the checkpoint: `eval_<split>[_tta|_general|_detr].json`.
    Returns the written dict: {"checkpoint", "iteration", "split", "tta", "metrics", "config", "git_commit"}.
    """
    checkpoint = Path(checkpoint)
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images={max_images!r}: expected an integer >= 1")
    if output is not None and Path(output).is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; expected a JSON file path")
    device = du.init_distributed(resolve_device(device))
    model, ckpt = load_trained_model(checkpoint)
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{checkpoint} holds NaN/inf in {len(bad)} weight tensor(s) (first: {bad[0]}): the run "
                         f"diverged; there is nothing meaningful to evaluate")
    preset, model_cfg, loss_cfg, train_cfg = configs_from_checkpoint(ckpt)
    set_tf32(train_cfg.tf32, device)
    model.to(device)
    dataset = checkpoint_dataset(checkpoint, model_cfg, train_cfg, data_root, split)
    start = time.perf_counter()
    metrics = evaluate_model(model, dataset, train_cfg, device, tta, max_images, inference,
                             log if du.is_main_process() else None)
    if metrics["semantic"]["mIoU"] != metrics["semantic"]["mIoU"]:  # NaN: not one labelled pixel was scored
        raise ValueError(f"the {split} split of {train_cfg.dataset} has no labelled pixels in the "
                         f"{metrics['num_images']} image(s) scored (all ignore): mIoU is undefined")
    result = {"checkpoint": str(checkpoint), "iteration": ckpt.get("iteration"), "split": split, "tta": tta,
              "inference": inference,
              "seconds": round(time.perf_counter() - start, 2), "metrics": metrics,
              "config": config_dict(preset, model_cfg, loss_cfg, train_cfg), "git_commit": ckpt.get("git_commit")}
    if du.is_main_process():
        suffix = "_tta" if tta else "" if inference == "semantic" else f"_{inference}"
        if max_images is not None and max_images < len(dataset):  # a partial check never replaces the full result
            suffix += f"_first{max_images}"
        path = Path(output) if output else checkpoint.parent / f"eval_{split}{suffix}.json"
        write_json(path, result)
        result["output"] = str(path)
    return result


__all__ = ["evaluate", "evaluate_model", "mask_predictions"]
