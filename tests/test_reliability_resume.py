"""A run killed with SIGKILL in the middle of an epoch and resumed with ``--resume`` ends where an
uninterrupted run with the same seed ends (vlm_lab/seeding.py; README: Reliability).

Three ``vlm-lab fit`` processes on the tiny config: one uninterrupted, one killed in its second epoch
(after the first epoch's checkpoint exists), and ``--resume`` in the killed run's directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
OVERRIDES = ["trainer.max_epochs=2", "data.train_size=256"]  # two epochs of 16 steps
STEPS_PER_EPOCH = 16

# The run to kill is `vlm-lab fit` whose training step, once it reaches step KILL_AT of the second
# epoch, says so in a file and waits: the kill then lands mid-epoch however fast the machine is.
KILL_AT = 5
PAUSING_FIT = """
import sys, time
from pathlib import Path
from vlm_lab.cli import main
from vlm_lab.module import VisionLanguageModule

step = VisionLanguageModule.training_step
marker = Path(sys.argv[1])

def training_step(self, batch, batch_idx):
    if self.current_epoch == 1 and batch_idx == {kill_at}:
        marker.write_text(str(self.global_step))
        time.sleep(3600)
    return step(self, batch, batch_idx)

VisionLanguageModule.training_step = training_step
sys.exit(main(sys.argv[2:]))
""".format(kill_at=KILL_AT)


def fit_arguments(run_dir: Path, *extra: str) -> list[str]:
    return ["fit", str(TINY), "--run-dir", str(run_dir), *extra, *OVERRIDES]


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def fit(run_dir: Path, *extra: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "vlm_lab.cli", *fit_arguments(run_dir, *extra)],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def fit_and_kill_mid_epoch(run_dir: Path, timeout: float = 300) -> int:
    """Start a fit, SIGKILL it at step KILL_AT of its second epoch; return the global step it was at."""
    marker = run_dir.parent / f"{run_dir.name}.paused"
    child = subprocess.Popen([sys.executable, "-c", PAUSING_FIT, str(marker), *fit_arguments(run_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    try:
        deadline = time.monotonic() + timeout
        while not marker.is_file():
            if child.poll() is not None:
                raise AssertionError(f"the fit ended before it was killed:\n{child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the fit did not reach its second epoch in time")
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        return int(marker.read_text())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = fit(tmp_path / "uninterrupted")

    killed = tmp_path / "killed"
    step = fit_and_kill_mid_epoch(killed)
    assert step == STEPS_PER_EPOCH + KILL_AT  # five steps into the second epoch
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["epoch000.ckpt", "last.ckpt"], checkpoints  # only the first epoch's

    resumed = fit(killed, "--resume")
    assert (resumed["epoch"], resumed["step"]) == (uninterrupted["epoch"], uninterrupted["step"]) == (1, 32)
    keys = sorted(k for k in uninterrupted if k.startswith("val/"))
    assert "val/loss" in keys and "val/i2t_R@1" in keys
    for key in keys:
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-4), key
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["epoch001.ckpt", "last.ckpt"]
