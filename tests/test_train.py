"""Training: solver rules, the resumable data order, and short end-to-end runs on tiny synthetic data."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mfcore.training.train as train_module
from mfcore.modeling.models import build_model
from mfcore.presets import get_preset
from mfcore.training.checkpoint import load_checkpoint
from mfcore.training.evaluate import evaluate
from mfcore.training.runtime import ResumableBatchSampler, forked_rng
from mfcore.training.solver import (
    build_optimizer,
    clip_gradients,
    lr_factor,
    param_groups,
)
from mfcore.training.train import train

REPO = Path(__file__).resolve().parent.parent
# 32x32 images used whole (no rescaling), full batches of the 4 training images, 2 decoder layers
FAST = dict(crop_size=(32, 32), short_sides=(32,), max_size=64, test_short_side=32, batch_size=4, num_workers=0,
            log_period=1, checkpoint_period=100, eval_period=0)
SMALL_MODEL = dict(dec_layers=2)



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from mfcore.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_classes=6, num_train=4, num_val=3, image_size=32, workers=1)
    return root


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# ----------------------------------------------------------------------------------------- solver


def test_lr_factor_matches_hand_computed_values():
    assert lr_factor(0, 10) == 1.0
    assert lr_factor(5, 10) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(10, 10) == 0.0
    # linear warm-up from 1e-6 over 4 steps, multiplied with the poly factor
    assert lr_factor(1, 10, warmup_iters=4) == pytest.approx((1e-6 * 0.75 + 0.25) * 0.9 ** 0.9)
    assert lr_factor(4, 10, warmup_iters=4) == pytest.approx(0.6 ** 0.9)
    assert [lr_factor(s, 10, "step", lr_steps=(3, 6)) for s in (2, 3, 5, 6)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_param_groups_follow_the_paper():
    model = build_model(get_preset("synthetic-maskformer-tiny").model)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=1e-4, backbone_lr_mult=0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["head"]["lr"] == 1e-4
    assert groups["head_no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == 1e-4
    assert id(model.predictor.query_embed.weight) in ids["head_no_decay"]          # embedding
    assert id(model.predictor.transformer.norm.weight) in ids["head_no_decay"]     # LayerNorm
    assert id(model.pixel_decoder.layer_1[1].bias) in ids["head_no_decay"]         # GroupNorm
    assert id(model.predictor.class_embed.bias) in ids["head"]                     # biases keep decay
    assert id(model.backbone.stem[0].weight) in ids["backbone"]
    assert id(model.backbone.stem[1].weight) in ids["backbone_no_decay"]
    assert sum(map(len, ids.values())) == len(list(model.parameters()))
    with torch.device("meta"):
        swin = build_model("ade20k-maskformer-swin-t")
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(swin, 6e-5, 0.01, 1.0)}
    assert id(swin.backbone.layers[0].blocks[0].attn.relative_position_bias_table) in groups["backbone_no_decay"]
    assert id(swin.backbone.layers[0].blocks[0].attn.qkv.weight) in groups["backbone"]


def test_clip_gradients_scales_the_whole_model_norm():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    model[0].weight.grad = torch.tensor([[3.0, 0.0]])
    model[1].weight.grad = torch.tensor([[4.0]])
    assert float(clip_gradients(model, 0.01)) == pytest.approx(5.0)  # sqrt(3^2 + 4^2), one norm for all
    assert torch.allclose(model[0].weight.grad, torch.tensor([[0.006, 0.0]]))
    assert torch.allclose(model[1].weight.grad, torch.tensor([[0.008]]))


def test_sampler_resumes_mid_epoch_and_shards_disjointly():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(ResumableBatchSampler(10, 3, seed=7), 8)  # 3 batches per epoch: crosses two epochs
    assert take(ResumableBatchSampler(10, 3, seed=7, start=5), 3) == full[5:]
    assert sorted(i for b in full[:3] for i, _ in b) == sorted(set(i for b in full[:3] for i, _ in b))
    assert len({s for b in full for _, s in b}) == 24  # one augmentation seed per sample visit
    ranks = [[i for b in take(ResumableBatchSampler(10, 2, seed=1, rank=r, world_size=2), 2) for i, _ in b]
             for r in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and len(ranks[0] + ranks[1]) == 8
    with pytest.raises(ValueError, match="too small"):
        ResumableBatchSampler(3, 2, seed=0, world_size=4)  # 1 image per process < micro-batch 2


def test_build_optimizer_uses_config():
    model = build_model(get_preset("synthetic-maskformer-tiny").model)
    opt = build_optimizer(model, get_preset("ade20k-maskformer-r50").train)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["backbone"] == pytest.approx(1e-5)


# ----------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("preset", ["synthetic-maskformer-tiny", "synthetic-perpixel-tiny"])
def test_a_few_iterations_reduce_the_loss(preset, data_root, tmp_path):
    result = train(preset, tmp_path, data_root, train_overrides=dict(FAST, iters=10), model_overrides=SMALL_MODEL,
                   progress="off")
    losses = [r["loss"] for r in _records(tmp_path, "train")]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])  # means of the last and the first three steps
    assert result["status"] == "finished" and 0 <= result["eval"]["semantic"]["mIoU"] <= 100
    assert result["config"]["model"]["num_classes"] == 6  # taken from the data, not the preset's 32


def test_perpixelplus_and_panoptic_runs_and_evaluate_writes_json(data_root, tmp_path):
    train("synthetic-perpixelplus-tiny", tmp_path / "pp", data_root, train_overrides=dict(FAST, iters=2),
          model_overrides=SMALL_MODEL, progress="off")
    assert load_checkpoint(tmp_path / "pp" / "last.pt")["config"]["model"]["num_queries"] == 6  # N = K
    run = tmp_path / "pan"
    result = train("synthetic-panoptic-maskformer-tiny", run, data_root, train_overrides=dict(FAST, iters=2),
                   model_overrides=SMALL_MODEL, progress="off")
    assert set(result["eval"]["panoptic"]) >= {"PQ", "PQ_Th", "PQ_St", "SQ", "RQ", "per_class"}
    assert set(result["eval"]["instance"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}  # things' mask AP
    out = evaluate(run / "last.pt", data_root)
    written = json.loads((run / "eval_val.json").read_text())
    assert out["output"] == str(run / "eval_val.json") and written["iteration"] == 2
    assert 0 <= written["metrics"]["semantic"]["mIoU"] <= 100
    assert len(written["metrics"]["semantic"]["per_class"]) == 6
    assert written["metrics"]["panoptic"]["PQ"] == pytest.approx(result["eval"]["panoptic"]["PQ"], nan_ok=True)
    evaluate(run / "last.pt", data_root, tta=True)  # multi-scale + flip: its own file
    assert 0 <= json.loads((run / "eval_val_tta.json").read_text())["metrics"]["semantic"]["mIoU"] <= 100
    detr = evaluate(run / "last.pt", data_root, inference="detr")  # Table 3's DETR post-processing row
    assert detr["output"] == str(run / "eval_val_detr.json") and detr["inference"] == "detr"
    assert 0 <= detr["metrics"]["panoptic"]["PQ"] <= 100 or math.isnan(detr["metrics"]["panoptic"]["PQ"])
    assert detr["metrics"]["semantic"]["mIoU"] == pytest.approx(written["metrics"]["semantic"]["mIoU"])
    with pytest.raises(ValueError, match="detr inference needs a MaskFormer"):  # PerPixelBaseline+: no pairs
        evaluate(tmp_path / "pp" / "last.pt", data_root, inference="detr")


def test_resumed_run_ends_bit_identical(data_root, tmp_path):
    overrides = dict(FAST, iters=4, batch_size=4, grad_accum=2)  # micro-batches of 2
    kw = dict(model_overrides=dict(dec_layers=2, dropout=0.1), progress="off")  # dropout: RNG must be restored
    train("synthetic-maskformer-tiny", tmp_path / "a", data_root, train_overrides=overrides, **kw)
    stopped = train("synthetic-maskformer-tiny", tmp_path / "b", data_root, train_overrides=overrides, stop_at=2, **kw)
    assert stopped["status"] == "stopped" and load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 2
    # the resumed half loads its data in a worker process: the order and augmentation must not change
    train("synthetic-maskformer-tiny", tmp_path / "b", data_root, train_overrides=dict(overrides, num_workers=1),
          resume=True, **kw)
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["iteration"] == b["iteration"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["iter"] for r in _records(tmp_path / "b", "train")] == [1, 2, 3, 4]
    # stop_at=0 saves the untrained model; resuming from there is the same run too
    train("synthetic-maskformer-tiny", tmp_path / "c", data_root, train_overrides=overrides, stop_at=0, **kw)
    assert load_checkpoint(tmp_path / "c" / "last.pt")["iteration"] == 0
    train("synthetic-maskformer-tiny", tmp_path / "c", data_root, train_overrides=overrides, resume=True, **kw)
    c = load_checkpoint(tmp_path / "c" / "last.pt")
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    assert [r["loss"] for r in _records(tmp_path / "b", "train")] == [r["loss"] for r in _records(tmp_path / "a", "train")]


def test_resume_auto_starts_a_new_run_then_continues_it(data_root, tmp_path, capsys):
    from mfcore.cli import build_parser

    kw = dict(train_overrides=dict(FAST, iters=2), model_overrides=SMALL_MODEL, progress="log")
    first = train("synthetic-maskformer-tiny", tmp_path, data_root, resume="auto", stop_at=1, **kw)  # no last.pt
    assert first["status"] == "stopped" and load_checkpoint(tmp_path / "last.pt")["iteration"] == 1
    assert "--resume auto: no " in capsys.readouterr().out
    second = train("synthetic-maskformer-tiny", tmp_path, data_root, resume="auto", **kw)  # the requeued job
    assert second["status"] == "finished" and second["iteration"] == 2
    assert "--resume auto: resuming " in capsys.readouterr().out
    assert [r["iter"] for r in _records(tmp_path, "train")] == [1, 2]
    with pytest.raises(ValueError, match="resume='yes'"):
        train("synthetic-maskformer-tiny", tmp_path, data_root, resume="yes", **kw)
    parse = build_parser().parse_args
    base = ["train", "--preset", "p", "--output", "o"]
    assert parse(base).resume is False and parse(base + ["--resume"]).resume is True
    assert parse(base + ["--resume", "auto"]).resume == "auto"
    with pytest.raises(SystemExit):
        parse(base + ["--resume", "always"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    calls = []
    real = train_module.total_loss

    def poisoned(losses, weights):
        calls.append(1)
        loss = real(losses, weights)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(train_module, "total_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"iteration 3 .*last good checkpoint .*last\.pt \(iteration 2\)"):
        train("synthetic-maskformer-tiny", tmp_path, data_root, train_overrides=dict(FAST, iters=5, checkpoint_period=2),
              model_overrides=SMALL_MODEL, progress="off")
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_sigterm_saves_a_checkpoint_then_stops(data_root, tmp_path, monkeypatch):
    real = train_module.total_loss
    calls = []

    def send_sigterm(losses, weights):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would, in the middle of a step
        return real(losses, weights)

    monkeypatch.setattr(train_module, "total_loss", send_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    result = train("synthetic-maskformer-tiny", tmp_path, data_root, train_overrides=dict(FAST, iters=5),
                   model_overrides=SMALL_MODEL, progress="off")
    assert result["status"] == "interrupted" and result["signal"] == signal.SIGTERM
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2  # the step in flight was finished
    assert signal.getsignal(signal.SIGTERM) == previous


def test_k_comes_from_the_data_and_an_explicit_mismatch_is_an_error(data_root, tmp_path):
    from mfcore.presets import adapt_to_data, one_query_per_class

    fixed = get_preset("synthetic-maskformer-fixed-tiny")
    assert one_query_per_class(fixed.model, fixed.loss) and fixed.model.num_queries == fixed.model.num_classes == 32
    adapted = adapt_to_data(fixed, fixed.model, 6)
    assert (adapted.num_classes, adapted.num_queries) == (6, 6)  # N = K follows the data's K
    plain = get_preset("synthetic-maskformer-tiny")
    assert adapt_to_data(plain, plain.model, 6).num_queries == plain.model.num_queries  # N is free there
    with pytest.raises(ValueError, match=r"num_queries=20 was set explicitly, but .* K=6 .*N = K"):
        adapt_to_data(fixed, fixed.model, 6, {"num_queries": 20})
    real = get_preset("ade20k-maskformer-r50")
    with pytest.raises(ValueError, match="ade20k has 6 classes but the model has 150"):
        adapt_to_data(real, real.model, 6)
    # through train(): an explicit K that the data does not have names both values
    with pytest.raises(ValueError, match=r"num_classes=32 was set explicitly, but the synthetic data has K=6"):
        train("synthetic-maskformer-tiny", tmp_path, data_root, train_overrides=dict(FAST, iters=1),
              model_overrides=dict(SMALL_MODEL, num_classes=32), progress="off")


def test_padding_label_must_be_the_datasets_ignore_label(data_root, tmp_path):
    """Crops and batches are padded with TrainConfig.ignore_label: one that is not the data's ignore label
    (ADE20K-Full: 65535, 255 being a class there) would turn the padding into a class, so it is refused."""
    with pytest.raises(ValueError, match=r"ignore_label=65535 but the synthetic data marks unlabelled pixels 255"):
        train("synthetic-maskformer-tiny", tmp_path, data_root, train_overrides=dict(FAST, iters=1, ignore_label=65535),
              model_overrides=SMALL_MODEL, progress="off")


def test_evaluation_uses_the_presets_test_sizes(data_root, tmp_path, monkeypatch):
    """Single-scale: test_short_side / test_max_size; multi-scale: tta_short_sides / tta_max_size / tta_side."""
    import mfcore.training.evaluate as ev

    train("synthetic-maskformer-tiny", tmp_path, data_root, model_overrides=SMALL_MODEL, progress="off",
          train_overrides=dict(FAST, iters=1, test_max_size=40, tta_short_sides=(32, 48), tta_max_size=50,
                               tta_side="long"))
    calls = {"single": [], "tta": []}
    resize, tta = ev.resize_shortest_edge, ev.predict_semantic_tta

    def spy_resize(image, short_side, max_size):
        calls["single"].append((short_side, max_size))
        return resize(image, short_side, max_size)

    def spy_tta(model, image, short_sides, flip, max_size, **kwargs):
        calls["tta"].append((tuple(short_sides), flip, max_size, kwargs))
        return tta(model, image, short_sides, flip, max_size, **kwargs)

    monkeypatch.setattr(ev, "resize_shortest_edge", spy_resize)
    monkeypatch.setattr(ev, "predict_semantic_tta", spy_tta)
    evaluate(tmp_path / "last.pt", data_root, max_images=1)
    evaluate(tmp_path / "last.pt", data_root, tta=True, max_images=1)
    assert calls["single"][0] == (32, 40)
    assert calls["tta"] == [((32, 48), True, 50, {"long_side": True})]


def test_refuses_to_overwrite_or_resume_a_different_run(data_root, tmp_path):
    train("synthetic-maskformer-tiny", tmp_path, data_root, train_overrides=dict(FAST, iters=1),
          model_overrides=SMALL_MODEL, progress="off")
    with pytest.raises(ValueError, match="already holds a run"):
        train("synthetic-maskformer-tiny", tmp_path, data_root, train_overrides=dict(FAST, iters=1),
              model_overrides=SMALL_MODEL, progress="off")
    with pytest.raises(ValueError, match=r"config differs: .*train.lr: 0.001 != 0.5"):
        train("synthetic-maskformer-tiny", tmp_path, data_root, train_overrides=dict(FAST, iters=1, lr=0.5),
              model_overrides=SMALL_MODEL, progress="off", resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train("synthetic-maskformer-tiny", tmp_path / "new", data_root, resume=True)


def test_torchrun_two_processes_on_cpu(data_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mfcore", "train", "--preset", "synthetic-maskformer-tiny", "--output", str(tmp_path),
           "--data-root", str(data_root), "--iters", "2", "--batch-size", "4", "--num-workers", "0",
           "--log-period", "1", "--progress", "log", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and ckpt["sampler"]["micro_batches"] == 2
    assert [r["iter"] for r in _records(tmp_path, "train")] == [1, 2]  # rank 0 writes, once per step
    assert len(_records(tmp_path, "eval")) == 1


def test_a_sample_seed_is_replayable_and_leaves_the_outer_rngs_and_cuda_alone(monkeypatch):
    """forked_rng (the data path, once per sample): the same seed replays the same draws, the RNGs outside are
    restored, and CUDA's RNG is not seeded (before CUDA starts, torch records each such call with a formatted
    stack trace: a third of the loader's time)."""
    def no_cuda_seeding(seed):
        raise AssertionError("forked_rng seeded CUDA")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", no_cuda_seeding)
    outer, outer_py = torch.get_rng_state(), random.getstate()
    draws = []
    for _ in range(2):
        with forked_rng(7):
            draws.append((torch.rand(3), random.random()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1] == draws[1][1]
    assert torch.equal(torch.get_rng_state(), outer) and random.getstate() == outer_py
