"""The paper's tables regenerated: each builder runs (or reuses) the experiments it needs and returns a
`Table` with the paper's numbers beside ours, the delta and a provenance line.

Synthetic profiles vary the number of classes K where the paper varies the dataset; the "paper" column
then shows the paper's dataset with the same rank in class count, and the delta compares different
datasets: read the *trends* (the gaps between models), not the absolute values.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from mfcore.companion import paper_numbers as paper
from mfcore.companion.experiments import Context, RunSpec, paper_spec, run_seeds, synthetic_spec
from mfcore.companion.model_size_tables import runs_model_size, table1, table3
from mfcore.companion.table import Table, provenance, trained
from mfcore.data import build_dataset


def _specs(ctx: Context, model: str, k: int | None = None, dataset: str | None = None, panoptic: bool = False,
           tag: str = "", **overrides) -> list:
    """One spec per seed: synthetic (K classes) or, for the paper profile, the paper preset on `dataset`."""
    if ctx.profile.synthetic:
        return [synthetic_spec(ctx, model, k, seed, panoptic, tag, **overrides) for seed in ctx.profile.seeds]
    backbone = "r101" if dataset == "cityscapes" else "r50"
    return [paper_spec(ctx, f"{dataset}-{model}-{backbone}", seed, **overrides) for seed in ctx.profile.seeds]


def _settings(ctx: Context) -> list[tuple[int | None, str]]:
    """Table 2's settings as (K, paper dataset): the synthetic K values paired with the paper's datasets of
    the same rank in class count, or the paper's datasets themselves."""
    if not ctx.profile.synthetic:
        return [(None, d) for d, _ in paper.TABLE2_DATASETS]
    ks = sorted(ctx.profile.class_counts)
    datasets = [d for d, _ in paper.TABLE2_DATASETS]
    if len(ks) == 3:
        datasets = ["cityscapes", "ade20k", "ade20k-full"]
    return list(zip(ks, datasets[:len(ks)]))


def _sem(result: dict) -> tuple[float, float]:
    s = result["semantic"]
    return s["mIoU"], s["PQ_St"]


def _spread(result: dict, key: str, part: str = "semantic") -> str:
    """The seeds' range of `key`, "min-max" (one seed: its value), for the tables' spread columns."""
    values = result.get(f"{part}_per_seed", {}).get(key) or [result[part][key]]
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def _claim(holds: bool, text: str) -> str:
    return f"{'HOLDS' if holds else 'DOES NOT HOLD'} in this run: {text}"


def table2_verdict(frame: pd.DataFrame) -> list[str]:
    """Whether Table 2's claim holds in `frame` (table2's rows): MaskFormer - PerPixelBaseline+ positive at the
    largest K and larger there than at the smallest K, in mIoU and in PQ^St."""
    lines = []
    for metric in ("mIoU", "PQ^St"):
        gap = {}
        for k, rows in frame.groupby("K"):
            by_model = dict(zip(rows["model"], rows[f"{metric} ours"]))
            gap[k] = by_model[MODEL_NAMES["maskformer"]] - by_model[MODEL_NAMES["perpixelplus"]]
        small, large = min(gap), max(gap)
        holds = gap[large] > 0 and gap[large] > gap[small]
        gaps = ", ".join(f"K={k}: {g:+.1f}" for k, g in sorted(gap.items()))
        lines.append(_claim(holds, f"{metric} of MaskFormer - PerPixelBaseline+ ({gaps}); the paper wants it positive "
                                   f"at the largest K and larger than at the smallest"))
    return lines


MODEL_NAMES = {"perpixel": "PerPixelBaseline", "perpixelplus": "PerPixelBaseline+", "maskformer": "MaskFormer",
               "maskformer-fixed": "MaskFormer-fixed", "maskformer-boxmatch": "MaskFormer (box matching)"}


TABLE2_MODELS = ("perpixel", "perpixelplus", "maskformer")


def _table2_models(ctx: Context) -> tuple[str, ...]:
    """Table 2's models in this profile: a short profile drops PerPixelBaseline, the row no claim rests on."""
    return tuple(m for m in TABLE2_MODELS if m != "perpixel" or ctx.profile.perpixel_rows)
