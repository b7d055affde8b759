"""The learner's notebook, examples/build_a_gpt.ipynb: stored clean, runs top to bottom, ends equal to slmkit's GPT."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "build_a_gpt.ipynb"


def test_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_notebook_runs_and_its_model_gives_slmkits_logits(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="running the notebook needs nbformat (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="running the notebook needs nbclient (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="running the notebook needs ipykernel (pip install -e '.[test]')")
    monkeypatch.setenv("BUILD_A_GPT_STEPS", "20")  # the kernel inherits this: every stage trains 20 steps
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, startup_timeout=60,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    def text(cell) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    stages = "".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert stages.count("step   20: train loss") == 6  # six stages, each reporting train and val loss at the end
    (equality,) = [c for c in nb.cells if "equality" in c.metadata.get("tags", [])]
    assert "same logits: max abs difference" in text(equality)  # printed after its assertion passed
    assert not [o for o in equality.outputs if o.output_type == "error"]
