"""Scene-design levers, measured: MaskFormer against PerPixelBaseline+ at one K, under a profile's protocol with
some of its fields changed (the claims of Table 2 rest on the scene design; this is how a design was chosen).

    python -m mfcore.companion.levers --profile quick --k 64 --set hue_noise=60 [--set class_freq_exponent=1.0]

Each lever trains the same models with the same protocol (the profile's width, lr, batch, schedule, iterations)
on scenes generated with the changed fields, and writes `<results_dir>/levers/<tag>.json`: the changed fields,
each model's final val metrics and its learning curve (val mIoU / PQ^St at every evaluation).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

from mfcore.companion.profiles import get_profile
from mfcore.companion.experiments import make_context, synthetic_spec, train_runs
from mfcore.files import REPO, write_json

MODELS = ("perpixelplus", "maskformer")


def lever_tag(profile: str, num_classes: int, changes: dict) -> str:
    parts = [f"{k}={v}" for k, v in sorted(changes.items())] or ["default"]
    return f"{profile}-k{num_classes}-" + "-".join(parts).replace("_", "").replace(",", "")


def eval_curve(run_dir: Path) -> list[dict]:
    """[{"iteration", "mIoU", "PQ_St"}] of every val evaluation a run logged (metrics.jsonl, "type": "eval")."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "eval":
            curve.append({"iteration": record["iter"], "mIoU": record["mIoU"], "PQ_St": record["PQ_St"]})
    return curve


def measure_lever(profile: str, num_classes: int, changes: dict, models: tuple[str, ...] = MODELS, seed: int = 0,
                  results_dir: Path | None = None, workers: int = 2) -> dict:
    """Train `models` at K = num_classes on the profile with `changes` applied; returns (and writes) the summary."""
    tag = lever_tag(profile, num_classes, changes)
    out = Path(results_dir or REPO / "results") / "levers"
    overrides = {k: v for k, v in changes.items() if not k.startswith("pretrain.")}
    pretrain = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("pretrain.")}
    if pretrain:  # "pretrain.iters=3000": a field of the profile's PretrainConfig
        overrides["pretrain"] = dataclasses.replace(get_profile(profile).pretrain, **pretrain)
    ctx = make_context(profile, results_dir=str(out / tag), profile_overrides={**overrides, "name": tag})
    specs = [synthetic_spec(ctx, model, num_classes, seed=seed) for model in models]
    train_runs(ctx, specs, workers=workers)
    path = out / f"{tag}.json"
    earlier = json.loads(path.read_text())["models"] if path.is_file() else {}  # models measured by another call
    summary = {"profile": profile, "num_classes": num_classes, "seed": seed, "changes": changes,
               "protocol": ctx.profile.describe(), "models": earlier}
    for model, spec in zip(models, specs):
        run_dir = ctx.runs_dir / spec.name
        final = json.loads((run_dir / "final.json").read_text())
        sem = final["metrics"]["semantic"]
        summary["models"][model] = {"mIoU": sem["mIoU"], "PQ_St": sem.get("PQ_St"), "seconds": final["seconds"],
                                    "curve": eval_curve(run_dir)}
    write_json(path, summary)
    return summary


def lever_table(folder: Path | None = None) -> "pd.DataFrame":
    """One row per measured lever (`<results>/levers/*.json` with both models): what was changed, each model's
    final val mIoU / PQ^St and MaskFormer minus PerPixelBaseline+ (the sign Table 2's claim is about)."""
    import pandas as pd

    rows = []
    for path in sorted(Path(folder or REPO / "results" / "levers").glob("*.json")):
        lever = json.loads(path.read_text())
        models = lever["models"]
        if not all(m in models for m in MODELS):
            continue
        pp, mf = models["perpixelplus"], models["maskformer"]
        changed = ", ".join(f"{k}={v}" for k, v in sorted(lever["changes"].items())) or "(profile as is)"
        rows.append({"K": lever["num_classes"], "changed": changed, "seed": lever["seed"],
                     "PP+ mIoU": pp["mIoU"], "MF mIoU": mf["mIoU"], "gap mIoU": mf["mIoU"] - pp["mIoU"],
                     "PP+ PQ^St": pp["PQ_St"], "MF PQ^St": mf["PQ_St"], "gap PQ^St": mf["PQ_St"] - pp["PQ_St"]})
    return pd.DataFrame(rows).round(1)


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mfcore.companion.levers", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--k", type=int, required=True, help="number of classes K")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a Profile field to change")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    changes = {}
    for item in args.set:
        if "=" not in item:
            print(f"--set {item!r}: expected FIELD=VALUE", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        changes[key] = _value(value)
    summary = measure_lever(args.profile, args.k, changes, tuple(args.models.split(",")), args.seed,
                            workers=args.workers)
    for model, m in summary["models"].items():
        print(f"{lever_tag(args.profile, args.k, changes)} {model}: mIoU {m['mIoU']:.1f} PQ^St {m['PQ_St']:.1f} "
              f"curve {[round(c['mIoU'], 1) for c in m['curve']]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
