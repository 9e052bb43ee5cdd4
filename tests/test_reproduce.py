"""The batch pipeline as a reader meets it: refused at once when the machine or the arguments cannot run a
profile, a quiet log, timings that are not overwritten by a cached rerun."""
import json

import nbformat
import pytest

from mfcore.cli import main
from mfcore.companion import reproduce as rp
from mfcore.companion.experiments import cached_seconds, check_requirements, make_context


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def no_notebook_runs(monkeypatch):
    import papermill

    def refuse(*args, **kwargs):
        raise AssertionError("a notebook ran before the requirements were checked")

    monkeypatch.setattr(papermill, "execute_notebook", refuse)


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_gpu_profile_without_a_gpu_is_refused_at_once(no_cuda, no_notebook_runs, tmp_path, capsys):
    code, err = _cli(["reproduce", "--profile", "gpu", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no GPU" in err and "make reproduce PROFILE=gpu DEVICE=cpu" in err
    assert not (tmp_path / "r").exists()  # nothing was made


def test_gpu_profile_on_the_cpu_passes_the_check(no_cuda):
    check_requirements(make_context("gpu", device="cpu"))


def test_tables_checks_the_same(no_cuda, capsys):
    code, err = _cli(["tables", "table2", "--profile", "gpu"], capsys)
    assert code == 2 and "no GPU" in err and "DEVICE=cpu" in err


def test_paper_profile_without_data_root_names_it(no_notebook_runs, capsys):
    code, err = _cli(["reproduce", "--profile", "paper", "--device", "cpu"], capsys)
    assert code == 2 and "DATA_ROOT=" in err and "data/README.md" in err


def test_paper_profile_names_the_missing_dataset_folder(no_notebook_runs, tmp_path, capsys):
    (tmp_path / "ade20k").mkdir()
    code, err = _cli(["reproduce", "--profile", "paper", "--device", "cpu", "--data-root", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"DATA_ROOT={tmp_path}" in err and "coco-panoptic" in err
    assert "ade20k, " not in err and "ade20k (" not in err  # the folder that exists is not named


def test_paper_tables_check_only_their_datasets(tmp_path):
    (tmp_path / "ade20k").mkdir()
    check_requirements(make_context("paper", device="cpu", data_root=str(tmp_path)), ["table4"])
    with pytest.raises(ValueError, match="coco-panoptic"):
        check_requirements(make_context("paper", device="cpu", data_root=str(tmp_path)), ["table5"])


@pytest.mark.parametrize("message, lines", [
    ("step 10/300 loss 2.31\n", ["step 10/300 loss 2.31"]),          # no blank line after a progress line
    ("<Figure size 640x480 with 1 Axes>", []),
    ("<Figure size 1100x350 with 6 Axes>\n", []),
    ("<IPython.core.display.Markdown object>", []),
    ("Working directory: /repo/notebooks", []),
    ("Passed unknown parameter: cache_dir", []),
    ("Executing Cell 3---------------------------------------", []),
    ("\n", []),
    ("### Table 2\n\n| K | mIoU |\n| --- | --- |\n| 8 | 1.0 |\n", ["### Table 2", "", "| K | mIoU |", "| --- | --- |",
                                                                 "| 8 | 1.0 |"]),
])
def test_batch_log_lines(message, lines):
    assert rp.log_lines(message) == lines


def test_kernel_noise_is_dropped_and_the_rest_kept():
    assert rp.is_kernel_noise("[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All ...")
    assert rp.is_kernel_noise("[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.")
    assert not rp.is_kernel_noise("Traceback (most recent call last):")
    assert not rp.is_kernel_noise("RuntimeError: CUDA out of memory")


def test_cached_seconds_count_each_run_once():
    assert cached_seconds({"seconds": 12.0, "cached": True}) == 12.0
    assert cached_seconds({"seconds": 12.0, "cached": False}) == 0.0  # already in the caller's clock


def test_estimate_from_the_last_full_run(tmp_path):
    assert "none yet" in rp.estimate("quick", ["01_a.ipynb"], tmp_path, 0)
    (tmp_path / "reproduce_quick.json").write_text(json.dumps(
        {"notebooks": {"01_a.ipynb": 60.0, "02_b.ipynb": 600.0}, "parallel_training_seconds": None,
         "git_commit": "abcdef0123", "date": "2026-11-23 03:37:44"}))
    line = rp.estimate("quick", ["01_a.ipynb", "02_b.ipynb"], tmp_path, 0)
    assert "about 11 min for 2 notebook(s)" in line and "abcdef0" in line
    assert "3 training run(s) already finished" in rp.estimate("quick", ["01_a.ipynb"], tmp_path, 3)


def _tiny_notebooks(folder):
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile: str = "smoke"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "print('progress 1', flush=True)\nprint('progress 2', flush=True)\nfig = plt.figure()\nfig")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "01_tiny.ipynb")
    return folder


def test_a_cached_rerun_keeps_the_committed_timings_and_the_log_is_quiet(tmp_path, capfd):
    folder = _tiny_notebooks(tmp_path / "nbs")
    results = tmp_path / "results"
    committed = {"notebooks": {"01_tiny.ipynb": 900.0}, "git_commit": "0" * 40, "date": "then"}
    (results / "runs" / "smoke" / "some-run").mkdir(parents=True)
    (results / "runs" / "smoke" / "some-run" / "final.json").write_text("{}")
    (results / "reproduce_smoke.json").write_text(json.dumps(committed))
    rp.reproduce("smoke", results_dir=str(results), folder=folder, executed_dir=str(tmp_path / "ex"))
    assert json.loads((results / "reproduce_smoke.json").read_text()) == committed
    assert json.loads((tmp_path / "ex" / "reproduce_smoke.json").read_text())["cached_runs"] == 1
    out, err = capfd.readouterr()
    assert "estimate: about 15 min" in out
    assert "    progress 1\n    progress 2\n" in out
    for noise in ("Figure size", "without encryption", "KeyboardInterrupt", "Working directory", "unknown parameter"):
        assert noise not in out + err, noise


def test_the_pool_trains_the_notebooks_reference_runs_with_the_tables(tmp_path, monkeypatch):
    """With runs side by side, the pipeline trains every table's runs and the notebooks' reference runs (the
    panoptic one of notebooks 05 and 08 included) before the notebooks start, each once."""
    from mfcore.companion import tables

    pooled = []
    monkeypatch.setattr(rp, "train_runs", lambda ctx, specs, workers: pooled.extend(s.name for s in specs))
    folder = _tiny_notebooks(tmp_path / "nbs")
    rp.reproduce("smoke", results_dir=str(tmp_path / "results"), folder=folder, executed_dir=str(tmp_path / "ex"),
                 workers=2)
    ctx = make_context("smoke", str(tmp_path / "results"))
    expected = {s.name for s in tables.planned_runs(ctx)} | {"synthetic-panoptic-k8-maskformer-s0"}
    assert len(pooled) == len(set(pooled)) and set(pooled) == expected
