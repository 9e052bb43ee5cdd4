"""Tables 1 and 3: the paper's models at full size (params and FLOPs counted by `analysis`), with quality
columns from paper-profile runs on real data, and Table 3's row read out with DETR's panoptic post-processing."""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import pandas as pd

from mfcore.companion import paper_numbers as paper
from mfcore.companion.experiments import Context, paper_spec, run_seeds
from mfcore.companion.table import Table, provenance


def runs_model_size(presets: dict) -> Callable[[Context], dict]:
    """The runs behind a model-size table: each preset on real data, one per seed (none on synthetic profiles)."""
    def runs(ctx: Context) -> dict:
        return {p: [paper_spec(ctx, p, s) for s in ctx.profile.seeds] for p in presets} if not ctx.profile.synthetic else {}
    return runs


def model_size_table(ctx: Context, name: str, presets: dict, title: str, score_columns) -> Table:
    """Tables 1 and 3: params and FLOPs of every paper model counted at full size (mfcore.companion.analysis), beside
    the paper's; quality columns from paper-profile runs (real data) or marked as not run."""
    from mfcore.companion.analysis import analyze

    start, rows, seconds = time.perf_counter(), [], 0.0
    for preset, ref in presets.items():
        size = (ref["size"], ref["size"]) if "size" in ref else None
        a = analyze(preset, size=size)
        row = {"model": preset, "params paper (M)": ref["params"], "params ours (M)": a["params"] / 1e6,
               "FLOPs paper (G)": ref["flops"], "FLOPs ours (G)": a["flops"] / 1e9,
               "FLOPs size": f"{a['size'][0]}x{a['size'][1]}"}
        scores = None
        if not ctx.profile.synthetic:
            result = run_seeds(ctx, runs_model_size(presets)(ctx)[preset])
            seconds += result["cached_seconds"]
            scores = result
        row.update(score_columns(ref, scores))
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.insert(3, "params delta (%)", 100 * (frame["params ours (M)"] / frame["params paper (M)"] - 1))
    frame.insert(6, "FLOPs delta (%)", 100 * (frame["FLOPs ours (G)"] / frame["FLOPs paper (G)"] - 1))
    notes = ["Params and FLOPs are computed at full size (one multiply-add = one flop, eval mode, zero image, "
             "semantic inference included); the paper rounds params to 1M."]
    if ctx.profile.synthetic:
        notes.append("Quality columns need the real dataset and a GPU cluster: run the pipeline with PROFILE=paper.")
    return Table(name, title, frame, provenance(ctx, start, seconds, "params/FLOPs at full size"), notes)


def table1(ctx: Context) -> Table:
    """Table 1 with its single-scale (s.s.) and multi-scale + flip (m.s., the released TTA) mIoU of each model."""
    def scores(ref, result):
        ours = result["semantic"]["mIoU"] if result else float("nan")
        return {"mIoU (s.s.) paper": ref["ss"], "mIoU (s.s.) ours": ours, "mIoU (m.s.) paper": ref["ms"]}
    table = model_size_table(ctx, "table1", paper.TABLE1, "Table 1: MaskFormer on ADE20K val", scores)
    runs = runs_model_size(paper.TABLE1)(ctx)  # {} on synthetic profiles
    table.frame["mIoU (m.s.) ours"] = [_read_out(ctx, runs[preset], "tta", "semantic", "mIoU") if runs
                                       else float("nan") for preset in table.frame["model"]]
    return table


def table3(ctx: Context) -> Table:
    def scores(ref, result):
        ours = result["panoptic"]["PQ"] if result else float("nan")
        return {"PQ paper": ref["pq"][0], "PQ ours": ours, "PQ^Th paper": ref["pq"][1], "PQ^St paper": ref["pq"][2]}
    table = model_size_table(ctx, "table3", paper.TABLE3, "Table 3: MaskFormer on COCO panoptic val", scores)
    table.frame = pd.concat([table.frame, _detr_postprocessing_rows(ctx, table.frame)], ignore_index=True)
    return table


def _detr_postprocessing_rows(ctx: Context, frame: pd.DataFrame) -> pd.DataFrame:
    """Table 3's "MaskFormer (DETR post-processing)" row: the same model and runs as its MaskFormer row, read
    out with DETR's panoptic post-processing (`evaluate(..., inference="detr")`; paper profile only)."""
    rows = []
    for preset, pq in paper.TABLE3_DETR.items():
        ours = float("nan") if ctx.profile.synthetic else _read_out(
            ctx, runs_model_size(paper.TABLE3)(ctx)[preset], "detr", "panoptic", "PQ")  # the MaskFormer row's runs
        row = frame.loc[frame["model"] == preset].iloc[0].to_dict()
        row.update({"model": f"{preset} (DETR post-processing)", "PQ paper": pq[0], "PQ ours": ours,
                    "PQ^Th paper": pq[1], "PQ^St paper": pq[2]})
        rows.append(row)
    return pd.DataFrame(rows)


def _read_out(ctx: Context, specs: list, readout: str, part: str, metric: str) -> float:
    """Median over a row's runs (one per seed) of `metric` when their checkpoints are read out another way:
    "tta" (multi-scale + flip semantic inference) or "detr" (DETR's panoptic post-processing). Each run is
    evaluated once, into `eval_val_<readout>.json` beside its checkpoint (paper profile only)."""
    from mfcore.training.evaluate import evaluate

    options = {"tta": {"tta": True}, "detr": {"inference": "detr"}}[readout]
    values = []
    for spec in specs:
        out = ctx.runs_dir / spec.name / f"eval_val_{readout}.json"
        if not out.is_file():
            evaluate(ctx.runs_dir / spec.name / "last.pt", spec.data_root, output=out, device=ctx.device,
                     max_images=ctx.profile.eval_images, **options)
        values.append(json.loads(out.read_text())["metrics"][part][metric])
    return float(statistics.median(values))
