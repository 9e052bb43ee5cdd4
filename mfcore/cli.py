"""Command line: `python -m mfcore <command> ...`. Each command is a thin call into the package."""
from __future__ import annotations

import argparse
import json
import sys

from mfcore.data.synthetic_writer import add_cli_arguments as add_synthetic_arguments
from mfcore.data.synthetic_writer import main as make_synthetic_main


def _analyze(args: argparse.Namespace) -> None:
    from mfcore.companion.analysis import analyze

    result = analyze(args.preset, size=args.size, flops=not args.no_flops)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['preset']}: {result['params'] / 1e6:.2f}M params", end="")
    print(f", {result['flops'] / 1e9:.1f}G flops at {result['size'][0]}x{result['size'][1]}" if "flops" in result else "")
    for name, n in result["params_by_module"].items():
        print(f"  {name:14s} {n / 1e6:8.2f}M")


# train / evaluate / convert-checkpoint: TrainConfig fields settable from the command line
TRAIN_FLAGS = {"dataset": str, "iters": int, "batch_size": int, "lr": float, "amp": str, "grad_accum": int,
               "seed": int, "eval_period": int, "checkpoint_period": int, "log_period": int, "num_workers": int}


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected 'auto' or nothing, got {text!r}")
    return text


def _parse_sets(items: list[str], config: str | None = None) -> dict[str, dict]:
    """--config FILE.json, then every --set on top -> {"model": {...}, "train": {...}, "loss": {...}}: each value
    type-checked against its field's annotation (bool, int, float, text, lists, none); unknown sections and
    fields are refused. `--set num_queries=50` (no section) is `--set model.num_queries=50`."""
    from mfcore.config import parse_sets, read_overrides

    return parse_sets(items, read_overrides(config) if config else None)


def _train(args: argparse.Namespace) -> None:
    from mfcore import fast
    from mfcore.training.distributed import cleanup, is_main_process
    from mfcore.training.train import train

    if args.no_fast:
        fast.set_enabled(False)
    sections = _parse_sets(args.set, args.config)
    # precedence: --config, then --set, then the named flags (--iters, --lr, ...)
    overrides = {**sections["train"], **{k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}}
    try:
        result = train(args.preset, args.output, args.data_root, train_overrides=overrides,
                       model_overrides=sections["model"], loss_overrides=sections["loss"], resume=args.resume,
                       progress=args.progress, device=args.device, stop_at=args.stop_at,
                       compile_options=None if args.compile is None else {"mode": args.compile})
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
    from mfcore import fast
    from mfcore.training.evaluate import evaluate

    if args.no_fast:
        fast.set_enabled(False)
    result = evaluate(args.checkpoint, args.data_root, tta=args.tta, split=args.split, output=args.output,
                      device=args.device, max_images=args.max_images, inference=args.inference,
                      log=lambda line: print(line, flush=True))
    for task, metrics in result["metrics"].items():
        if isinstance(metrics, dict):
            print(task + ": " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                          if isinstance(v, float)))
    if "output" in result:
        print(f"wrote {result['output']}")


def _predict(args: argparse.Namespace) -> None:
    from mfcore import fast
    from mfcore.predict import predict

    if args.no_fast:
        fast.set_enabled(False)
    predict(args.inputs, args.checkpoint, task=args.task, out_dir=args.out, device=args.device,
            log=lambda line: print(line, flush=True))


def _convert(args: argparse.Namespace) -> None:
    from mfcore.training.convert import convert_checkpoint

    summary = convert_checkpoint(args.pkl, args.out, args.preset, allow_pickle=args.allow_pickle)
    print(f"converted {summary['converted']} tensors into {summary['output']}; skipped {summary['skipped']}; "
          f"unused released names: {summary['unexpected'] or 'none'}")


