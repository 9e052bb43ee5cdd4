"""`train --set SECTION.FIELD=VALUE` and `--config FILE.json`: typed, per section, refused in one line."""
from __future__ import annotations

import json

import pytest

from mfcore.cli import main
from mfcore.config import parse_sets, read_overrides
from mfcore.training.checkpoint import load_checkpoint

PRESET = "synthetic-maskformer-tiny"
FAST = dict(crop_size=[32, 32], short_sides=[32], max_size=64, test_short_side=32, batch_size=4, num_workers=0,
            log_period=1, checkpoint_period=100, eval_period=0, iters=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_sets_by_section_are_typed():
    out = parse_sets(["model.num_queries=50", "num_queries=60", "model.self_attention=false",
                      "train.crop_size=[384,384]", "train.lr=2e-4", "train.amp=bf16", "train.short_sides=[256, 512]",
                      "loss.num_points=12544", "loss.deep_supervision=false", "loss.matcher=fixed"])
    assert out == {"model": {"num_queries": 60, "self_attention": False},  # the last one wins; no section: model
                   "train": {"crop_size": (384, 384), "lr": 2e-4, "amp": "bf16", "short_sides": (256, 512)},
                   "loss": {"num_points": 12544, "deep_supervision": False, "matcher": "fixed"}}
    assert parse_sets(["loss.num_points=none"])["loss"] == {"num_points": None}
    base = {"model": {"dropout": 0.0}, "train": {"iters": 5}}
    assert parse_sets(["train.iters=7"], base) == {"model": {"dropout": 0.0}, "train": {"iters": 7}, "loss": {}}
    assert base["train"] == {"iters": 5}  # not changed in place


def test_config_file_is_typed(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"num_queries": 50, "pixel_mean": [1, 2, 3]},
                                "train": {"crop_size": [384, 384], "lr": 1}, "loss": {"num_points": 12544}}))
    assert read_overrides(path) == {"model": {"num_queries": 50, "pixel_mean": (1.0, 2.0, 3.0)},
                                    "train": {"crop_size": (384, 384), "lr": 1.0}, "loss": {"num_points": 12544}}
    path.write_text(json.dumps({"train": {"iters": 3}}))
    assert read_overrides(path) == {"model": {}, "train": {"iters": 3}, "loss": {}}


@pytest.mark.parametrize("item, expected", [
    ("optim.lr=1", "unknown section 'optim'"), ("model.num_querys=5", "ModelConfig has no field 'num_querys'"),
    ("train.crop=[1,2]", "TrainConfig has no field 'crop'"), ("loss.points=3", "LossConfig has no field 'points'"),
    ("train.crop_size=[384]", "expected a list of 2 values"), ("train.iters=ten", "expected an integer"),
    ("loss.num_points=many", "expected an integer"), ("loss.deep_supervision=2", "expected true or false"),
    ("loss.num_points=0", "num_points=0"), ("train.amp=fp8", "expected off, bf16 or fp16"),
    ("loss.matcher=greedy", "expected one of"), ("model.num_queries", "expected FIELD=VALUE")])
def test_bad_sets_are_refused_in_one_line(item, expected, tmp_path, capsys):
    code, err = _cli(["train", "--preset", PRESET, "--output", str(tmp_path / "run"), "--set", item], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, expected", [
    ({"optim": {"lr": 1}}, "unknown section(s) ['optim']"),
    ({"train": {"itres": 1}}, "TrainConfig has no field 'itres'"),
    ({"model": {"num_queries": "50"}}, "expected an integer"),
    ({"loss": {"num_points": 1.5}}, "expected an integer"),
    ({"model": [1]}, "must be a JSON object"), ([1, 2], "expected a JSON object"), (None, "not valid JSON"),
    ({"train": {"crop_size": [1, 2, 3]}}, "expected a list of 2 values")])
def test_bad_config_files_are_refused_in_one_line(content, expected, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text("{not json" if content is None else json.dumps(content))
    code, err = _cli(["train", "--preset", PRESET, "--output", str(tmp_path / "run"), "--config", str(path)], capsys)
    assert code == 2 and expected in err and "run.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    code, err = _cli(["train", "--preset", PRESET, "--output", str(tmp_path / "run"), "--config",
                      str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "missing.json" in err


def test_config_then_sets_then_flags_reach_the_saved_run(tmp_path, capsys):
    from mfcore.data import make_synthetic

    root = tmp_path / "data"
    make_synthetic(root, num_classes=6, num_train=4, num_val=1, image_size=32, workers=1)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"dec_layers": 2, "num_queries": 7}, "train": dict(FAST, seed=3),
                                  "loss": {"eos_coef": 0.2}}))
    main(["train", "--preset", PRESET, "--output", str(tmp_path / "run"), "--data-root", str(root), "--device", "cpu",
          "--progress", "off", "--config", str(config), "--set", "num_queries=5", "--set", "loss.num_points=64",
          "--set", "train.seed=4", "--seed", "5"])
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert saved["model"]["num_queries"] == 5 and saved["model"]["dec_layers"] == 2       # --set over --config
    assert saved["loss"]["num_points"] == 64 and saved["loss"]["eos_coef"] == 0.2
    assert saved["train"]["seed"] == 5 and list(saved["train"]["crop_size"]) == [32, 32]  # the flag over both
    assert json.loads((tmp_path / "run" / "eval_val.json").read_text())["config"]["loss"]["num_points"] == 64
