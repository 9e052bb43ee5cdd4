"""Notebook hygiene, and every notebook executed headless with papermill on the smoke profile."""
import ast
import json

import nbformat
import pytest

from mfcore.companion.reproduce import notebooks, reproduce

REQUIRED_PARAMETERS = {"profile", "data_root", "device", "results_dir", "progress", "interactive"}
ALL = notebooks()


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb["metadata"], "widget state must not be committed"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_parameters_cell_holds_typed_literals_only(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters'"
    names = set()
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.AnnAssign), f"{path.name}: parameters must be typed assignments"
        ast.literal_eval(stmt.value)  # raises on anything but a literal
        names.add(stmt.target.id)
    assert REQUIRED_PARAMETERS <= names, f"{path.name} lacks {REQUIRED_PARAMETERS - names}"


def test_notebooks_are_numbered_in_order():
    numbers = [int(p.name[:2]) for p in ALL]
    assert numbers == list(range(1, len(ALL) + 1))


def test_every_notebook_runs_on_the_smoke_profile(tmp_path):
    summary = reproduce("smoke", results_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"))
    assert set(summary["notebooks"]) == {p.name for p in ALL}
    tables = tmp_path / "results" / "tables"
    for name in ("table1", "table2", "table3", "table4", "table5", "table7", "table8", "table_queries"):
        md = (tables / f"{name}.md").read_text()
        assert "paper" in md and "Provenance: profile smoke" in md
        assert (tables / f"{name}.csv").read_text().splitlines()[-1].startswith("# provenance:")
    assert len(list((tmp_path / "results" / "figures").glob("*.png"))) >= 8
    # a second run reuses every finished training run
    again = reproduce("smoke", results_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"),
                      only=["06_"])
    assert again["notebooks"]["06_ablations.ipynb"] < summary["notebooks"]["06_ablations.ipynb"]


def test_a_failing_notebook_stops_the_pipeline_naming_it(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile: str = "smoke"  # profile')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("1 / 0")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder = tmp_path / "nbs"
    folder.mkdir()
    nbformat.write(nb, folder / "01_broken.ipynb")
    with pytest.raises(RuntimeError, match=r"01_broken.ipynb failed in cell .*ZeroDivisionError"):
        reproduce("smoke", results_dir=str(tmp_path / "results"), folder=folder, executed_dir=str(tmp_path / "ex"))
    assert (tmp_path / "ex" / "01_broken.ipynb").is_file()  # the executed copy is kept
    assert not (tmp_path / "results" / "tables").exists()
