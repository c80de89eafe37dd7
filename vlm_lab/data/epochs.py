"""Training passes that know their epoch and position: seeded by (seed, epoch), resumable mid-epoch.

See ``vlm_lab/seeding.py`` for why every random draw is a function of (seed, epoch, position). Here
are the data-side pieces every data module uses for its training loader:

- :class:`EpochLoader` asks which epoch a pass is for, and how many of its batches were trained
  already, just before the pass starts; it reseeds its generator from the epoch (the shuffle order)
  and skips those batches without loading them (:class:`ResumableBatchSampler` drops their indices;
  a shard stream is told the position instead, ``vlm_lab/data/shards.py``);
- :class:`SampleSeeding` draws each map-style sample's crops (and the caption the collate picks
  after it) from (seed, epoch, sample index), whichever process loads it and whatever it loaded
  before: the batches after a skip are the ones the uninterrupted pass made;
- :class:`TrainingEpochs` answers the epoch-and-position question, also for the first pass of a
  resumed run, and is what the data module keeps in a checkpoint.

Lightning restores a mid-epoch checkpoint's loop counters and goes on from the next batch; it
expects the loader to do the same (its "resumable loader" contract). vlm-lab keeps the position in
the data module's checkpoint state rather than in the loader object: under DDP Lightning rebuilds the
loader with a ``DistributedSampler``, and a data module exists before and across all of that.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Iterable, Iterator

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import BatchSampler, Dataset, IterableDataset, RandomSampler, Sampler, SequentialSampler

from vlm_lab.data.handoff import SlotLoader, WorkerSlots
from vlm_lab.seeding import epoch_seed, seed_process


class SampleSeeding(Dataset):
    """A map-style dataset whose item ``i`` in epoch ``epoch`` draws from ``epoch_seed(seed, epoch, i)``.

    Python's ``random``, NumPy and torch are reseeded before each item is loaded, so its random
    crops, and the caption draw the collate makes after the batch's last item, depend on (seed,
    epoch, indices) only. Before, a loader worker's stream ran on from batch to batch, so a batch's
    draws depended on every batch the worker had made before it: a pass resumed at batch k (a new
    worker, started at batch k) would draw differently. ``epoch`` is set by :class:`EpochLoader`
    before each pass starts its workers.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed_process(epoch_seed(self.seed, self.epoch, index, purpose="sample"))
        return self.dataset[index]


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` that leaves out the first ``skip`` batches of its passes (:class:`EpochLoader`
    sets ``skip`` before each pass: a DataLoader may call ``iter`` on it more than once per pass).

    The indices of the skipped batches are drawn from the sampler (so the order of the rest is the
    uninterrupted pass's) but no sample is loaded. ``len()`` stays the whole pass's: Lightning counts
    a resumed pass's batches from where the checkpoint left off. A ``BatchSampler`` subclass taking
    ``sampler``, so Lightning can rebuild it around a ``DistributedSampler`` under DDP.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self.batches(), self.skip, None)

    def batches(self) -> Iterator[list[int]]:
        """The whole pass's batches (a subclass may deal them otherwise: ``unique_images.py``)."""
        return super().__iter__()


class EpochLoader(SlotLoader):
    """A training DataLoader whose passes are seeded by (``seed``, epoch), counted and resumable.

    Before each pass it calls ``epoch()`` and ``skip()`` (the batches of that pass trained already: 0
    but for a resumed run's first pass), reseeds its generator from ``epoch_seed(seed, epoch)`` (the
    shuffle order, and the seeds torch gives the pass's loader workers) and calls ``start_pass``.
    A map-style dataset is wrapped in :class:`SampleSeeding` and batched by a
    :class:`ResumableBatchSampler`, which leaves the skipped batches out. ``progress`` is ``(epoch,
    batches yielded)`` of the latest pass, skipped ones included. Workers are started afresh for every
    pass unless ``persistent_workers`` (then the dataset must seed its workers itself, as shard streams
    do).

    The DataLoader-style arguments let Lightning rebuild it with a ``DistributedSampler`` under DDP
    (that sampler shuffles by its own seed and the epoch Lightning gives it; Lightning rebuilds the
    batch sampler around it). ``pin_memory`` and ``slots``: see :class:`~vlm_lab.data.handoff.SlotLoader`.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: Callable[[], int], batch_size: int | None = 1,
                 shuffle: bool | None = None, sampler: Sampler | None = None, batch_sampler: Sampler | None = None,
                 num_workers: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None,
                 pin_memory: bool = False, drop_last: bool = False, persistent_workers: bool = False,
                 slots: WorkerSlots | None = None, skip: Callable[[], int] | None = None) -> None:
        generator = torch.Generator()
        if not isinstance(dataset, (IterableDataset, SampleSeeding)):
            # Also when Lightning rebuilds the loader under DDP: it passes the dataset given first.
            dataset = SampleSeeding(dataset, seed)
        if batch_size is not None and batch_sampler is None and not isinstance(dataset, IterableDataset):
            # Map-style and batched by the loader: our batch sampler, which can skip (the arguments
            # DataLoader would have turned into a BatchSampler go into it instead).
            if sampler is None:
                sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
            batch_sampler = ResumableBatchSampler(sampler, batch_size, drop_last)
            batch_size, shuffle, sampler, drop_last = 1, None, None, False
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                         persistent_workers=persistent_workers, slots=slots)
        self.seed, self._epoch_source, self._skip_source = seed, epoch, skip
        self.progress: tuple[int, int] | None = None

    def start_pass(self, epoch: int, skip: int) -> int:
        """Called with the pass's epoch and the batches to skip, before its iterator (and any worker)
        is created; returns how many of the iterator's first batches to drop still (made, but trained
        already). Here: the sample seeds and the batch sampler's skip, which leaves nothing to drop."""
        if isinstance(self.dataset, SampleSeeding):
            self.dataset.epoch = epoch
        sampler = getattr(self.batch_sampler, "sampler", None)
        for seeded in (sampler, self.batch_sampler):
            if hasattr(seeded, "set_epoch"):
                # Lightning's DistributedSampler under DDP (and a batch sampler that deals batches by epoch,
                # data/unique_images.py). Lightning sets a sampler's epoch when an epoch starts, but a
                # resumed run's first pass starts earlier, before Lightning restores its epoch.
                seeded.set_epoch(epoch)
        if isinstance(self.batch_sampler, ResumableBatchSampler):
            self.batch_sampler.skip = skip
        elif skip:
            raise RuntimeError(f"this loader cannot skip the {skip} batch(es) a resumed pass trained already: "
                               f"its batch sampler is a {type(self.batch_sampler).__name__}")
        return 0

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch_source()
        skip = self._skip_source() if self._skip_source is not None else 0
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        drop = self.start_pass(epoch, skip)
        return self._counted(super().__iter__(), epoch, skip, drop)

    def _counted(self, batches: Iterator[Any], epoch: int, skipped: int, drop: int) -> Iterator[Any]:
        self.progress = (epoch, skipped)
        for _ in itertools.islice(batches, drop):
            pass
        for count, batch in enumerate(batches, skipped + 1):
            self.progress = (epoch, count)
            yield batch


class TrainingEpochs:
    """Which epoch each training pass of a data module is for, and where it starts, across a resume.

    With a trainer it is the trainer's epoch, except for the first pass of a resumed run: Lightning
    creates that pass's iterator before it restores its own epoch counter, but after it hands back the
    data module's checkpoint state, which records the epoch and the batches of it trained already
    (``state_dict``): the pass starts there. Without a trainer (a plain loop) passes count up from 0,
    or from ``set_epoch``, and start at their first batch.
    """

    def __init__(self) -> None:
        self._loader: weakref.ref[EpochLoader] | None = None
        self._resumed: tuple[int, int] | None = None
        self._skip = 0
        self._without_trainer = 0
        self._current: int | None = None  # the epoch of the latest pass started

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
        """The epoch of the pass about to start (then :meth:`skip` says where in it it starts)."""
        self._skip = 0
        if self._resumed is not None:
            (epoch, self._skip), self._resumed = self._resumed, None
        elif trainer is not None:
            epoch = trainer.current_epoch
        else:
            epoch = self._without_trainer
            self._without_trainer += 1
        self._current = epoch
        return epoch

    def skip(self) -> int:
        """The batches the pass :meth:`next` just started has to leave out: those trained before the
        checkpoint a run resumed from (0 for every other pass)."""
        skip, self._skip = self._skip, 0
        return skip

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next pass of a plain loop (Lightning sets it itself)."""
        self._without_trainer = epoch

    def state_dict(self, trainer: L.Trainer | None) -> dict[str, Any]:
        """``{"next_epoch": N, "batches_done": K}``: the epoch a resumed run's first pass is for and the
        batches of it trained already (empty before any pass).

        In a fit, K is the batches Lightning's training loop has taken from the loader in this epoch
        (its ``batch_progress``), not the batches the loader made: Lightning fetches one ahead, and
        loader workers prefetch more.
        """
        if trainer is not None and self._current is not None and trainer.state.fn == TrainerFn.FITTING:
            epoch, done = self._current, trainer.fit_loop.epoch_loop.batch_progress.current.ready
            wanted = trainer.num_training_batches
        else:
            loader = self.loader
            if loader is None or loader.progress is None:
                return {}
            (epoch, done), wanted = loader.progress, len(loader)
        if done >= wanted:  # the pass is over (Lightning runs fewer batches with limit_train_batches)
            return {"next_epoch": epoch + 1, "batches_done": 0}
        return {"next_epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "next_epoch" in state_dict:  # checkpoints before mid-epoch resume hold no batches_done
            self._resumed = (state_dict["next_epoch"], state_dict.get("batches_done", 0))
