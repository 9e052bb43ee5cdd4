"""`tables` / `reproduce --print-commands`: one training command per run, for a cluster job array."""
from __future__ import annotations

import shlex
import sys

import pytest

import mfcore.companion.experiments as experiments
import mfcore.companion.tables as tables
from mfcore.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(crop_size=[32, 32], short_sides=[32], max_size=64, test_short_side=32, batch_size=2, num_workers=0,
            iters=2, checkpoint_period=1)


def _spec(root: str, name: str = "demo") -> experiments.RunSpec:
    return experiments.RunSpec(name, "synthetic-maskformer-tiny", root, dict(FAST), {"dec_layers": 2,
                                                                                      "memory_feature": "res3"})


def test_the_printed_command_trains_the_run_that_tables_then_reuses(tmp_path, capsys):
    from mfcore.data import make_synthetic

    root = tmp_path / "data"
    make_synthetic(root, num_classes=4, num_train=4, num_val=1, image_size=32, workers=1)
    ctx = experiments.make_context("smoke", str(tmp_path / "results"), device="cpu")
    spec = _spec(str(root))
    cmd = experiments.train_command(ctx, spec)
    assert cmd[:5] == [sys.executable, "-m", "mfcore", "train", "--preset"] and "--resume" in cmd
    assert experiments.train_command(experiments.make_context("smoke", str(tmp_path), nproc_per_node=2),
                                     spec)[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    main(cmd[3:])  # what the job array's task runs
    main(cmd[3:])  # a requeued task: --resume auto continues the (finished) run instead of refusing the folder
    assert "--resume auto: resuming" in capsys.readouterr().out
    result = experiments.run(ctx, spec)  # the config matches: resumed at its end, evaluated, not trained again
    assert result["iteration"] == 2 and (ctx.runs_dir / "demo" / "final.json").is_file()
    assert "resuming" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["tables", "reproduce"])
def test_print_commands_prints_one_line_per_run(command, tmp_path, monkeypatch, capsys):
    specs = [_spec("/data/a", "a"), _spec("/data/b", "b")]
    monkeypatch.setattr(tables, "planned_runs", lambda ctx, names=None: specs + specs[:1])
    monkeypatch.setattr(experiments, "base_spec", lambda ctx, model="maskformer", panoptic=False: specs[panoptic])
    main([command, "--profile", "smoke", "--results-dir", str(tmp_path), "--device", "cpu", "--print-commands"])
    ctx = experiments.make_context("smoke", str(tmp_path), device="cpu")
    assert capsys.readouterr().out.splitlines() == [shlex.join(experiments.train_command(ctx, s)) for s in specs]