TABLE4_MODELS = ("perpixelplus", "maskformer-fixed", "maskformer")
TABLE8_VARIANTS = {"1 layer": dict(dec_layers=1), "6 layers": {}, "6 layers, no self-attention": dict(self_attention=False)}


def _runs_table2(ctx: Context) -> dict:
    return {(k, dataset, m): _specs(ctx, m, k, dataset) for k, dataset in _settings(ctx) for m in _table2_models(ctx)}


def _runs_table4(ctx: Context) -> dict:
    return {m: _specs(ctx, m, ctx.profile.base_classes, "ade20k") for m in TABLE4_MODELS}


def _query_counts(ctx: Context) -> tuple[int, ...]:
    return ctx.profile.query_counts if ctx.profile.synthetic else (20, 50, 100, 150, 300, 1000)


def _runs_queries(ctx: Context) -> dict:
    k = ctx.profile.base_classes

    def maskformer(n: int) -> list:  # at the profile's own N this is Table 2/4's MaskFormer run: trained once
        if n == ctx.profile.num_queries:
            return _specs(ctx, "maskformer", k, "ade20k")
        return _specs(ctx, "maskformer", k, "ade20k", tag=f"q{n}", num_queries=n)
    return {"perpixelplus": _specs(ctx, "perpixelplus", k, "ade20k"), **{n: maskformer(n) for n in _query_counts(ctx)}}


def _runs_table8(ctx: Context) -> dict:
    return {label: _specs(ctx, "maskformer", ctx.profile.base_classes, "ade20k",
                          tag="-".join(f"{key}{value}" for key, value in overrides.items()), **overrides)
            for label, overrides in TABLE8_VARIANTS.items()}


def _runs_table5(ctx: Context) -> dict:
    return {m: _specs(ctx, m, ctx.profile.base_classes, "coco-panoptic", panoptic=True)
            for m in ("maskformer-boxmatch", "maskformer")}


def planned_runs(ctx: Context, names: list[str] | None = None) -> list[RunSpec]:
    """Every training run the named tables (default: all) need, each once, in table order."""
    names = names or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}: expected some of {list(RUNS)}")
    specs = {s.name: s for n in names if ctx.profile.runs_table(n) for group in RUNS[n](ctx).values() for s in group}
    return list(specs.values())


def _run_groups(ctx: Context, groups: dict) -> tuple[dict, float]:
    """Each group's median over seeds (`run_seeds`), and the seconds of its runs finished before this call (the
    others are in the caller's own clock: `provenance` counts each run once)."""
    results = {key: run_seeds(ctx, specs) for key, specs in groups.items()}
    return results, sum(r["cached_seconds"] for r in results.values())


def _setting(ctx: Context, real: str = "ADE20K") -> str:
    """The provenance line's setting: the base K of a synthetic profile, else the real dataset."""
    return f"K={ctx.profile.base_classes}" if ctx.profile.synthetic else real


def _class_group_note(ctx: Context, groups: dict) -> str:
    """Where Table 2's mIoU gap comes from: thing classes (small shapes, a few memory positions each) or stuff
    classes (large regions), each model's mean IoU over the group, median over seeds."""
    from mfcore.companion.diagnostics import class_group_iou

    parts = []
    for k, dataset in _settings(ctx):
        specs = {m: groups[k, dataset, m] for m in ("perpixelplus", "maskformer")}
        things = set(build_dataset("synthetic", specs["maskformer"][0].data_root, "val").thing_ids)
        iou = {m: {g: statistics.median(class_group_iou(ctx.runs_dir / s.name, things)[g] for s in runs)
                   for g in ("things", "stuff")} for m, runs in specs.items()}
        parts.append(f"K={k}: things {iou['maskformer']['things']:.1f} vs {iou['perpixelplus']['things']:.1f}, "
                     f"stuff {iou['maskformer']['stuff']:.1f} vs {iou['perpixelplus']['stuff']:.1f}")
    return ("Mean IoU over thing classes (small shapes) and over stuff classes (large regions), MaskFormer vs "
            "PerPixelBaseline+, median over seeds: " + "; ".join(parts) + ".")


