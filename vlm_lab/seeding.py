"""A run's randomness is a function of (seed, epoch, position): why a resumed run matches.

A run killed in the middle of epoch 5 and resumed from a checkpoint written at step k of it must go
on exactly as the uninterrupted run did. The weights, optimizer and schedule come from the
checkpoint; the random draws must not depend on what the process did before (building the model,
earlier epochs and steps, a sanity check, batches a loader worker made ahead). So every random
stream starts afresh from :func:`epoch_seed` at a point a resumed run reaches too:

- :class:`EpochSeeding` (a callback ``vlm_lab.api`` adds) reseeds Python's ``random``, NumPy and
  torch (every device) at the start of every training epoch and of every training step, from the
  experiment ``seed``, the epoch, the rank and the step's batch index: dropout and anything else the
  step draws;
- map-style training data (``vlm_lab.data.epochs``) shuffles with a generator seeded by (``data.seed``,
  epoch), and draws each sample's crops and caption from (``data.seed``, epoch, sample index)
  (:class:`~vlm_lab.data.epochs.SampleSeeding`), in whichever process loads it;
- shard streams seed their shard order and shuffle buffer from (seed, epoch, reader) and each
  sample's draws from (seed, epoch, reader, sample number) (``vlm_lab.data.shards``).

So a resumed run needs no saved random state: the data side skips the batches already trained
(``vlm_lab/data/epochs.py``) and every later draw is the one the uninterrupted run made. Validation
and test draw nothing at random.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def epoch_seed(seed: int, epoch: int, *more: int, purpose: str = "epoch") -> int:
    """The seed of epoch ``epoch`` of a run seeded with ``seed`` (``more``: e.g. a reader number).

    A hash, so neighbouring seeds and epochs give unrelated streams; 32 bits, which every generator
    (NumPy's included) accepts. ``purpose`` keeps streams with the same numbers apart (a sample's
    draws, ``"sample"``, from a step's, ``"step"``).
    """
    text = " ".join(str(int(part)) for part in (seed, epoch, *more))
    return int.from_bytes(hashlib.sha256(f"vlm-lab {purpose} {text}".encode()).digest()[:4], "little")


def seed_process(seed: int) -> None:
    """Seed this process's Python, NumPy and torch (CPU and every GPU) random streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSeeding(Callback):
    """Reseeds the process from (``seed``, epoch) at the start of every training epoch, and from
    (``seed``, epoch, batch index) before every training step (module docstring)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank gets its own stream, as seed_everything + distinct data would give.
        seed_process(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # A step resumed from a mid-epoch checkpoint draws its dropout as the uninterrupted run did,
        # with no random state saved: the loader (which may run ahead) draws from its own seeds.
        seed_process(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank, batch_idx, purpose="step"))
