"""Preemption: a signal makes ``vlm-lab fit`` checkpoint at the end of the step and stop; on SLURM the job
requeues itself and the requeued run resumes exactly, without ``--resume``; a kill during a checkpoint
write leaves the previous checkpoint loadable (vlm_lab/preemption.py, docs/how-to/resume.md).

SLURM is imitated: its variables in the child's environment and an ``scontrol`` on ``PATH`` that writes
down its arguments. The one-process requeue and the sweep compare with one shared uninterrupted run
(``UninterruptedRuns``, tests/test_resume_mid_epoch.py).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed_nonfinite import _free_port
from test_resume_mid_epoch import (STEPS, TINY, assert_same_run, child_env, data_overrides, finish, reaped, resume_here,
                                   start)
# The module-scoped fixture of shared uninterrupted runs: imported, this module gets an instance of its own.
from test_resume_mid_epoch import uninterrupted  # noqa: F401
from vlm_lab import sweep
from vlm_lab.preemption import EXIT_PREEMPTED, forwarded_signals

HERE = Path(__file__).parent
# Synthetic shapes, no loader workers, one process, seed 0 (the default): the run that a requeued one-task
# job and a resumed sweep run both end equal to.
ONE_PROCESS = data_overrides(Path("unused"), "synthetic_shapes", 0, 0)


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """SLURM's variables for a one-task batch job 4242, and a stub scontrol that logs its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    variables = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
                 "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    env = child_env(**{**variables, **extra})
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


def slurm_tasks(tmp_path: Path, tasks: int, **extra: str) -> list[dict[str, str]]:
    """The environments of the ``tasks`` tasks that ``srun`` starts for job 4242 on one node: one gloo group."""
    port = str(_free_port())
    return [slurm_env(tmp_path, SLURM_NTASKS=str(tasks), SLURM_NTASKS_PER_NODE=str(tasks), SLURM_PROCID=str(task),
                      SLURM_LOCALID=str(task), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
            for task in range(tasks)]


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [1, 2])
def test_sigusr1_on_slurm_checkpoints_requeues_once_and_the_requeued_job_resumes_exactly(tmp_path, uninterrupted,
                                                                                          tasks):
    # SLURM signals every task; the tasks agree on the step, rank 0 alone requeues the job.
    overrides = data_overrides(tmp_path, "synthetic_shapes", 0, 0, processes=tasks)
    # The job runs in tmp_path without --run-dir: its run directory is named after the job.
    run_dir = tmp_path / "work" / "runs" / "tiny" / "slurm-4242"
    (tmp_path / "work").mkdir()
    with reaped() as children:
        if tasks == 1:
            uninterrupted.start(ONE_PROCESS)
        else:  # Lightning launches the 2 processes
            children.append(start(tmp_path / "uninterrupted", overrides))
        signalled = [_start_in(tmp_path / "work", overrides, "callbacks=[{name: kill_at_step, step: 13, send: USR1}]",
                               env=env) for env in slurm_tasks(tmp_path, tasks)]
        children += signalled
        for task in signalled:
            finish(task, EXIT_PREEMPTED)
        # The signal came as step 14 started: its checkpoint is the end of step 14.
        assert global_step(run_dir / "checkpoints" / "last.ckpt") == 14
        assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # once, not once per task
        requeued = [_start_in(tmp_path / "work", overrides, env=env)
                    for env in slurm_tasks(tmp_path, tasks, SLURM_RESTART_COUNT="1")]
        children += requeued
        for child in requeued:
            finish(child)
        if tasks == 1:
            reference = uninterrupted.finished(ONE_PROCESS)
        else:
            finish(children[0])
            reference = tmp_path / "uninterrupted"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert_same_run(run_dir, reference)


