"""Faults and bad input: nothing lost, nothing silently wrong (one test or more per finding).

Each bad value or file is refused with one line naming it and exit code 2; a stop saves a finite
checkpoint; a run folder belongs to one process; a check never overwrites what a later step reads.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mfcore.training.train as train_module
from mfcore.cli import _parse_sets, main
from mfcore.data.datasets import build_dataset
from mfcore.data.formats import read_image
from mfcore.training.checkpoint import load_checkpoint, save_checkpoint
from mfcore.training.evaluate import evaluate
from mfcore.training.runtime import RunLock
from mfcore.training.train import train

REPO = Path(__file__).resolve().parent.parent
PRESET = "synthetic-maskformer-tiny"
# 32x32 images used whole, full batches of the 4 training images, 2 decoder layers (as tests/test_train.py)
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


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> Path:
    """A finished 1-iteration run folder (last.pt, eval_val.json)."""
    run = tmp_path_factory.mktemp("run")
    train(PRESET, run, data_root, train_overrides=dict(FAST, iters=1), model_overrides=SMALL_MODEL, progress="off")
    return run


def _copy(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(root, out)
    return out


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python -m mfcore ARGV` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------- 1. a signal to the process group
def test_sigint_to_the_process_group_with_workers_saves_a_finite_checkpoint(data_root, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mfcore", "train", "--preset", PRESET, "--output", str(run), "--data-root",
           str(data_root), "--iters", "100000", "--batch-size", "2", "--num-workers", "2", "--log-period", "1",
           "--progress", "log", "--device", "cpu", "--set", "dec_layers=1"]
    child = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the workers get it too
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["iteration"] >= 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (run / ".lock").exists()


# ------------------------------------------------------------------------- 2. one process per run folder
def test_a_second_run_on_a_busy_folder_is_refused_and_changes_nothing(data_root, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "iter": 1}\n')
    with RunLock(tmp_path):  # the first run, still going
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(RuntimeError, match=rf"in use by process {os.getpid()} .*\.lock"):
            train(PRESET, tmp_path, data_root, train_overrides=dict(FAST, iters=1), model_overrides=SMALL_MODEL,
                  progress="off")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"type": "train", "iter": 1}\n'
    assert not (tmp_path / "last.pt").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(data_root, tmp_path):
    (tmp_path / ".lock").write_text("999999999 somehost\n")  # killed with SIGKILL: the file stays, the lock not
    result = train(PRESET, tmp_path, data_root, train_overrides=dict(FAST, iters=1), model_overrides=SMALL_MODEL,
                   progress="off")
    assert result["status"] == "finished" and not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------- 3. NaN from the matcher path
def _poison_outputs_from_call(monkeypatch, call: int) -> None:
    real = train_module.build_model
    calls = []

    def build(cfg):
        model = real(cfg)

        def hook(module, args, outputs):
            calls.append(1)
            if len(calls) >= call:
                outputs["pred_masks"] = outputs["pred_masks"] * float("nan")
            return outputs

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "build_model", build)


def test_diverged_outputs_stop_training_before_the_matcher(data_root, tmp_path, monkeypatch):
    _poison_outputs_from_call(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match=r"iteration 3 .*pred_masks.*last\.pt \(iteration 2\)"):
        train(PRESET, tmp_path, data_root, train_overrides=dict(FAST, iters=5, checkpoint_period=2),
              model_overrides=SMALL_MODEL, progress="off")
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                          if v.is_floating_point())


def test_non_finite_gradients_with_a_finite_loss_are_not_saved(data_root, tmp_path, monkeypatch):
    real = train_module.clip_gradients
    calls = []

    def clip(model, max_norm):
        calls.append(1)
        norm = real(model, max_norm)
        if len(calls) >= 3:
            next(model.parameters()).grad.fill_(float("inf"))
            return torch.tensor(float("inf"))
        return norm

    monkeypatch.setattr(train_module, "clip_gradients", clip)
    with pytest.raises(FloatingPointError, match=r"gradient norm at iteration 3 .*\(iteration 2\)"):
        train(PRESET, tmp_path, data_root, train_overrides=dict(FAST, iters=5, checkpoint_period=2),
              model_overrides=SMALL_MODEL, progress="off")
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                          if v.is_floating_point())


def test_evaluate_refuses_a_diverged_checkpoint(data_root, trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained / "last.pt")
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] * float("nan")
    save_checkpoint(tmp_path / "nan.pt", ckpt)
    code, err = _cli(["evaluate", str(tmp_path / "nan.pt"), "--data-root", str(data_root), "--device", "cpu"], capsys)
    assert code == 2 and "NaN" in err and "nan.pt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "eval_val.json").exists()


# ------------------------------------------------------------------------- 4. typed --set
def test_set_values_are_type_checked_against_model_config():
    assert _parse_sets(["self_attention=False", "num_queries=50", "memory_feature=res3", "dropout=0",
                        "pretrained=none", "pixel_mean=[1, 2, 3]"])["model"] == dict(
        self_attention=False, num_queries=50, memory_feature="res3", dropout=0.0, pretrained=None,
        pixel_mean=(1.0, 2.0, 3.0))


@pytest.mark.parametrize("item, expected", [
    ("self_attention=nope", "expected true or false"), ("num_queries=abc", "expected an integer"),
    ("num_queries=2.5", "expected an integer"), ("dropout=x", "expected a number"),
    ("pixel_mean=[1, 2]", "expected a list of 3 values"), ("num_querys=5", "no field 'num_querys'"),
    ("num_queries", "expected FIELD=VALUE")])
def test_bad_set_values_are_refused_in_one_line(item, expected, tmp_path, capsys):
    code, err = _cli(["train", "--preset", PRESET, "--output", str(tmp_path / "run"), "--set", item], capsys)
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- 5. panoptic JSON content
def _edit_panoptic(root: Path, edit) -> Path:
    path = root / "coco" / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))
    return path


def _duplicate_segment(data):
    segments = data["annotations"][0]["segments_info"]
    segments.append(dict(segments[0]))
    return data


@pytest.mark.parametrize("edit, expected", [
    (_duplicate_segment, r"segment id\(s\) \[\d+\] .* more than once"),
    (lambda d: {**d, "annotations": d["annotations"] + d["annotations"][:1]}, "annotates image_id .* twice"),
    (lambda d: d["annotations"], "expected a JSON object with 'categories' and 'annotations'"),
    (lambda d: {**d, "annotations": []}, "has no annotations"),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, "expected a JSON object"),
    (lambda d: {**d, "annotations": [{k: v for k, v in a.items() if k != "segments_info"}
                                     for a in d["annotations"]]}, "lacks segments_info"),
    (lambda d: {**d, "annotations": [{**a, "file_name": "../" + a["file_name"]} for a in d["annotations"]]},
     "without '..'"),
    (lambda d: {**d, "annotations": [{**a, "file_name": "/etc/" + a["file_name"]} for a in d["annotations"]]},
     "relative to"),
])
def test_bad_panoptic_json_is_refused_naming_the_file(data_root, tmp_path, edit, expected):
    root = _copy(data_root, tmp_path)
    path = _edit_panoptic(root, edit)
    with pytest.raises(ValueError, match=expected) as info:
        build_dataset("synthetic_panoptic", root, "val")
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------- 6. a partial metrics.jsonl line
def test_resume_drops_a_partial_last_metrics_line(data_root, tmp_path):
    kw = dict(train_overrides=dict(FAST, iters=3), model_overrides=SMALL_MODEL, progress="off")
    train(PRESET, tmp_path, data_root, stop_at=2, **kw)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"type": "train", "iter": 3, "loss": 1.')  # killed while writing
    result = train(PRESET, tmp_path, data_root, resume=True, **kw)
    assert result["status"] == "finished"
    iters = [json.loads(line)["iter"] for line in metrics.read_text().splitlines()]
    assert [i for i in iters][:3] == [1, 2, 3]


def test_a_damaged_metrics_line_in_the_middle_names_the_file(data_root, tmp_path):
    kw = dict(train_overrides=dict(FAST, iters=3), model_overrides=SMALL_MODEL, progress="off")
    train(PRESET, tmp_path, data_root, stop_at=2, **kw)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0][:10] + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=rf"line 1 of {metrics}"):
        train(PRESET, tmp_path, data_root, resume=True, **kw)


# ------------------------------------------------------------------------- 7, 11. negative and zero sizes
@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "-4"], "batch_size=-4"), (["--batch-size", "0"], "batch_size=0"),
    (["--grad-accum", "0"], "grad_accum=0"), (["--grad-accum", "-1"], "grad_accum=-1"),
    (["--checkpoint-period", "0"], "checkpoint_period=0"), (["--log-period", "0"], "log_period=0"),
    (["--eval-period", "-1"], "eval_period=-1"), (["--iters", "0"], "iters=0"),
    (["--num-workers", "-1"], "num_workers=-1"), (["--stop-at", "-1"], "stop_at=-1"), (["--lr", "nan"], "lr=nan")])
def test_bad_sizes_and_periods_are_refused(flags, expected, data_root, tmp_path, capsys):
    code, err = _cli(["train", "--preset", PRESET, "--output", str(tmp_path / "run"), "--data-root",
                      str(data_root), "--device", "cpu", *flags], capsys)
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("count", ["0", "-3"])
def test_evaluate_refuses_max_images_below_one(count, trained, data_root, capsys):
    code, err = _cli(["evaluate", str(trained / "last.pt"), "--data-root", str(data_root), "--max-images", count],
                     capsys)
    assert code == 2 and f"max_images={count}" in err


def test_make_synthetic_refuses_a_negative_count(tmp_path, capsys):
    code, err = _cli(["make-synthetic", str(tmp_path / "s"), "--num-train", "-1", "--workers", "1"], capsys)
    assert code == 2 and "num_train=-1" in err


# ------------------------------------------------------------------------- 8. a check never overwrites
def test_a_partial_evaluate_keeps_the_runs_eval_val_json(trained, data_root):
    before = (trained / "eval_val.json").read_text()
    out = evaluate(trained / "last.pt", data_root, device="cpu", max_images=1)
    assert out["output"] == str(trained / "eval_val_first1.json")
    assert (trained / "eval_val.json").read_text() == before


# ------------------------------------------------------------------------- 9. OS errors, worker errors, Ctrl-C
def test_output_that_is_a_file_is_one_line(data_root, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _cli(["train", "--preset", PRESET, "--output", str(tmp_path / "file"), "--data-root",
                      str(data_root), "--device", "cpu"], capsys)
    assert code == 2 and "is a file" in err and len(err.splitlines()) == 1


def test_unwritable_evaluate_output_names_the_path(trained, data_root, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out.json"  # a parent that is a file: NotADirectoryError / FileExistsError
    code, err = _cli(["evaluate", str(trained / "last.pt"), "--data-root", str(data_root), "--device", "cpu",
                      "--output", str(target)], capsys)
    assert code == 2 and f"cannot write {target}" in err and len(err.splitlines()) == 1
    code, err = _cli(["evaluate", str(trained / "last.pt"), "--data-root", str(data_root), "--device", "cpu",
                      "--output", "/proc/mfcore-test.json"], capsys)  # not writable even for root
    assert code == 2 and "/proc/mfcore-test.json" in err and len(err.splitlines()) == 1


def test_a_full_disk_while_saving_a_checkpoint_says_so(tmp_path, monkeypatch):
    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=rf"cannot write checkpoint {tmp_path / 'last.pt'}.*disk full"):
        save_checkpoint(tmp_path / "last.pt", {"iteration": 1})
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_data_error_in_a_worker_is_one_line_naming_the_file(data_root, tmp_path, capsys):
    root = _copy(data_root, tmp_path)
    for image in (root / "ADEChallengeData2016" / "images" / "training").iterdir():
        image.write_bytes(b"not an image")
    code, err = _cli(["train", "--preset", PRESET, "--output", str(tmp_path / "run"), "--data-root", str(root),
                      "--device", "cpu", "--num-workers", "1", "--batch-size", "2", "--progress", "off"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot read image" in err and str(root) in err and "Traceback" not in err


def test_ctrl_c_outside_the_training_loop_is_one_line(monkeypatch, capsys):
    import mfcore.companion.reproduce as reproduce

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "reproduce", interrupted)
    code, err = _cli(["reproduce", "--profile", "smoke"], capsys)
    assert code == 130 and err.strip() == "mfcore reproduce: interrupted"


def test_convert_refuses_an_object_array(tmp_path, capsys):
    import pickle

    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.array([1.0, 2.0], dtype=object)}}))
    code, err = _cli(["convert-checkpoint", str(path), str(tmp_path / "out.pt"), "--preset", PRESET,
                      "--allow-pickle"], capsys)
    assert code == 2 and "not numeric arrays" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------- 10. errors that name the file
def test_an_empty_checkpoint_says_so_without_a_pkl_hint(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty") as info:
        load_checkpoint(tmp_path / "last.pt")
    assert ".pkl" not in str(info.value)


def test_synthetic_meta_without_class_names_names_the_file(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    meta = root / "ADEChallengeData2016" / "synthetic_meta.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "class_names"}))
    with pytest.raises(ValueError, match=rf"{meta}: missing class_names"):
        build_dataset("synthetic_semantic", root, "train")


def test_an_unknown_split_names_the_synthetic_dataset(data_root):
    with pytest.raises(ValueError, match="synthetic_semantic: unknown split 'bogus'"):
        build_dataset("synthetic_semantic", data_root, "bogus")


# ------------------------------------------------------------------------- 11. silent nonsense
def test_a_16_bit_grayscale_image_is_refused(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(path)
    with pytest.raises(ValueError, match="16/32-bit"):
        read_image(path)


def test_an_all_ignore_val_set_is_refused(trained, data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    for label in (root / "ADEChallengeData2016" / "annotations" / "validation").iterdir():
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(label)  # 0 = "other" = ignore
    with pytest.raises(ValueError, match="no labelled pixels"):
        evaluate(trained / "last.pt", root, device="cpu", output=tmp_path / "out.json")


# ------------------------------------------------------------------------- 12. resume on other data
def test_resume_on_another_data_root_is_refused(data_root, tmp_path):
    kw = dict(train_overrides=dict(FAST, iters=2), model_overrides=SMALL_MODEL, progress="off")
    train(PRESET, tmp_path / "run", data_root, stop_at=1, **kw)
    other = _copy(data_root, tmp_path)
    with pytest.raises(ValueError, match="--data-root"):
        train(PRESET, tmp_path / "run", other, resume=True, **kw)


def test_pq_refuses_a_segment_id_listed_twice():
    from mfcore.panoptic_quality import pq_compute_single

    seg = np.ones((4, 4), dtype=np.int64)
    segments = [{"id": 1, "category_id": 0}, {"id": 1, "category_id": 0}]
    with pytest.raises(ValueError, match=r"ground-truth segments list id\(s\) \[1\] more than once"):
        pq_compute_single(seg, segments, seg, segments[:1], [{"id": 0, "isthing": 0}])


def test_an_all_ignore_val_set_fails_the_run_after_saving(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    for label in (root / "ADEChallengeData2016" / "annotations" / "validation").iterdir():
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(label)
    with pytest.raises(ValueError, match="no labelled pixels"):
        train(PRESET, tmp_path / "run", root, train_overrides=dict(FAST, iters=1), model_overrides=SMALL_MODEL,
              progress="off")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 1
    assert not (tmp_path / "run" / "eval_val.json").exists()


class _SignalHandlers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> list:
        return [int(signal.getsignal(s) == signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]


def test_loader_workers_ignore_stop_signals():
    from mfcore.training.runtime import ignore_stop_signals

    loader = torch.utils.data.DataLoader(_SignalHandlers(), batch_size=2, num_workers=1,
                                         worker_init_fn=ignore_stop_signals)
    (batch,) = list(loader)
    assert [int(v) for v in torch.stack(batch).flatten()] == [1, 1, 1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pool_workers_stop_when_their_parent_is_killed(tmp_path):
    """A `tables` / `reproduce` killed outright (SIGKILL to it alone) must not leave its pool workers training:
    each worker gets SIGTERM when its parent dies (experiments._worker_start)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, signal, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from mfcore.companion.experiments import _worker_start\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'), initializer=_worker_start,\n"
        "                               initargs=(1,))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(1)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    worker = int(out.stdout.split()[0])
    deadline = time.time() + 20
    while time.time() < deadline and _running(worker):
        time.sleep(0.2)
    alive = _running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the pool worker outlived its killed parent"


def _running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
