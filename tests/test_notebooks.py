"""Every notebook runs top to bottom (with small parameters) and is stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
SMALL = {"MAX_EPOCHS": "1", "TRAIN_SIZE": "512"}


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    [parameters] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    lines = []
    for line in parameters.source.splitlines():
        name = line.split("=")[0].strip()
        if name in SMALL:
            line = f"{name} = {SMALL[name]}"
        elif name == "RUN_DIR":
            line = f"RUN_DIR = {str(tmp_path / 'run')!r}"
        lines.append(line)
    parameters.source = "\n".join(lines)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    assert (tmp_path / "run" / "checkpoints").is_dir()
