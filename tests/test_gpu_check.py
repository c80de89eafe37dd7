"""benchmarks/gpu_check.sh: it refuses to run without a GPU in one line, and its CPU dry run runs every row.

The figures of a dry run measure nothing (toy sizes on a shared CPU); what is checked is that each
row's command runs to its end and reports, so that the script works the day a GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ROWS = ["quickstart, bf16-mixed", "quickstart, strategy fsdp2", "quickstart, model.compile", "throughput vs open_clip",
        "LiT epoch vs open_clip", "peak memory, grad checkpointing"]


def _run(*arguments: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", str(SCRIPT), *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_stops_in_one_line():
    done = _run(timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                                   "--dry-run rehearses every row on the CPU")


@pytest.mark.slow  # six rows, each a fit or benchmark in a fresh process: several minutes on a loaded CPU
def test_dry_run_runs_every_row(tmp_path):
    table = tmp_path / "table.md"
    done = _run("--dry-run", "--markdown", str(table), timeout=3000)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    lines = table.read_text().splitlines()
    assert lines[0].startswith("CPU dry run; torch ")
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and not line.startswith(("| check", "|---"))]
    assert [row[0].removeprefix("| ") for row in rows] == ROWS
    for name, result, verdict, _ in rows:
        assert not verdict.startswith("ERROR"), (name, verdict)
        assert result.strip() or verdict.startswith("skip"), name
