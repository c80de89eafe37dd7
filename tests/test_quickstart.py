"""The README's main command, as a user runs it: the quickstart CLIP must beat 20% i2t R@1."""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLM_LAB = str(Path(sys.executable).parent / "vlm-lab")


def test_quickstart_trains_to_20_percent_r1_within_5_minutes(tmp_path):
    start = time.monotonic()
    run = subprocess.run([VLM_LAB, "fit", "experiments/quickstart.yaml", "--run-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    print(f"quickstart: {elapsed:.0f} s, i2t R@1 {metrics['val/i2t_R@1']:.1f}% "
          f"(chance {metrics['val/chance_i2t_R@1']:.2f}%), t2i R@1 {metrics['val/t2i_R@1']:.1f}%")
    assert metrics["val/i2t_R@1"] >= 20.0
    assert metrics["val/chance_i2t_R@1"] < 1.0
    assert metrics["epoch"] == 3  # all four epochs ran
    assert "val/i2t_R@1" in run.stdout and "chance" in run.stdout  # the closing table
    assert elapsed < 300
