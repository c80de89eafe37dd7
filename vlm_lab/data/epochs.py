"""Training passes that know their epoch: seeded by (seed, epoch), and resumable at epoch boundaries.

See ``vlm_lab/seeding.py`` for why every epoch's randomness is a function of (seed, epoch). Here are
the two data-side pieces every data module uses for its training loader:

- :class:`EpochLoader` asks which epoch a pass is for just before the pass starts, reseeds its
  generator from it and counts the batches it yields;
- :class:`TrainingEpochs` answers that question, also for the first pass of a resumed run, and is
  what the data module keeps in a checkpoint.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch.utils.data import Dataset, Sampler

from vlm_lab.data.handoff import SlotLoader, WorkerSlots
from vlm_lab.seeding import epoch_seed


class EpochLoader(SlotLoader):
    """A training DataLoader whose passes are seeded by (``seed``, epoch) and counted.

    Before each pass it calls ``epoch()``, reseeds its generator from ``epoch_seed(seed, epoch)`` (the
    shuffle order, and the seeds torch gives the pass's loader workers) and calls ``start_pass``.
    ``progress`` is ``(epoch, batches yielded)`` of the latest pass. Workers are started afresh for every
    pass unless ``persistent_workers`` (then the dataset must seed its workers itself, as shard streams
    do), so each epoch's workers draw from that epoch's seeds.

    The DataLoader-style arguments let Lightning rebuild it with a ``DistributedSampler`` under DDP
    (that sampler shuffles by its own seed and the epoch Lightning gives it). ``pin_memory`` and
    ``slots``: see :class:`~vlm_lab.data.handoff.SlotLoader`.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: Callable[[], int], batch_size: int | None = 1,
                 shuffle: bool | None = None, sampler: Sampler | None = None, batch_sampler: Sampler | None = None,
                 num_workers: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None,
                 pin_memory: bool = False, drop_last: bool = False, persistent_workers: bool = False,
                 slots: WorkerSlots | None = None) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         pin_memory=pin_memory, drop_last=drop_last, generator=torch.Generator(),
                         persistent_workers=persistent_workers, slots=slots)
        self.seed, self._epoch_source = seed, epoch
        self.progress: tuple[int, int] | None = None

    def start_pass(self, epoch: int) -> None:
        """Called with the pass's epoch before its iterator (and any worker) is created."""

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch_source()
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.start_pass(epoch)
        return self._counted(super().__iter__(), epoch)

    def _counted(self, batches: Iterator[Any], epoch: int) -> Iterator[Any]:
        self.progress = (epoch, 0)
        for count, batch in enumerate(batches, 1):
            self.progress = (epoch, count)
            yield batch


class TrainingEpochs:
    """Which epoch each training pass of a data module is for, across a resume.

    With a trainer it is the trainer's epoch, except for the first pass of a resumed run: Lightning
    creates that pass's iterator before it restores its own epoch counter, but after it hands back the
    data module's checkpoint state, which records the next epoch (``state_dict``). Without a trainer
    (a plain loop) passes count up from 0, or from ``set_epoch``.
    """

    def __init__(self) -> None:
        self._loader: weakref.ref[EpochLoader] | None = None
        self._resumed: int | None = None
        self._without_trainer = 0

    @property
    def loader(self) -> EpochLoader | None:
        """The training loader, whose progress a checkpoint keeps (None before one is built or once it is gone)."""
        return None if self._loader is None else self._loader()

    @loader.setter
    def loader(self, loader: EpochLoader | None) -> None:
        # Held weakly. The loader asks the data module for each pass's epoch, so a strong reference
        # back would make a cycle, which only Python's cycle collector frees, and it closes the
        # loader's worker queues first: PyTorch then waits 5 s for each persistent worker to stop
        # before it kills it, at whatever moment the collector runs.
        self._loader = None if loader is None else weakref.ref(loader)

    def next(self, trainer: L.Trainer | None) -> int:
        """The epoch of the pass about to start."""
        if self._resumed is not None:
            epoch, self._resumed = self._resumed, None
            return epoch
        if trainer is not None:
            return trainer.current_epoch
        epoch = self._without_trainer
        self._without_trainer += 1
        return epoch

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next pass of a plain loop (Lightning sets it itself)."""
        self._without_trainer = epoch

    def state_dict(self, trainer: L.Trainer | None) -> dict[str, Any]:
        """``{"next_epoch": N}``: the epoch a resumed run's first pass is for (empty before any pass)."""
        loader = self.loader
        if loader is None or loader.progress is None:
            return {}
        epoch, batches = loader.progress
        # The pass is over once it yielded every batch Lightning runs (fewer with limit_train_batches).
        wanted = len(loader) if trainer is None else min(len(loader), trainer.num_training_batches)
        return {"next_epoch": epoch + 1 if batches >= wanted else epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = state_dict.get("next_epoch")