@trained("table2", "Table 2: per-pixel vs mask classification (mIoU / PQ^St)")
def table2(ctx: Context) -> Table:
    """Table 2: per-pixel vs mask classification as the number of classes grows."""
    start, seconds, rows = time.perf_counter(), 0.0, []
    groups = _runs_table2(ctx)
    for k, dataset in _settings(ctx):
        results = {m: run_seeds(ctx, groups[k, dataset, m]) for m in _table2_models(ctx)}
        seconds += sum(r["cached_seconds"] for r in results.values())
        base_ours = _sem(results["perpixelplus"])[0]
        base_paper = paper.TABLE2["perpixelplus"][dataset][0]
        for model, result in results.items():
            miou, pq_st = _sem(result)
            p_miou, p_pq = paper.TABLE2[model][dataset]
            rows.append({"K": k if k else dict(paper.TABLE2_DATASETS)[dataset], "model": MODEL_NAMES[model],
                         "paper setting": f"{dataset} ({dict(paper.TABLE2_DATASETS)[dataset]} classes)",
                         "mIoU paper": p_miou, "mIoU ours": miou, "mIoU seeds": _spread(result, "mIoU"),
                         "mIoU delta": miou - p_miou, "PQ^St paper": p_pq, "PQ^St ours": pq_st,
                         "PQ^St seeds": _spread(result, "PQ_St"), "PQ^St delta": pq_st - p_pq,
                         "gap to PerPixelBaseline+ paper": p_miou - base_paper,
                         "gap to PerPixelBaseline+ ours": miou - base_ours})
    frame = pd.DataFrame(rows)
    notes = ["The paper's claim: MaskFormer beats PerPixelBaseline+ and the gap grows with the number of classes.",
             *table2_verdict(frame)]
    if ctx.profile.synthetic:
        notes.append(_class_group_note(ctx, groups))
    return Table("table2", "Table 2: per-pixel vs mask classification (mIoU / PQ^St)", frame,
                 provenance(ctx, start, seconds), notes)


def table2_curves(ctx: Context) -> dict:
    """Learning curves of Table 2's runs: {K: {model name: [eval records of each seed's metrics.jsonl]}}."""
    from mfcore.training.run_folder import read_metrics

    curves: dict = {}
    for (k, dataset, model), specs in _runs_table2(ctx).items():
        key = k if k else dict(paper.TABLE2_DATASETS)[dataset]
        runs = [ctx.runs_dir / s.name / "metrics.jsonl" for s in specs]
        curves.setdefault(key, {})[MODEL_NAMES[model]] = [read_metrics(r) for r in runs if r.is_file()]
    return curves


@trained("table4", "Table 4: fixed vs bipartite matching (mIoU / PQ^St)")
def table4(ctx: Context) -> Table:
    """Table 4: (a) per-pixel vs mask classification with the same fixed matching; (b) fixed vs bipartite."""
    start = time.perf_counter()
    results, seconds = _run_groups(ctx, _runs_table4(ctx))
    rows = []
    for model, result in results.items():
        miou, pq_st = _sem(result)
        p_miou, p_pq = paper.TABLE4[model]
        rows.append({"model": MODEL_NAMES[model], "matching": {"perpixelplus": "per-pixel (N=K)",
                     "maskformer-fixed": "fixed (N=K)", "maskformer": "bipartite"}[model],
                     "mIoU paper": p_miou, "mIoU ours": miou, "mIoU seeds": _spread(result, "mIoU"),
                     "mIoU delta": miou - p_miou, "PQ^St paper": p_pq, "PQ^St ours": pq_st,
                     "PQ^St seeds": _spread(result, "PQ_St"), "PQ^St delta": pq_st - p_pq})
    frame = pd.DataFrame(rows)
    notes = ["The paper's claim: bipartite matching beats fixed matching, which beats per-pixel classification."]
    for metric in ("mIoU", "PQ^St"):
        pp, fixed, bip = (float(frame.loc[frame["model"] == MODEL_NAMES[m], f"{metric} ours"].iloc[0])
                          for m in TABLE4_MODELS)
        notes.append(_claim(bip >= fixed > pp, f"{metric}: bipartite {bip:.1f}, fixed {fixed:.1f}, per-pixel {pp:.1f}"))
    return Table("table4", "Table 4: fixed vs bipartite matching (mIoU / PQ^St)", frame,
                 provenance(ctx, start, seconds, _setting(ctx)), notes)


