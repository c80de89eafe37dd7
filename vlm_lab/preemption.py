"""Long runs on shared clusters: step checkpoints, and stopping cleanly when preempted.

A run on CC3M-size data spends hours in one epoch, and cluster jobs are preempted or reach their
time limit. Two things keep the work lost small (docs/how-to/resume.md):

- **Step checkpoints** (``checkpoint.every_n_steps`` / ``checkpoint.every_n_minutes``): Lightning's
  ``ModelCheckpoint`` writes ``stepNNNNNNN.ckpt`` (``stepNNNNNNN-timed.ckpt`` for the minutes) and
  refreshes ``last.ckpt``, keeping the newest ``checkpoint.keep``. ``--resume`` continues from
  ``last.ckpt`` exactly, mid-epoch included (the data side: ``vlm_lab/data/epochs.py``; the random
  streams: ``vlm_lab/seeding.py``).
- **Preemption** (:class:`Preemption`, ``checkpoint.on_signal``): SIGTERM and SIGINT (on SLURM:
  the requeue signal, SIGUSR1, and SIGTERM) are only *noted* when they arrive; at the end of the
  step in progress every process writes ``last.ckpt``, on SLURM rank 0 requeues the job with ``scontrol requeue``, and the run
  stops with exit status 75 (``EXIT_PREEMPTED``, sysexits' "temporary failure": a launcher, the
  sweep runner among them, tells it from a finished run and from a failure). The requeued job keeps its run directory (``slurm-<job id>``) and
  resumes from ``last.ckpt`` without ``--resume`` (:func:`requeued_run`).

Why not Lightning's own SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``)? Its handler
writes ``hpc_ckpt_N.ckpt`` inside the signal handler, wherever the training step happens to be (after
the optimizer step but before the loop's counters move, say), so a resume from it may train a batch
twice or not at all. Here the handler only sets a flag; the checkpoint is taken at a step boundary,
where the loop counters, the weights and the data position agree.

Every checkpoint is written atomically (:class:`AtomicCheckpointIO`): a second signal, or a kill,
during a write leaves the previous checkpoint loadable. A handler for the requeue signal
registered before Lightning's keeps Lightning from adding its own (Lightning adds one only where
none exists); SIGTERM handlers Lightning chains after its own, which only notes the signal too.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vlm_lab.distributed import slurm_job_id
from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.schema import CheckpointSettings

log = logging.getLogger(__name__)

# The signal SLURM sends before the time limit with `#SBATCH --signal=USR1@90`.
REQUEUE_SIGNAL = signal.SIGUSR1
# The exit status of a run stopped by a signal after its checkpoint (sysexits.h's EX_TEMPFAIL).
EXIT_PREEMPTED = 75


def step_checkpoints(settings: CheckpointSettings, dirpath: Path) -> list[ModelCheckpoint]:
    """Lightning ``ModelCheckpoint`` callbacks for ``settings``' step checkpoints (none when off).

    Each writes a checkpoint at the end of a training step and refreshes ``last.ckpt``; it keeps the
    newest ``keep`` of its own (it monitors the global step, largest best). Lightning takes steps and
    minutes in separate callbacks, so setting both gives two, and their files have different names:
    ``stepNNNNNNN.ckpt`` (every N steps) and ``stepNNNNNNN-timed.ckpt`` (every T minutes). With one name,
    a step where both fire would give both callbacks the same file, and the timed one, which removes
    its older files, would delete a checkpoint the other still counts among its ``keep``.
    """
    triggers: list[tuple[str, dict[str, Any]]] = []
    if settings.every_n_steps:
        triggers.append(("step{step:07d}", {"every_n_train_steps": settings.every_n_steps}))
    if settings.every_n_minutes:
        interval = datetime.timedelta(minutes=settings.every_n_minutes)
        triggers.append(("step{step:07d}-timed", {"train_time_interval": interval}))
    return [ModelCheckpoint(dirpath=str(dirpath), filename=filename, auto_insert_metric_name=False,
                            monitor="step", mode="max", save_top_k=settings.keep, save_last=True,
                            save_on_train_epoch_end=False, enable_version_counter=False, **trigger)
            for filename, trigger in triggers]


def best_checkpoint(settings: CheckpointSettings, dirpath: Path) -> list[ModelCheckpoint]:
    """The ``ModelCheckpoint`` that keeps ``checkpoints/best.ckpt`` by ``checkpoint.monitor`` (none when unset)."""
    if settings.monitor is None:
        return []
    return [BestCheckpoint(settings.monitor, settings.mode or "max", dirpath)]


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` keeping the single best checkpoint by a validation metric, as
    ``best.ckpt`` (one stable name to evaluate or export), checked once validations have run.

    Lightning raises for a monitored key that was never logged with a long message about ``log()``;
    here a misspelt metric is one line naming the metrics the run does log (and the closest), at the
    end of the first validation. A run that never validates keeps no best checkpoint, and says so.
    """

    def __init__(self, monitor: str, mode: str, dirpath: Path) -> None:
        super().__init__(dirpath=str(dirpath), filename="best", monitor=monitor, mode=mode, save_top_k=1,
                         auto_insert_metric_name=False, enable_version_counter=False, save_on_train_epoch_end=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.monitor not in trainer.callback_metrics:
            # The training metrics (gradient norms per layer...) would drown the list; they count as valid.
            logged = sorted(key for key in trainer.callback_metrics if not key.startswith("train/"))
            raise ConfigError(f"checkpoint.monitor={self.monitor!r} is not a metric this run logs; validation "
                              f"logs {', '.join(logged) or 'nothing'}."
                              f"{did_you_mean(self.monitor, trainer.callback_metrics)}")
        super().on_validation_end(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.best_model_path:
            log.warning("checkpoint.monitor=%s: no validation ran, so no best checkpoint was kept", self.monitor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on every file system: a kill during a write leaves
    the previous checkpoint under its name.

    Lightning's own writer (``_atomic_save``) goes through an fsspec transaction, whose temporary
    file lies in the system's temporary folder: when that is another file system than the run's
    (a node's local /tmp, runs on a shared one, as on most clusters) the final move is a copy, and a
    kill during the copy leaves a truncated checkpoint. Here the temporary file is a hidden sibling of
    the checkpoint (``.NAME.partial-PID``), flushed to disk and then renamed over it with
    ``os.replace``, which is atomic within a file system. Remote paths (``s3://...``) keep Lightning's
    writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def on_slurm() -> bool:
    """Whether this process is a SLURM batch job's (Lightning's test: not an interactive ``srun bash``)."""
    return SLURMEnvironment.detect()


def requeued_run() -> bool:
    """Whether this process belongs to a SLURM job that was requeued (SLURM counts restarts in
    ``SLURM_RESTART_COUNT``): then ``vlm_lab.fit`` resumes from the run's ``last.ckpt`` by itself."""
    return on_slurm() and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


class Preemption(Callback):
    """Checkpoint at the end of the current step when a stop signal arrives, then stop (module docstring).

    Args:
        last: where the checkpoint goes (the run's ``last.ckpt``, which ``--resume`` reads).
        requeue: on SLURM, requeue the job after the checkpoint (``scontrol requeue``).
    """

    def __init__(self, last: Path, requeue: bool | None = None) -> None:
        self.last = Path(last)
        self.slurm = on_slurm() if requeue is None else requeue
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        return (REQUEUE_SIGNAL, signal.SIGTERM) if self.slurm else (signal.SIGTERM, signal.SIGINT)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Called before Lightning registers its own handlers (Trainer._run), which then chain to ours.
        if stage != "fit":
            return
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._note)
            except ValueError:  # not the main thread (a notebook's worker thread): no signals there
                return

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the checkpoint is written at the end of the step (a second signal changes nothing).
        if self.received is None:
            self.received = signum
            log.warning("received %s: writing a checkpoint at the end of this step, then stopping",
                        signal.Signals(signum).name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        received = self.received is not None
        if trainer.world_size > 1:  # every process stops at the same step, whichever got the signal
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        trainer.save_checkpoint(str(self.last))  # every process takes part (sharded strategies need them all)
        if self.slurm and trainer.is_global_zero:
            self._requeue()
        # Lightning passes the exit on after its own clean-up (callbacks' on_exception, teardown).
        raise SystemExit(EXIT_PREEMPTED)

    def _requeue(self) -> None:
        job = slurm_job_id()
        result = subprocess.run(["scontrol", "requeue", job], check=False)
        if result.returncode == 0:
            log.warning("requeued SLURM job %s; it resumes from %s", job, self.last)
        else:
            log.error("scontrol requeue %s failed (exit status %d); resume by hand with --resume",
                      job, result.returncode)


# What a process that runs `vlm-lab fit` as a child (a sweep's SLURM job) passes on, and as what:
# SLURM's warning signal, whichever the job asked for (submitit's `--signal=USR2@...` by default,
# or USR1), becomes the requeue signal; SIGTERM stays SIGTERM.
FORWARDED = {signal.SIGUSR1: REQUEUE_SIGNAL, signal.SIGUSR2: REQUEUE_SIGNAL, signal.SIGTERM: signal.SIGTERM}


@contextmanager
def forwarded_signals(child: subprocess.Popen) -> Iterator[None]:
    """While in the block, SLURM's preemption signals to this process go to ``child`` (``FORWARDED``).

    Only the main thread can take signals; elsewhere (a local sweep's worker threads) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(FORWARDED[signal.Signals(signum)])

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