def _start_in(cwd: Path, overrides: list[str], *extra: str, env: dict[str, str]) -> subprocess.Popen:
    """``vlm-lab fit`` in ``cwd`` with no ``--run-dir``, as a SLURM job script runs it."""
    return subprocess.Popen([sys.executable, str(HERE / "kill_at_step.py"), "fit", str(TINY), *STEPS, *overrides,
                             *extra], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("send", ["TERM", "INT"])
def test_sigterm_or_sigint_outside_slurm_checkpoint_the_step_and_stop(tmp_path, send):
    overrides = data_overrides(tmp_path, "synthetic_shapes", 0, 0)
    child = start(tmp_path / "run", overrides, f"callbacks=[{{name: kill_at_step, step: 5, send: {send}}}]")
    assert "Traceback" not in finish(child, EXIT_PREEMPTED)
    assert global_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 6


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    overrides = data_overrides(tmp_path, "synthetic_shapes", 0, 0)
    killed = start(tmp_path / "run", overrides, "callbacks=[{name: kill_at_step, step: 12, during_save: true}]")
    finish(killed, -signal.SIGKILL)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert global_step(checkpoints / "last.ckpt") == 9  # the previous step checkpoint, whole
    assert not (checkpoints / "step0000012.ckpt").exists()
    resume_here(tmp_path / "run", overrides)
    assert global_step(checkpoints / "last.ckpt") == 16


class KillableRun(sweep.Run):
    """A sweep run whose fit also knows the ``kill_at_step`` callback: tests/kill_at_step.py runs it."""

    def command(self, run_dir: Path, resume: bool) -> list[str]:
        python, _, _, *arguments = super().command(run_dir, resume)  # python -m vlm_lab.cli ARGUMENTS
        return [python, str(HERE / "kill_at_step.py"), *arguments]


def run_killable(run_: sweep.Run, run_dir: Path, env: dict[str, str]) -> sweep.Outcome:
    """The local launcher's runner (``sweep.run_one``), on a :class:`KillableRun`."""
    return sweep.run_one(KillableRun(run_.name, run_.base, run_.overrides, run_.configs, run_.swept), run_dir, env)


@pytest.mark.slow
def test_a_preempted_sweep_run_is_recorded_and_the_next_sweep_resumes_it_exactly(tmp_path, uninterrupted):
    overrides = [*ONE_PROCESS, "seed=0"]  # the sweep's one run sets the default seed
    uninterrupted.start(ONE_PROCESS)
    file = tmp_path / "sweep.yaml"  # the fit gets SIGTERM as step 14 starts (as SLURM's signal reaches it)
    file.write_text(json.dumps({"base": [str(TINY)], "runs": [["seed=0"]], "overrides": [
        *STEPS, *overrides, "callbacks=[{name: kill_at_step, step: 13, send: TERM}]"]}))
    out, run_dir = tmp_path / "out", tmp_path / "out" / "seed=0"
    [outcome] = sweep.run(file, out, runner=run_killable)
    assert outcome.status == "preempted", (run_dir / "log.txt").read_text()[-3000:]
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 14  # the run directory is kept
    assert not (run_dir / "DONE").exists() and not (run_dir / "FAILED").exists()
    assert [row["status"] for row in sweep.collect(out)] == ["preempted"]
    [outcome] = sweep.run(file, out, runner=run_killable)  # the sweep again: resumes from the checkpoint
    assert outcome.status == "done", (run_dir / "log.txt").read_text()[-3000:]
    assert "resuming seed=0" in (run_dir / "log.txt").read_text()
    assert [row["status"] for row in sweep.collect(out)] == ["done"]
    assert_same_run(run_dir, uninterrupted.finished(ONE_PROCESS))


def test_a_sweep_job_forwards_slurms_warning_signal_to_its_fit(tmp_path):
    # A sweep's SLURM job runs `vlm-lab fit` as a child (vlm_lab/sweep.py, run_one): submitit's SIGUSR2
    # (or SIGUSR1) reaches the child as SIGUSR1, the signal vlm-lab checkpoints and requeues on.
    got = tmp_path / "got"
    child = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, signal, sys, time\n"
        "got = pathlib.Path(sys.argv[1])\n"
        "signal.signal(signal.SIGUSR1, lambda s, f: got.write_text(signal.Signals(s).name))\n"
        "got.with_suffix('.ready').touch()\n"
        "while not got.exists(): time.sleep(0.01)\n"), str(got)])
    try:
        while not got.with_suffix(".ready").exists():
            assert child.poll() is None
        before = signal.getsignal(signal.SIGUSR2)
        with forwarded_signals(child):
            os.kill(os.getpid(), signal.SIGUSR2)
            assert child.wait(timeout=60) == 0
        assert got.read_text() == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR2) is before  # handlers put back
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
