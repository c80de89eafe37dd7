"""The documentation site builds without a warning, and the code it marks runnable runs and shows what it says.

- ``mkdocs build --strict`` (into a temporary folder): a broken link, a missing page, a bad anchor or
  a reference mkdocstrings cannot resolve fails the test.
- Every block marked ``<!-- runnable -->`` (tests/docs_blocks.py says how) runs with the small
  settings its marker gives, and where the page shows its output (``<!-- output -->``) the output
  must contain it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import docs_blocks
from docs_blocks import ROOT

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_mkdocs_build_strict(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    site = tmp_path / "site"
    # The generated reference pages exist and say what the code says.
    config_page = (site / "reference" / "config" / "index.html").read_text()
    assert "nonfinite_loss" in config_page and "contrastive_chunks" in config_page
    assert "--max-parallel" in (site / "reference" / "cli" / "index.html").read_text()
    assert "clip_vit_tiny" in (site / "reference" / "catalog" / "index.html").read_text()
    assert "load_config" in (site / "reference" / "api" / "vlm_lab.config" / "index.html").read_text()
    # The results pages include the files beside the experiments rather than copies of them.
    lit = (site / "results" / "lit" / "index.html").read_text()
    assert "include-markdown" not in lit and "How the recipe was chosen" in lit and "31.9" in lit


def _page_params():
    params = []
    for page in docs_blocks.pages():
        found = docs_blocks.blocks(page)
        if not found:
            continue
        slow = any("slow" in block.attributes for block in found)
        params.append(pytest.param(page, id=str(page.relative_to(ROOT)), marks=[pytest.mark.slow] if slow else []))
    return params


def _sandbox(tmp_path: Path) -> Path:
    """A folder that looks like the checkout (its entries are links to the checkout's), beside a link to
    ../shared, so that what a block writes (runs/...) stays in tmp_path."""
    repo = tmp_path / "vlm-lab"
    repo.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "runs", "site", "lightning_logs"}:
            (repo / entry.name).symlink_to(entry)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (tmp_path / "shared").symlink_to(shared)
    return repo


@pytest.mark.parametrize("page", _page_params())
def test_runnable_blocks_run_and_show_their_output(page, tmp_path, monkeypatch, clean_registry):
    found = docs_blocks.blocks(page)
    repo = _sandbox(tmp_path)
    for block in found:
        needs = block.attributes.get("needs")
        if needs and not (repo / needs).exists():
            pytest.skip(f"{block.where} needs {needs}")
    monkeypatch.chdir(repo)
    namespace: dict = {"__name__": "__docs__"}
    for block in found:
        if block.language == "bash":
            run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.source()], cwd=repo, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
            output = run.stdout
            expected_exit = int(block.attributes.get("exit", 0))
            assert run.returncode == expected_exit, f"{block.where}: exit {run.returncode}\n{output[-4000:]}"
        else:
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                exec(compile(block.source(), block.where, "exec"), namespace)
            output = captured.getvalue()
        if block.output is not None:
            assert docs_blocks.shows(output, block.output, block.output_mode), (
                f"{block.where}: the page shows\n{block.output}\nbut the block printed\n{output[-4000:]}")


def test_markers_are_well_formed():
    """Every marker parses (a typo in an attribute fails here, not silently), and pages have runnable blocks."""
    total = sum(len(docs_blocks.blocks(page)) for page in docs_blocks.pages())
    assert total >= 10


def test_readme_stays_a_short_front_page():
    """The README is what vlm-lab is, install, quickstart, tests, links and headline results; the rest is in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
