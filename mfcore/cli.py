"""Command line: `python -m mfcore <command> ...`. Each command is a thin call into the package."""
from __future__ import annotations

import argparse
import json
import sys


def _analyze(args: argparse.Namespace) -> None:
    from .analysis import analyze

    result = analyze(args.preset, size=args.size, flops=not args.no_flops)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['preset']}: {result['params'] / 1e6:.2f}M params", end="")
    print(f", {result['flops'] / 1e9:.1f}G flops at {result['size'][0]}x{result['size'][1]}" if "flops" in result else "")
    for name, n in result["params_by_module"].items():
        print(f"  {name:14s} {n / 1e6:8.2f}M")


# train / evaluate / convert-checkpoint: TrainConfig fields settable from the command line
TRAIN_FLAGS = {"iters": int, "batch_size": int, "lr": float, "amp": str, "grad_accum": int, "seed": int,
               "eval_period": int, "checkpoint_period": int, "log_period": int, "num_workers": int}


def _train(args: argparse.Namespace) -> None:
    from .distributed import cleanup, is_main_process
    from .train import train

    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    try:
        result = train(args.preset, args.output, args.data_root, train_overrides=overrides, resume=args.resume,
                       progress=args.progress, device=args.device, stop_at=args.stop_at)
        main_process = is_main_process()
    finally:
        cleanup()  # leave the torchrun process group (no-op in a single process)
    if result["eval"] is not None and args.progress != "off" and main_process:
        sem = result["eval"]["semantic"]
        print(f"{args.preset}: iteration {result['iteration']}, val mIoU {sem['mIoU']:.2f}, PQ^St {sem['PQ_St']:.2f}; "
              f"checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":
        sys.exit(128 + result["signal"])  # the shell convention for "killed by signal N"


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate

    result = evaluate(args.checkpoint, args.data_root, tta=args.tta, split=args.split, output=args.output,
                      device=args.device, max_images=args.max_images)
    for task, metrics in result["metrics"].items():
        if isinstance(metrics, dict):
            print(task + ": " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                          if isinstance(v, float)))
    if "output" in result:
        print(f"wrote {result['output']}")


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    summary = convert_checkpoint(args.pkl, args.out, args.preset, allow_pickle=args.allow_pickle)
    print(f"converted {summary['converted']} tensors into {summary['output']}; skipped {summary['skipped']}; "
          f"unused released names: {summary['unexpected'] or 'none'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mfcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="parameters and FLOPs of a preset (the paper's counting)")
    p.add_argument("--preset", required=True, help="e.g. ade20k-maskformer-r50")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the preset's crop)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-flops", action="store_true", help="parameters only (fast)")
    p.set_defaults(func=_analyze)
    p = sub.add_parser("train", help="train a preset (one process, or DDP under torchrun)")
    p.add_argument("--preset", required=True, help="e.g. synthetic-maskformer-tiny")
    p.add_argument("--output", required=True, help="run folder: metrics.jsonl, last.pt, eval_val.json")
    p.add_argument("--data-root", help="datasets root (default for synthetic presets: data/generated/synthetic)")
    for name, kind in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"override TrainConfig.{name}")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUTPUT/last.pt")
    p.add_argument("--progress", choices=("auto", "log", "off"), default="auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--stop-at", type=int, help="save and stop after this iteration (resume later)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="mIoU / PQ of a checkpoint; writes JSON next to it")
    p.add_argument("checkpoint")
    p.add_argument("--data-root", help="datasets root (default for synthetic presets: data/generated/synthetic)")
    p.add_argument("--tta", action="store_true", help="multi-scale + flip test (semantic metrics)")
    p.add_argument("--split", default="val")
    p.add_argument("--output", help="JSON path (default: eval_<split>[_tta].json next to the checkpoint)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-images", type=int, help="score only the first N images")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("convert-checkpoint", help="import the authors' released detectron2 .pkl")
    p.add_argument("pkl", help="released model_final.pkl")
    p.add_argument("out", help="mfcore checkpoint to write (.pt)")
    p.add_argument("--preset", required=True, help="the preset the file was trained as, e.g. ade20k-maskformer-r50")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow unpickling the file (unpickling can run code: only for files you trust)")
    p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, FloatingPointError) as e:
        # bad input is reported in one line with a non-zero exit, not a traceback wall
        print(f"mfcore {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