@trained("table_queries", "Number of queries (mIoU / PQ^St)")
def table_queries(ctx: Context) -> Table:
    """Number of queries. Synthetic runs are matched to the paper's rows by the ratio N/K."""
    start, k = time.perf_counter(), ctx.profile.base_classes
    groups = _runs_queries(ctx)
    rows, seconds = [], 0.0
    ref = run_seeds(ctx, groups["perpixelplus"])
    seconds += ref["cached_seconds"]
    rows.append({"queries": "PerPixelBaseline+ (N=K)", "paper row": "PerPixelBaseline+",
                 "mIoU paper": paper.QUERIES["perpixelplus"][0], "mIoU ours": _sem(ref)[0],
                 "PQ^St paper": paper.QUERIES["perpixelplus"][1], "PQ^St ours": _sem(ref)[1]})
    paper_ns = [n for n in paper.QUERIES if isinstance(n, int)]
    for n in _query_counts(ctx):
        result = run_seeds(ctx, groups[n])
        seconds += result["cached_seconds"]
        match = n if not ctx.profile.synthetic else min(paper_ns, key=lambda p: abs(p / 150 - n / k))
        rows.append({"queries": n, "paper row": f"N={match} (N/K={match / 150:.2f})",
                     "mIoU paper": paper.QUERIES[match][0], "mIoU ours": _sem(result)[0],
                     "PQ^St paper": paper.QUERIES[match][1], "PQ^St ours": _sem(result)[1]})
    frame = pd.DataFrame(rows)
    frame.insert(4, "mIoU delta", frame["mIoU ours"] - frame["mIoU paper"])
    frame["PQ^St delta"] = frame["PQ^St ours"] - frame["PQ^St paper"]
    return Table("table_queries", "Number of queries (mIoU / PQ^St)", frame,
                 provenance(ctx, start, seconds, _setting(ctx)),
                 ["The paper: about 100 queries (N/K = 0.67 on ADE20K) work best; very many queries hurt."])


@trained("table8", "Table VIII: transformer decoder layers (semantic)")
def table8(ctx: Context) -> Table:
    """Table VIII: decoder layers, with and without self-attention (semantic metrics)."""
    start = time.perf_counter()
    results, seconds = _run_groups(ctx, _runs_table8(ctx))
    rows = []
    for label, result in results.items():
        s, p = result["semantic"], paper.TABLE8[label][0]
        rows.append({"decoder": label, "mIoU paper": p[0], "mIoU ours": s["mIoU"], "mIoU delta": s["mIoU"] - p[0],
                     "PQ^St paper": p[1], "PQ^St ours": s["PQ_St"], "SQ^St paper": p[2], "SQ^St ours": s["SQ_St"],
                     "RQ^St paper": p[3], "RQ^St ours": s["RQ_St"]})
    return Table("table8", "Table VIII: transformer decoder layers (semantic)", pd.DataFrame(rows),
                 provenance(ctx, start, seconds, _setting(ctx)),
                 ["Panoptic columns of Table VIII are not regenerated (the synthetic profiles train semantic runs here)."])


@trained("table5", "Table 5: matching with boxes vs masks (panoptic)")
def table5(ctx: Context) -> Table:
    """Table 5: box matching vs mask matching, panoptic quality (synthetic panoptic scenes or COCO)."""
    start = time.perf_counter()
    results, seconds = _run_groups(ctx, _runs_table5(ctx))
    rows = []
    for model, result in results.items():
        pan, p = result["panoptic"], paper.TABLE5[model]
        rows.append({"matching": "box" if "box" in model else "mask",
                     "PQ paper": p[0], "PQ ours": pan["PQ"], "PQ seeds": _spread(result, "PQ", "panoptic"),
                     "PQ delta": pan["PQ"] - p[0], "PQ^Th paper": p[1], "PQ^Th ours": pan["PQ_Th"],
                     "PQ^St paper": p[2], "PQ^St ours": pan["PQ_St"]})
    frame = pd.DataFrame(rows)
    box, mask = (frame.loc[frame["matching"] == m].iloc[0] for m in ("box", "mask"))
    notes = ["The paper: mask matching beats box matching, most for stuff (PQ^St), whose boxes are uninformative.",
             _claim(mask["PQ ours"] > box["PQ ours"] > 0,
                    f"PQ mask {mask['PQ ours']:.1f} vs box {box['PQ ours']:.1f}; PQ^St mask {mask['PQ^St ours']:.1f} "
                    f"vs box {box['PQ^St ours']:.1f}")]
    if ctx.profile.synthetic:
        notes.append(_confidence_note(ctx, _runs_table5(ctx)))
    return Table("table5", "Table 5: matching with boxes vs masks (panoptic)", frame,
                 provenance(ctx, start, seconds, ("synthetic panoptic, " if ctx.profile.synthetic else "") + _setting(ctx, "COCO")),
                 notes)


