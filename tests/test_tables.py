"""Table run planning and the notebook-free `tables` command (smoke profile, runs side by side)."""
import json

import pytest

from mfcore.cli import main
from mfcore.companion.experiments import make_context
from mfcore.companion import diagnostics, tables
from mfcore.companion.table import write_table
from mfcore.companion.tables import RUNS, planned_runs


@pytest.fixture
def smoke(tmp_path):
    return make_context("smoke", str(tmp_path / "results"), profile_overrides={"seeds": (0,)},
                        cache_dir=str(tmp_path / "cache"))


def test_planned_runs_cover_each_table_once(smoke):
    names = [s.name for s in planned_runs(smoke)]
    assert len(names) == len(set(names))
    table2 = {s.name for s in planned_runs(smoke, ["table2"])}
    assert len(table2) == 3 * len(smoke.profile.class_counts)  # 3 models x K settings, one seed
    assert {s.name for s in planned_runs(smoke, ["table7"])} == {s.name for s in planned_runs(smoke, ["table4"])}
    # the number-of-queries table trains only the N it does not share with Table 2's MaskFormer
    queries = {s.name for s in planned_runs(smoke, ["table_queries"])}
    extra = [n for n in smoke.profile.query_counts if n != smoke.profile.num_queries]
    assert len(queries) == 2 + len(extra) and len(queries - table2) == len(extra)
    assert set(RUNS) == {"table1", "table2", "table3", "table4", "table5", "table7", "table8", "table_queries",
                         "table_boundary"}
    with pytest.raises(ValueError, match="table9"):
        planned_runs(smoke, ["table9"])


def test_table3_has_the_detr_postprocessing_row(smoke):
    """Table 3's "MaskFormer (DETR post-processing)" row: the R50 + 6 Enc model (its params and FLOPs) with the
    paper's PQ for DETR's panoptic post-processing; quality needs the paper profile (nan here)."""
    frame = tables.table3(smoke).frame.set_index("model")
    row, same = frame.loc["coco-panoptic-maskformer-r50 (DETR post-processing)"], frame.loc["coco-panoptic-maskformer-r50"]
    assert (row["PQ paper"], row["PQ^Th paper"], row["PQ^St paper"]) == (45.6, 50.0, 39.0)
    assert row["params ours (M)"] == same["params ours (M)"] and row["FLOPs ours (G)"] == same["FLOPs ours (G)"]


def test_profile_overrides_reach_the_specs_and_provenance(smoke):
    assert smoke.profile.seeds == (0,)
    assert "seeds [0]" in smoke.profile.describe()
    ctx = make_context("smoke", str(smoke.results_dir), profile_overrides={"iters": 2}, cache_dir=str(smoke.cache_dir))
    assert {s.train["iters"] for s in planned_runs(ctx, ["table4"])} == {2}


def test_every_scene_parameter_keys_the_generated_data(smoke, monkeypatch):
    """A changed scene parameter (here the hue noise) must never reuse scenes generated with the old value."""
    from mfcore.companion import experiments

    monkeypatch.setattr("mfcore.data.ensure_synthetic", lambda root, **options: root)
    noisier = make_context("smoke", str(smoke.results_dir), profile_overrides={"hue_noise": 60.0},
                           cache_dir=str(smoke.cache_dir))
    assert experiments.synthetic_root(smoke, 8) != experiments.synthetic_root(noisier, 8)
    assert experiments.synthetic_root(smoke, 8) == experiments.synthetic_root(smoke, 8)



def test_larger_scenes_train_and_test_at_their_own_resolution(smoke):
    """A 128-pixel scene must not be resized to the presets' 64-pixel crop (that would average its noise away)."""
    from mfcore.companion import experiments
    from mfcore.config import override
    from mfcore.presets import get_preset

    larger = make_context("smoke", str(smoke.results_dir), profile_overrides={"image_size": 128},
                          cache_dir=str(smoke.cache_dir))
    spec = experiments.synthetic_spec(larger, "maskformer", 8)
    train_cfg = override(get_preset(spec.preset).train, **spec.train)
    assert train_cfg.crop_size == (128, 128) and train_cfg.test_short_side == 128
    assert min(train_cfg.short_sides) == 96 and max(train_cfg.tta_short_sides) == 160
    assert "crop_size" not in experiments.synthetic_spec(smoke, "maskformer", 8).train  # 64: the cached specs stand
def test_tables_command_trains_side_by_side_then_reuses(smoke, capsys):
    args = ["tables", "table4", "--profile", "smoke", "--results-dir", str(smoke.results_dir), "--seeds", "0",
            "--workers", "2", "--cache-dir", str(smoke.cache_dir)]
    main(args)
    out = capsys.readouterr().out
    assert "training 3, 2 at a time" in out
    for spec in planned_runs(smoke, ["table4"]):
        assert json.loads((smoke.runs_dir / spec.name / "final.json").read_text())["spec"] == spec.as_dict()
    md = (smoke.results_dir / "tables" / "table4.md").read_text()
    assert "Provenance: profile smoke" in md and "seeds [0]" in md
    main(args)
    assert "3 of 3 runs already finished; training 0" in capsys.readouterr().out


