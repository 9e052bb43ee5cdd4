"""Checkpoints: atomic writes, weights_only round trips, RNG capture, and clear mismatch errors."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mfcore.config import ModelConfig
from mfcore.files import json_safe
from mfcore.modeling.models import build_model
from mfcore.presets import get_preset
from mfcore.training import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_thread")

def _tiny(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("synthetic-maskformer-tiny").model, **changes)


def test_full_training_checkpoint_round_trips_with_weights_only(tmp_path):
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    model(torch.rand(1, 3, 32, 32) * 255)["pred_logits"].sum().backward()
    opt.step()
    sched.step()
    p = get_preset("synthetic-maskformer-tiny")
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "iteration": 1, "rng": ck.capture_rng_state(),
                              "config": ck.config_dict(p.name, p.model, p.loss, p.train)})
    assert not (tmp_path / "last.pt.tmp").exists()
    loaded = ck.load_checkpoint(path)  # weights_only=True inside: only plain types were stored
    assert loaded["iteration"] == 1 and isinstance(loaded["git_commit"], str)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded["model"].items())
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    name, model_cfg, loss_cfg, train_cfg = ck.configs_from_checkpoint(loaded)
    assert (name, model_cfg, loss_cfg, train_cfg) == (p.name, p.model, p.loss, p.train)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"iteration": 1})

    def crash(obj, f):  # a run killed half-way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["iteration"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_rng_state_restores_every_generator():
    state = ck.capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ck.restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_checkpoint_of_another_preset_names_the_differences():
    model = _tiny()
    other = build_model(ModelConfig(arch="perpixel", backbone="tiny", num_classes=32, conv_dim=64, mask_dim=64,
                                    gn_groups=8))
    with pytest.raises(ValueError) as err:
        ck.load_model_state(model, other.state_dict(), "runs/a/last.pt")
    msg = str(err.value)
    assert "runs/a/last.pt" in msg and "missing keys" in msg and "predictor.query_embed.weight" in msg
    # same architecture, other number of classes: the class head's shapes are listed
    with pytest.raises(ValueError, match=r"predictor\.class_embed\.weight: checkpoint \(9, 64\) vs model \(33, 64\)"):
        ck.load_model_state(model, _tiny(num_classes=8).state_dict(), "x.pt")


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not an mfcore checkpoint"):
        ck.load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="weights_only"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_config_differences_and_json():
    p = get_preset("synthetic-maskformer-tiny")
    a = ck.config_dict(p.name, p.model, p.loss, p.train)
    b = json.loads(json.dumps(a))  # tuples became lists: not a difference
    assert ck.config_differences(a, b) == []
    b["train"]["lr"] = 5.0
    b["model"]["num_queries"] = 7
    assert ck.config_differences(a, b) == ["model.num_queries: 20 != 7", f"train.lr: {p.train.lr!r} != 5.0"]
    assert ck.config_differences(a, b, ignore=("lr", "num_queries")) == []
    assert json_safe({"a": float("nan"), "b": (1.5, float("inf"))}) == {"a": None, "b": [1.5, None]}


def test_git_commit_can_be_named_for_a_tree_without_git(monkeypatch):
    from mfcore.files import git_commit

    monkeypatch.setenv("MFCORE_GIT_COMMIT", "0123abc")
    assert git_commit() == "0123abc"
    monkeypatch.delenv("MFCORE_GIT_COMMIT")
    assert git_commit() != "0123abc"
