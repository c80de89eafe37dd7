"""Every notebook runs top to bottom (with small parameters) and is stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Parameter values for the test runs; a notebook takes the ones its parameters cell names.
SMALL = {"MAX_EPOCHS": "1", "TRAIN_SIZE": "512", "NUM_WORKERS": "0",
         "MAX_IMAGES": "16", "BATCH_SIZE": "8",                          # 03, 04: 16 Flickr8k images per split
         "ZEROSHOT_PER_CLASS": "1", "ZEROSHOT_TEMPLATES": "'simple'",     # 03: one CIFAR-10 image per class
         "SMALL_MODEL": "True"}                                          # 04: a 1-layer text tower and decoder
# What a notebook must print on its way (beyond running without an error).
PRINTS = {"01_quickstart.ipynb": "queries found their own image first",
          "02_custom_tower.ipynb": "image-to-text R@1",
          "03_lit.ipynb": "of 10 classes (chance: 10% and 50%)",
          "04_coca_captioning.ipynb": "beam 3: "}


def test_there_are_notebooks():
    assert sorted(PRINTS) == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.slow
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    [parameters] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if "../shared/data" in parameters.source and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} reads the shared data folder, absent here ({SHARED_DATA})")
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
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert PRINTS[path.name] in "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert any("image/png" in o.get("data", {}) for o in outputs) or path.name == "02_custom_tower.ipynb"