def test_reproduce_with_workers_trains_every_planned_run_first(tmp_path):
    import nbformat

    from mfcore.companion.reproduce import reproduce

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile: str = "smoke"  # profile')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "01_trivial.ipynb")
    results = tmp_path / "results"
    summary = reproduce("smoke", results_dir=str(results), folder=tmp_path / "nbs", executed_dir=str(tmp_path / "ex"),
                        cache_dir=str(tmp_path / "cache"), workers=2)
    assert summary["parallel_training_seconds"] > 0 and list(summary["notebooks"]) == ["01_trivial.ipynb"]
    ctx = make_context("smoke", str(results), cache_dir=str(tmp_path / "cache"))
    assert all((ctx.runs_dir / s.name / "final.json").is_file() for s in planned_runs(ctx))


def test_a_profile_trains_only_its_tables_and_says_so(smoke):
    import dataclasses

    only = dataclasses.replace(smoke, profile=dataclasses.replace(smoke.profile, tables=("table2",)))
    assert {s.name for s in planned_runs(only)} == {s.name for s in planned_runs(smoke, ["table2"])}
    skipped = tables.table5(only)
    assert skipped.frame.empty and "does not train" in skipped.notes[0]
    assert write_table(skipped, only.results_dir) == []


def test_table2_verdict_reads_the_gap_at_the_smallest_and_largest_k():
    import pandas as pd

    def frame(gaps):
        rows = []
        for k, gap in gaps.items():
            rows += [{"K": k, "model": "PerPixelBaseline+", "mIoU ours": 50.0, "PQ^St ours": 40.0},
                     {"K": k, "model": "MaskFormer", "mIoU ours": 50.0 + gap, "PQ^St ours": 40.0 + gap}]
        return pd.DataFrame(rows)

    assert all(line.startswith("HOLDS") for line in tables.table2_verdict(frame({8: 0.5, 32: 1.0, 64: 3.0})))
    assert all(line.startswith("DOES NOT HOLD") for line in tables.table2_verdict(frame({8: 4.0, 32: 1.0, 64: 2.0})))
    assert all(line.startswith("DOES NOT HOLD") for line in tables.table2_verdict(frame({8: -4.0, 64: -1.0})))


def test_class_group_iou_splits_thing_from_stuff_classes(tmp_path):
    per_class = [{"id": 0, "iou": 10.0}, {"id": 1, "iou": 30.0}, {"id": 2, "iou": 80.0}, {"id": 3, "iou": None},
                 {"id": 4, "iou": float("nan")}, {"id": 5, "iou": 60.0}]
    (tmp_path / "final.json").write_text(json.dumps({"metrics": {"semantic": {"per_class": per_class}}}))
    assert diagnostics.class_group_iou(tmp_path, {0, 1, 3}) == {"things": 20.0, "stuff": 70.0}


def test_side_by_side_joins_profiles_on_the_paper_column(tmp_path):
    import pandas as pd

    for profile, value in (("quick", 40.0), ("laptop", 45.0)):
        folder = tmp_path / profile / "tables"
        folder.mkdir(parents=True)
        pd.DataFrame([{"K": 8, "model": "MaskFormer", "mIoU paper": 78.5, "mIoU ours": value}]).to_csv(
            folder / "table2.csv", index=False)
        (folder / "table2.csv").open("a").write("# provenance: test\n")
    frame = tables.side_by_side({"quick": tmp_path / "quick", "laptop": tmp_path / "laptop",
                                 "gpu": tmp_path / "gpu"})
    assert list(frame.columns) == ["K", "model", "mIoU paper", "mIoU quick", "mIoU laptop"]
    assert frame.iloc[0].tolist() == [8, "MaskFormer", 78.5, 40.0, 45.0]


def test_table1_multiscale_column_reads_each_run_out_with_tta_once(tmp_path, monkeypatch):
    """Table 1's m.s. column: the median over seeds of each run's checkpoint evaluated with multi-scale + flip
    (the released TTA), evaluated once per run into eval_val_tta.json and reused after."""
    from mfcore.companion import model_size_tables as mst
    from mfcore.companion.experiments import RunSpec

    ctx = make_context("paper", str(tmp_path / "results"), profile_overrides={"seeds": (0, 1, 2)})
    monkeypatch.setattr("mfcore.companion.analysis.analyze",
                        lambda preset, size=None: {"params": 1e6, "flops": 1e9, "size": (512, 512)})
    monkeypatch.setattr(mst, "runs_model_size", lambda presets: lambda c: {
        p: [RunSpec(f"{p}-s{s}", p, "ade") for s in c.profile.seeds] for p in presets})
    monkeypatch.setattr(mst, "run_seeds", lambda c, specs: {"semantic": {"mIoU": 40.0}, "cached_seconds": 0.0})
    calls = []

    def fake_evaluate(checkpoint, data_root, output, device, max_images, tta=False, inference="semantic"):
        calls.append((str(checkpoint), tta))
        seed = int(str(checkpoint).split("-s")[-1].split("/")[0])
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"metrics": {"semantic": {"mIoU": 41.0 + seed}}}))

    monkeypatch.setattr("mfcore.training.evaluate.evaluate", fake_evaluate)
    frame = tables.table1(ctx).frame.set_index("model")
    assert (frame["mIoU (m.s.) ours"] == 42.0).all()       # median of 41, 42, 43
    assert (frame["mIoU (s.s.) ours"] == 40.0).all()
    assert len(calls) == 3 * len(frame) and all(tta for _, tta in calls)
    tables.table1(ctx)
    assert len(calls) == 3 * len(frame)                     # read from eval_val_tta.json the second time
