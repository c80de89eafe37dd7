"""Every training epoch's randomness is a function of (seed, epoch): why a resumed run matches.

A run killed in epoch 5 and resumed from the checkpoint written at the end of epoch 4 must train
epoch 5 exactly as the uninterrupted run did. The weights, optimizer and schedule come from the
checkpoint; the random draws must not depend on what the process did before epoch 5 (building the
model, earlier epochs, a sanity check). So each epoch starts its random streams afresh from
:func:`epoch_seed`:

- :class:`EpochSeeding` (a callback ``vlm_lab.api`` adds) reseeds Python's ``random``, NumPy and
  torch (every device) in ``on_train_epoch_start``, from the experiment ``seed``: dropout, and the
  caption draws and random crops made in the main process (``num_workers: 0``);
- the training loaders (``vlm_lab.data.epochs.EpochLoader``) reseed their own generator from the
  data module's ``seed`` whenever a pass starts: the shuffle order and the seeds of that pass's
  loader workers, which torch derives from it (workers are started afresh every epoch for that);
- shard streams seed their shard order, shuffle buffer and, inside each loader worker, the worker's
  random streams from (seed, epoch, reader) (``vlm_lab.data.shards``).

Validation and test draw nothing at random.
"""

from __future__ import annotations

import hashlib
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """The seed of epoch ``epoch`` of a run seeded with ``seed`` (``more``: e.g. a reader number).

    A hash, so neighbouring seeds and epochs give unrelated streams; 32 bits, which every generator
    (NumPy's included) accepts.
    """
    text = " ".join(str(int(part)) for part in (seed, epoch, *more))
    return int.from_bytes(hashlib.sha256(f"vlm-lab epoch {text}".encode()).digest()[:4], "little")


def seed_process(seed: int) -> None:
    """Seed this process's Python, NumPy and torch (CPU and every GPU) random streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSeeding(Callback):
    """Reseeds the process from (``seed``, epoch) at the start of every training epoch (module docstring)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank gets its own stream, as seed_everything + distinct data would give.
        seed_process(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank))