def _bench(args: argparse.Namespace) -> None:
    try:
        from benchmarks.bench import main as bench
    except ModuleNotFoundError as err:
        if err.name != "benchmarks":
            raise
        raise RuntimeError("the benchmarks live in the source checkout: run `python -m mfcore bench` from its root") from None

    bench(device=args.device, threads=args.threads, reps=args.reps, warmup=args.warmup, quick=args.quick,
          out_dir=args.out, compare=not args.no_transformers, memory=not args.no_memory, compile_mode=args.compile,
          only=args.only)


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
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode, metavar="auto",
                   help="continue the run saved in OUTPUT/last.pt; --resume auto: continue it if it exists, else "
                        "start (for requeued cluster jobs)")
    p.add_argument("--progress", choices=("auto", "log", "off"), default="auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--stop-at", type=int, help="save and stop after this iteration (resume later)")
    p.add_argument("--set", action="append", default=[], metavar="[SECTION.]FIELD=VALUE",
                   help="override a config field: model.*, train.* or loss.*, e.g. --set model.num_queries=50 "
                        "--set train.crop_size=[384,384] --set loss.num_points=12544; no section: model "
                        "(repeatable; applied after --config, before --iters/--lr/...)")
    p.add_argument("--config", metavar="FILE.json",
                   help='overrides from a JSON file: {"model": {...}, "train": {...}, "loss": {...}}')
    p.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                   metavar="MODE", help="train through torch.compile(model, mode=MODE) (default mode; the first "
                                        "step compiles)")
    p.add_argument("--no-fast", action="store_true",
                   help="turn the speed paths off (mfcore.fast; the same results to float rounding)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="mIoU / PQ of a checkpoint; writes JSON next to it")
    p.add_argument("checkpoint")
    p.add_argument("--data-root", help="datasets root (default for synthetic presets: data/generated/synthetic)")
    p.add_argument("--tta", action="store_true", help="multi-scale + flip test (semantic metrics)")
    p.add_argument("--split", default="val")
    p.add_argument("--output", help="JSON path (default: eval_<split>[_tta].json next to the checkpoint; "
                                          "with --max-images N: eval_<split>[_tta]_firstN.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-images", type=int, help="score only the first N images")
    p.add_argument("--inference", choices=("semantic", "general", "detr"), default="semantic",
                   help="general: Table VII's panoptic-style inference read out as a semantic map; detr: "
                        "panoptic quality from DETR's post-processing (Table 3's DETR row)")
    p.add_argument("--no-fast", action="store_true",
                   help="turn the speed paths off (mfcore.fast; the same results to float rounding)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="predict your own images: label / panoptic PNGs and overlays with a legend")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER",
                   help="image files (.jpg, .jpeg, .png) or folders of them")
    p.add_argument("--checkpoint", required=True, help="mfcore checkpoint (train's last.pt, or convert-checkpoint's)")
    p.add_argument("--task", choices=("semantic", "panoptic", "instance"), default="semantic")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-fast", action="store_true",
                   help="turn the speed paths off (mfcore.fast; the same results to float rounding)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("convert-checkpoint", help="import the authors' released detectron2 .pkl or a Hugging Face "
                                               "MaskFormer snapshot folder")
    p.add_argument("pkl", help="released model_final.pkl, or a Hugging Face snapshot folder (config.json + "
                   "model.safetensors or pytorch_model.bin) of transformers' MaskFormerForInstanceSegmentation")
    p.add_argument("out", help="mfcore checkpoint to write (.pt)")
    p.add_argument("--preset", required=True, help="the preset the file was trained as, e.g. ade20k-maskformer-r50")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow unpickling the file (unpickling can run code: only for files you trust)")
    p.set_defaults(func=_convert)
    p = sub.add_parser("bench", help="speed and memory against transformers' MaskFormer (benchmarks/README.md)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's current setting)")
    p.add_argument("--reps", type=int, help="timed repetitions per case (default: 9 on CPU, 20 on GPU, 1 quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side before timing")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (writes <device>-quick.*)")
    p.add_argument("--out", default="results/benchmarks", help="folder for <device>.json and <device>.md")
    p.add_argument("--no-transformers", action="store_true", help="time mfcore alone")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurement")
    p.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="time torch.compile(mfcore model, mode=MODE) (default mode; reduce-overhead adds CUDA "
                        "graphs on GPU); writes <device>-compiled[-MODE].*")
    p.add_argument("--only", nargs="+", choices=("train", "inference", "matcher", "memory", "small"),
                   help="run only these parts (tiny: CPU only); writes <device>[...]-only-PARTS.*")
    p.set_defaults(func=_bench)

    p = sub.add_parser("make-synthetic", help="write synthetic scenes in the ADE20K and COCO panoptic layouts")
    add_synthetic_arguments(p)
    p.set_defaults(func=make_synthetic_main)

    p = sub.add_parser("reproduce", help="the main job: run every notebook headless with papermill")
    _add_profile_arguments(p)
    p.add_argument("--only", nargs="*", help="run only the notebooks whose names contain these strings")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("tables", help="train what the named tables need and write them, without notebooks")
    p.add_argument("names", nargs="*", help="table1 table2 table3 table4 table5 table7 table8 table_queries "
                                            "(default: all)")
    _add_profile_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", help="replace the profile's seeds (stated in the provenance)")
    p.add_argument("--iters", type=int, help="replace the profile's iterations per run (stated in the provenance)")
    p.add_argument("--class-counts", type=int, nargs="+", metavar="K",
                   help="replace the profile's K settings of Table 2 (the table's K column states them)")
    p.set_defaults(func=_tables)
    return parser