def _confidence_note(ctx: Context, groups: dict) -> str:
    """Why a panoptic PQ is what it is, measured: per matching, the val images' mean number of queries that
    panoptic inference keeps (a real class above 0.8) and the share of images with any (`diagnostics`; the
    median over seeds). A PQ of 0 with no confident query is a model whose classes never became sure."""
    from mfcore.companion.diagnostics import diagnose_checkpoint

    parts = []
    for model, specs in groups.items():
        diag = [diagnose_checkpoint(ctx.runs_dir / s.name / "last.pt", s.data_root, device=ctx.device,
                                    max_images=ctx.profile.eval_images) for s in specs]
        per_image = pd.Series([d["confident_per_image"] for d in diag]).median()
        share = pd.Series([d["images_with_confident"] for d in diag]).median()
        parts.append(f"{'box' if 'box' in model else 'mask'} matching {per_image:.2f} per image, {share:.0f}% of "
                     f"images with one (matched class accuracy {pd.Series([d['class_acc'] for d in diag]).median():.1f}%)")
    return "Queries panoptic inference keeps (a real class above 0.8), median over seeds: " + "; ".join(parts) + "."


@trained("table7", "Table VII: semantic vs general inference (mIoU / PQ^St / SQ^St / RQ^St)")
def table7(ctx: Context) -> Table:
    """Table VII: one MaskFormer read out with semantic vs general inference, beside PerPixelBaseline+."""
    from mfcore.training.evaluate import evaluate

    start = time.perf_counter()
    rows, seconds = [], 0.0
    groups = _runs_table4(ctx)
    ref = run_seeds(ctx, groups["perpixelplus"])
    seconds += ref["cached_seconds"]
    specs = groups["maskformer"]
    semantic = run_seeds(ctx, specs)
    seconds += semantic["cached_seconds"]
    general = []
    for spec in specs:  # the same checkpoints, re-read with the general (panoptic-style) inference
        out = ctx.runs_dir / spec.name / "eval_val_general.json"
        if not out.is_file():
            evaluate(ctx.runs_dir / spec.name / "last.pt", spec.data_root, output=out, device=ctx.device,
                     inference="general", max_images=ctx.profile.eval_images)
        general.append(pd.read_json(out, typ="series")["metrics"]["semantic"])
    general_median = {m: float(pd.Series([g[m] for g in general]).median()) for m in ("mIoU", "PQ_St", "SQ_St", "RQ_St")}
    for key, label, s in (("perpixelplus", "PerPixelBaseline+", ref["semantic"]),
                          ("general", "MaskFormer, general inference", general_median),
                          ("semantic", "MaskFormer, semantic inference", semantic["semantic"])):
        p = paper.TABLE7[key]
        rows.append({"model / inference": label, "mIoU paper": p[0], "mIoU ours": s["mIoU"],
                     "mIoU delta": s["mIoU"] - p[0], "PQ^St paper": p[1], "PQ^St ours": s["PQ_St"],
                     "PQ^St delta": s["PQ_St"] - p[1], "SQ^St paper": p[2], "SQ^St ours": s["SQ_St"],
                     "RQ^St paper": p[3], "RQ^St ours": s["RQ_St"]})
    return Table("table7", "Table VII: semantic vs general inference (mIoU / PQ^St / SQ^St / RQ^St)",
                 pd.DataFrame(rows), provenance(ctx, start, seconds, _setting(ctx)),
                 ["The paper: general inference (threshold 0.3) trades mIoU for PQ^St: fewer false-positive segments."])


