"""Bad samples: skipped, counted, and reported once per epoch.

Real datasets have broken files: a truncated JPEG, a sample without its caption, an empty caption.
The data modules skip such samples rather than crash a week-long run, and they never skip silently:

- every skip increments a :class:`BadSampleCounter` (shared memory, so the DataLoader worker
  processes that find the bad samples and the main process that reports them see one count), and
  the first few per process are logged with the file and the reason;
- :class:`BadSampleReport`, a callback the data modules attach to their trainer, logs each epoch's
  count as ``train/bad_samples`` / ``val/bad_samples`` / ``test/bad_samples`` (summed over
  processes, 0 included) and prints a warning line with the reasons when it is not zero.

This file is the one place that logs them.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

REASONS = (
    "missing image",
    "undecodable image",
    "missing caption",
    "empty caption",
    "undecodable caption",  # bytes that are not UTF-8
    "duplicate id",  # a later image entry with an id already taken (the first one is used)
    "unreadable shard data",
)

# Per process and counter: enough lines to find the broken files, few enough not to flood the log.
DETAILED_WARNINGS = 5


class BadSampleCounter:
    """Counts skipped samples of one split by reason, across DataLoader worker processes.

    The counts live in a shared-memory tensor that worker processes inherit, forked or spawned. Each
    process writes only its own row (the main process row 0, loader worker ``i`` row ``i + 1``), so
    no lock is needed and none has to be pickled. ``take()`` returns the counts since the previous
    ``take()``: one epoch's worth when the report calls it at every epoch end.
    """

    ROWS = 257  # the main process and up to 256 loader workers per split

    def __init__(self, split: str) -> None:
        self.split = split
        self._counts = torch.zeros(self.ROWS, len(REASONS), dtype=torch.int64).share_memory_()
        self._taken = torch.zeros(len(REASONS), dtype=torch.int64)  # what take() has returned so far
        self._warned = 0  # per process: each worker has its own copy

    def record(self, reason: str, where: str, count: int = 1) -> None:
        """Count ``count`` skipped samples (one, unless a damaged shard lost several at once); ``where``
        names them (file, shard and key) in the log."""
        worker = get_worker_info()
        row = 0 if worker is None else 1 + worker.id % (self.ROWS - 1)
        self._counts[row, REASONS.index(reason)] += count
        if self._warned < DETAILED_WARNINGS:
            self._warned += 1
            more = " (further ones are only counted)" if self._warned == DETAILED_WARNINGS else ""
            log.warning("skipped a bad %s sample: %s: %s%s", self.split, reason, where, more)

    def take(self) -> dict[str, int]:
        """The counts since the last ``take()``, by reason (zeros left out), and start afresh."""
        total = self._counts.sum(0)
        counts = self._by_reason(total - self._taken)
        self._taken = total
        return counts

    @staticmethod
    def _by_reason(counts: torch.Tensor) -> dict[str, int]:
        return {reason: int(n) for reason, n in zip(REASONS, counts.tolist()) if n}


class BadSampleReport(Callback):
    """Logs each epoch's bad-sample count of the trainer's data module (see the module docstring).

    It reads ``trainer.datamodule.bad_samples``, a dict of :class:`BadSampleCounter` by split; data
    modules without one are ignored.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        counters = getattr(trainer.datamodule, "bad_samples", None)
        if not counters or split not in counters:
            return
        counts = counters[split].take()
        total = sum(counts.values())
        if total:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in counts.items())
            log.warning("%s epoch %d: skipped %d bad sample(s) (%s)", split, trainer.current_epoch, total, reasons)
        if not trainer.sanity_checking:
            pl_module.log(f"{split}/bad_samples", float(total), reduce_fx="sum", sync_dist=True)


def attach_report(trainer: L.Trainer | None) -> None:
    """Add a :class:`BadSampleReport` to ``trainer`` unless it has one.

    The data modules call this from ``setup``, so the count is reported with any Trainer, including
    one a notebook builds by hand.
    """
    if trainer is not None and not any(isinstance(c, BadSampleReport) for c in trainer.callbacks):
        trainer.callbacks.append(BadSampleReport())