def _add_profile_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run a profile's experiments (`reproduce`, `tables`)."""
    p.add_argument("--profile", default="quick", help="smoke | quick | gpu | paper")
    p.add_argument("--results-dir", default="", help="default: results/ (quick) or results/<profile>/")
    p.add_argument("--data-root", default="", help="paper profile: folder with one sub-folder per dataset")
    p.add_argument("--cache-dir", default="", help="generated datasets and pretrained backbones (default: "
                                                   "data/generated)")
    p.add_argument("--device", default="auto")
    p.add_argument("--nproc-per-node", type=int, default=1, help=">1: training runs go through torchrun")
    p.add_argument("--workers", type=int, help="training runs side by side (default: the profile's)")
    p.add_argument("--print-commands", action="store_true",
                   help="train nothing: print one `mfcore train` command per run, for a cluster job array "
                        "(README, SLURM); then run this command again without it to evaluate and write the results")


def _print_commands(ctx, specs: list) -> None:
    """One training command per run (`experiments.train_command`), each run once, on stdout."""
    import shlex

    from mfcore.companion.experiments import train_command

    for spec in {s.name: s for s in specs}.values():
        print(shlex.join(train_command(ctx, spec)), flush=True)


def _reproduce(args: argparse.Namespace) -> None:
    from mfcore.companion.reproduce import reproduce

    if args.print_commands:  # the runs the pipeline trains: every table's, and the notebooks' reference runs
        from mfcore.companion.experiments import base_spec, make_context
        from mfcore.companion.tables import planned_runs

        ctx = make_context(args.profile, args.results_dir, args.data_root or None, args.device, "off",
                           args.nproc_per_node, None, args.cache_dir)
        _print_commands(ctx, planned_runs(ctx) + [base_spec(ctx), base_spec(ctx, panoptic=True)])
        return
    reproduce(args.profile, args.results_dir, args.data_root or None, args.device, args.nproc_per_node, args.only,
              cache_dir=args.cache_dir or None, workers=args.workers)


def _tables(args: argparse.Namespace) -> None:
    from mfcore.companion.experiments import check_requirements, make_context, train_runs
    from mfcore.companion.table import write_table
    from mfcore.companion.tables import TABLES, planned_runs

    overrides = {"seeds": tuple(args.seeds) if args.seeds else None, "iters": args.iters,
                 "class_counts": tuple(args.class_counts) if args.class_counts else None}
    ctx = make_context(args.profile, args.results_dir, args.data_root or None, args.device,
                       "off" if args.print_commands else "log", args.nproc_per_node,
                       {k: v for k, v in overrides.items() if v is not None}, args.cache_dir)
    names = args.names or list(TABLES)
    if args.print_commands:  # e.g. on a login node without a GPU; a missing dataset is still refused
        _print_commands(ctx, planned_runs(ctx, names))
        return
    check_requirements(ctx, args.names or None)  # before any work: no GPU, paper data missing
    train_runs(ctx, planned_runs(ctx, names), args.workers or ctx.profile.parallel_runs)
    for name in names:
        table = TABLES[name](ctx)
        for path in write_table(table, ctx.results_dir):
            print(f"wrote {path}")
        if name == "table2":  # the trend figure notebook 06 draws
            from mfcore.companion.figures import plot_learning_curves, plot_table2_trend
            from mfcore.companion.tables import table2_curves
            from mfcore.companion.viz import save_figure

            for figure in (save_figure(plot_table2_trend(table.frame), ctx.results_dir / "figures" / "06_table2_trend.png"),
                           save_figure(plot_learning_curves(table2_curves(ctx)),
                                       ctx.results_dir / "figures" / "06_table2_curves.png")):
                print(f"wrote {figure}")


def _one_line(err: BaseException) -> str:
    """The message of `err` in one line. An error raised inside a DataLoader worker arrives with the worker's
    traceback in its message ("Caught ValueError in DataLoader worker process 0. Original Traceback ...");
    only its last line, the original error, is kept."""
    text = str(err)
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = f"missing key {err.args[0]!r}"
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1].strip()
        kind, sep, rest = last.partition(": ")
        text = rest if sep and kind.replace(".", "").isidentifier() else last
    return " ".join(text.split()) or type(err).__name__


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, FloatingPointError) as e:
        # bad input is reported in one line with a non-zero exit, not a traceback wall
        print(f"mfcore {args.command}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # read-only or full disk, a path that is a file or a folder, permissions
        where = f" ({e.filename})" if e.filename and str(e.filename) not in str(e) else ""
        print(f"mfcore {args.command}: error: {_one_line(e)}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves a checkpoint itself)
        print(f"mfcore {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