BOUNDARY_MODELS = ("perpixelplus", "maskformer")


def _runs_boundary(ctx: Context) -> dict:
    if not ctx.profile.synthetic:
        return {}
    return {(design, m): [synthetic_spec(ctx, m, ctx.profile.base_classes, seed, design=design)
                          for seed in ctx.profile.seeds]
            for design in ("hue", "pairs") for m in BOUNDARY_MODELS}


@trained("table_boundary", "Where per-pixel classification wins: a class as a conjunction of two parts")
def table_boundary(ctx: Context) -> Table:
    """The same two models and protocol on the two scene designs, with MaskFormer's matching diagnostic: on
    "pairs" scenes a class is a conjunction of two texture primitives, a harder thing for a class-agnostic
    query to name than the statistic of a segment ("hue")."""
    from mfcore.companion.diagnostics import diagnose_checkpoint

    start, k = time.perf_counter(), ctx.profile.base_classes
    rows, seconds = [], 0.0
    for (design, model), specs in _runs_boundary(ctx).items():
        result = run_seeds(ctx, specs)
        seconds += result["cached_seconds"]
        row = {"scene design": design, "model": MODEL_NAMES[model], "mIoU": result["semantic"]["mIoU"],
               "mIoU seeds": _spread(result, "mIoU"), "PQ^St": result["semantic"]["PQ_St"]}
        if model == "maskformer":
            diag = [diagnose_checkpoint(ctx.runs_dir / s.name / "last.pt", s.data_root, device=ctx.device)
                    for s in specs]
            for key, label in (("class_acc", "matched class acc."), ("mask_iou", "matched mask IoU"),
                               ("oracle_class_mIoU", "mIoU, true classes")):
                row[label] = float(pd.Series([d[key] for d in diag]).median())
        rows.append(row)
    frame = pd.DataFrame(rows)
    notes = []
    for design in ("hue", "pairs"):
        mine = frame[frame["scene design"] == design].set_index("model")["mIoU"]
        gap = mine[MODEL_NAMES["maskformer"]] - mine[MODEL_NAMES["perpixelplus"]]
        notes.append(f"{design}: MaskFormer - PerPixelBaseline+ = {gap:+.1f} mIoU")
    return Table("table_boundary", "Where per-pixel classification wins: a class as a conjunction of two parts",
                 frame, provenance(ctx, start, seconds, f"K={k}, both designs"), notes)


# the runs behind each table (table7 reads the checkpoints of table4's runs)
RUNS: dict[str, Callable[[Context], dict]] = {
    "table1": runs_model_size(paper.TABLE1), "table2": _runs_table2, "table3": runs_model_size(paper.TABLE3),
    "table4": _runs_table4, "table5": _runs_table5, "table7": _runs_table4, "table8": _runs_table8,
    "table_queries": _runs_queries, "table_boundary": _runs_boundary}
TABLES: dict[str, Callable[[Context], Table]] = {
    "table1": table1, "table2": table2, "table3": table3, "table4": table4, "table5": table5, "table7": table7,
    "table8": table8, "table_queries": table_queries, "table_boundary": table_boundary}


def side_by_side(results_dirs: dict[str, str | Path], name: str = "table2",
                 keys: tuple[str, ...] = ("K", "model"), metric: str = "mIoU") -> pd.DataFrame:
    """One committed table of several profiles side by side with the paper's column:
    {"quick": "results", "laptop": "results/laptop"} -> rows `keys`, columns "<metric> paper" and
    "<metric> <profile>" for each profile whose `<dir>/tables/<name>.csv` exists."""
    merged = None
    for profile, folder in results_dirs.items():
        path = Path(folder) / "tables" / f"{name}.csv"
        if not path.is_file():
            continue
        frame = pd.read_csv(path, comment="#")
        part = frame[[*keys, f"{metric} ours"]].rename(columns={f"{metric} ours": f"{metric} {profile}"})
        if merged is None:
            merged = frame[[*keys, f"{metric} paper"]].merge(part, on=list(keys))
        else:
            merged = merged.merge(part, on=list(keys), how="outer")
    return merged if merged is not None else pd.DataFrame()
