"""Training batches in which no image appears twice (``data.unique_images_per_batch``).

With ``train_sampling: caption`` every caption is an entry of the epoch, so a shuffled batch holds
two captions of one image now and then, and a one-positive contrastive loss scores each as the
other's negative (a false negative). :class:`UniqueImageBatchSampler` deals the entries into batches
so that every batch's images are distinct, while keeping what the shuffled sampler gives:

* every entry once per epoch, but for fewer than one (global) batch left over, as ``drop_last`` does;
  which entries are left over changes with the epoch;
* the batches of epoch ``e`` are a function of (seed, e) alone, so a pass resumed at batch k yields
  the uninterrupted pass's batches from k on (it is a ``ResumableBatchSampler``);
* under data parallelism the images are distinct across the whole *global* batch (every rank's share
  together): every rank deals the same global batches and takes its own slice of each. Lightning
  rebuilds the batch sampler around a ``DistributedSampler``; only that sampler's rank and world
  size are read, never its order.

The dealing: the entries in a random order fill batch after batch, an entry whose image the batch
holds already waiting for the next batch (:func:`unique_image_batches`). Near the end of a pass the
waiting entries may not fill the last batches on their own; each one left is then swapped with an
entry of an earlier batch where neither image repeats.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Iterator, Sequence

from torch.utils.data import DistributedSampler, Sampler

from vlm_lab.data.epochs import ResumableBatchSampler
from vlm_lab.errors import ConfigError
from vlm_lab.seeding import epoch_seed


def unique_image_batches(images: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """``len(images) // batch_size`` batches of entry indices, no image twice in a batch, no entry twice.

    ``images[i]`` is the image of entry ``i``. The order is drawn from ``random.Random(seed)``. Raises
    ``ConfigError`` when no such batches exist: fewer distinct images than ``batch_size``, or an image
    with more entries than there are batches.
    """
    count = len(images) // batch_size
    _check_possible(images, batch_size, count)
    rng = random.Random(seed)
    order = list(range(len(images)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    held: set[int] = set()
    waiting: list[int] = []
    for entry in order:
        if len(batches) == count:
            break
        if images[entry] in held:
            waiting.append(entry)  # its image is in this batch already: the next batch takes it first
            continue
        current.append(entry)
        held.add(images[entry])
        while len(current) == batch_size and len(batches) < count:
            batches.append(current)
            current, held, waiting = _start_batch(waiting, images, batch_size)
    # Too few distinct images left among the remaining entries to fill the last batches on their own.
    placed = set(itertools.chain.from_iterable(batches))
    leftovers = [entry for entry in order if entry not in placed]
    while len(batches) < count:
        batches.append(_repair(leftovers, batches, images, batch_size, rng))
    return batches


def _start_batch(waiting: list[int], images: Sequence[int], batch_size: int) -> tuple[list[int], set[int], list[int]]:
    """A new batch begun with the waiting entries it can take (in their order), and those still waiting."""
    current: list[int] = []
    held: set[int] = set()
    still: list[int] = []
    for entry in waiting:
        if images[entry] not in held and len(current) < batch_size:
            current.append(entry)
            held.add(images[entry])
        else:
            still.append(entry)
    return current, held, still


def _repair(leftovers: list[int], batches: list[list[int]], images: Sequence[int], batch_size: int,
            rng: random.Random) -> list[int]:
    """One more batch from ``leftovers`` (consumed): its entries of distinct images, then each entry
    whose image it holds already swapped with an entry of an earlier batch where neither repeats."""
    batch: list[int] = []
    held: set[int] = set()
    clashing: list[int] = []
    while leftovers and len(batch) + len(clashing) < batch_size:
        entry = leftovers.pop(0)
        if images[entry] in held:
            clashing.append(entry)
        else:
            batch.append(entry)
            held.add(images[entry])
    for entry in clashing:
        for index in rng.sample(range(len(batches)), len(batches)):
            other = batches[index]
            other_images = {images[e] for e in other}
            if images[entry] in other_images:
                continue
            swap = next((position for position, e in enumerate(other) if images[e] not in held), None)
            if swap is not None:
                batch.append(other[swap])
                held.add(images[other[swap]])
                other[swap] = entry
                break
        else:  # cannot happen when _check_possible passed, short of a bug: say so rather than repeat an image
            raise RuntimeError(f"unique_image_batches: no batch could take an entry of image {images[entry]}")
    return batch


def _check_possible(images: Sequence[int], batch_size: int, count: int) -> None:
    distinct = Counter(images)
    if len(distinct) < batch_size:
        raise ConfigError(f"data.unique_images_per_batch: a batch of {batch_size} needs {batch_size} different "
                          f"images, but the training split has {len(distinct)}")
    image, most = distinct.most_common(1)[0]
    if most > count:
        raise ConfigError(f"data.unique_images_per_batch: image {image} has {most} training entries but an epoch has "
                          f"only {count} batches of {batch_size}, so one would hold it twice; lower data.batch_size")


class UniqueImageBatchSampler(ResumableBatchSampler):
    """A resumable batch sampler whose (global) batches never hold one image twice (module docstring).

    Args:
        sampler: the dataset's sampler, whose order is not used. Under DDP Lightning puts a
            ``DistributedSampler`` here; its ``rank`` and ``num_replicas`` say which slice of each
            global batch this process takes.
        batch_size: entries per batch on this process.
        drop_last: must be true: the entries left over (fewer than one global batch) are not used.
        images: the image of each entry of the dataset (equal numbers: entries of one image).
        seed: with the epoch (``set_epoch``), fixes the pass's batches.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, images: Sequence[int],
                 seed: int) -> None:
        if not drop_last:
            raise ValueError("UniqueImageBatchSampler deals whole batches only: drop_last must be true")
        super().__init__(sampler, batch_size, drop_last)
        self.images, self.seed, self.epoch = list(images), seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (``EpochLoader`` sets it before each pass)."""
        self.epoch = epoch

    def _world(self) -> tuple[int, int]:
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.rank, self.sampler.num_replicas
        return 0, 1

    def __len__(self) -> int:
        return len(self.images) // (self.batch_size * self._world()[1])

    def batches(self) -> Iterator[list[int]]:
        rank, world = self._world()
        seed = epoch_seed(self.seed, self.epoch, purpose="unique_images")
        for batch in unique_image_batches(self.images, self.batch_size * world, seed):
            yield batch[rank * self.batch_size:(rank + 1) * self.batch_size]
