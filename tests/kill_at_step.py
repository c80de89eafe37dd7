"""Test helper: ``python tests/kill_at_step.py VLM-LAB-ARGUMENTS`` runs the ``vlm-lab`` CLI with one more
registered callback, ``kill_at_step``, for the resume tests.

``callbacks: [{name: kill_at_step, step: K}]`` makes the process SIGKILL itself when training step
K + 1 starts (``trainer.global_step == K``): step K is done and any checkpoint it wrote is on disk,
the next batch is fetched and nothing after is saved, exactly like a node that dies. With
``send: USR1`` (or ``TERM``, ``INT``) it sends itself that signal instead and carries on, as a
cluster's preemption notice arrives while a run trains. Every process of a multi-process run does
the same (SLURM signals every task). With ``during_save: true`` the SIGKILL comes instead while the
first checkpoint of step K is being written: the file is open, the checkpoint half serialised.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from vlm_lab import register_callback
from vlm_lab.cli import main


@register_callback("kill_at_step")
class KillAtStep(Callback):
    """Sends this process signal ``send`` (SIGKILL by default) at the start of the step after step ``step``."""

    def __init__(self, step: int, send: str = "KILL", during_save: bool = False) -> None:
        self.step, self.signum, self.during_save = step, signal.Signals[f"SIG{send}"], during_save

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.during_save:
            self.step = -1  # once
            os.kill(os.getpid(), self.signum)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.global_step == self.step and self.during_save:
            checkpoint["kill"] = KillWhenSaved()  # torch.save pickles it once the file is open


class KillWhenSaved:
    """SIGKILLs the process when pickled."""

    def __reduce__(self) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        return (KillWhenSaved, ())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
