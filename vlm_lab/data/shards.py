"""Streaming shards across processes and loader workers: webdataset tars, or a ``datasets`` stream.

A stream reads one or more *sources*, each a list of shards read sample by sample in storage order
(:class:`StreamSource`). Two kinds exist: webdataset tars as img2dataset writes them
(``tar_shards.TarShards``) and the shards of a Hugging Face ``datasets`` ``IterableDataset``
(``hf_datasets.HFShards``). Deciding which process and worker reads what is done here, for every
kind alike, because the exact-coverage guarantees below are this module's contract. Several
sources make a mixture, read exactly or resampled by weight (``mixtures.py``).

Who reads what: the shards of all sources, one after the other, make one list of ``S`` shards, which
the ``R x W`` readers (ranks x loader workers, "slots") split once:

- ``S // (R*W) * (R*W)`` shards are dealt out whole, round robin (each is read by one slot);
- each of the ``S mod (R*W)`` leftover shards goes to a group of about ``R*W / leftover`` slots, which
  all read it and keep every g-th sample (by position in the shard), one residue each.

So every sample belongs to exactly one slot, whatever the counts, and slots get nearly equal shares.
Only the leftover shards are read more than once; a shard count that is a multiple of ``R*W`` reads
every shard once. A slot's position in an epoch is (which of its portions, which sample of it).

Equal lengths: under DDP every rank must run the same number of batches or the collective calls
hang. Each worker index gets a quota of samples, the largest share of that worker index over the
ranks (rounded up to whole batches for training); a slot with a smaller share tops up by reading its
share again. Per-shard sample counts come from the sources (img2dataset's stats files, Parquet
footers...), so the quotas, and ``len()``, are known before reading. With ``samples_per_epoch`` set, the quota is
that number split evenly instead, and slots cycle through (or stop early in) their share.

Epochs: the shard-to-slot assignment is fixed; each epoch, a training slot reads its shards in a new
order through a shuffle buffer, both seeded by (seed, epoch, slot), as are a loader worker's own
random streams (crops, caption draws). The epoch comes from :class:`StreamLoader`, which sets it
before the workers start each pass. A resampled stream draws instead (``mixtures.py``), seeded the
same way.

The locked-tower embedding cache serves streams too: a stream is a ``CacheableStream``
(``vlm_lab/embedding_cache.py``) whose images are found by :func:`sample_key`.

Image ids: a sample's key is unique within its source only, so when a stream reads several sources
its samples' image ids are :func:`sample_key` (source name and key, hashed): key ``3`` of two
sources would otherwise be one image to ``model.loss.multi_positive``, a false positive. A stream of
one source keeps its keys as ids (:func:`key_to_id`), as readable as the keys and unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vlm_lab.data.epochs import EpochLoader
from vlm_lab.data.handoff import WorkerSlots
from vlm_lab.data.health import BadSampleCounter
from vlm_lab.data.mixtures import interleave, mixture_weights, weighted_draws
from vlm_lab.data.records import RawSample
from vlm_lab.embedding_cache import EmbeddingCache, key63, teacher_image_entries
from vlm_lab.errors import ConfigError
from vlm_lab.seeding import epoch_seed, seed_process

log = logging.getLogger(__name__)

# A resampled source that gives this many unusable samples in a row is broken, not unlucky.
MAX_UNUSABLE_IN_A_ROW = 100_000


# --------------------------------------------------------------------------------------------------
# Sources


class StreamSource(Protocol):
    """One source of a :class:`ShardStream`: shards read sample by sample, in storage order.

    A raw sample is a dict with ``__key__`` (unique within the source) and ``__url__`` (its shard's
    name), plus whatever the source stores; ``decode`` turns it into what the stream needs.
    """

    name: str

    @property
    def num_shards(self) -> int:
        """How many shards the source has."""

    def shard_name(self, shard: int) -> str:
        """A shard's name for messages (a path or URL)."""

    def counts(self) -> list[int] | None:
        """Samples per shard, or None when some are unknown (the epoch length must then be given)."""

    def read(self, shard: int, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        """The raw samples of a shard in storage order; unreadable data goes to ``on_error`` (which
        returns True to carry on)."""

    def decode(self, raw: dict[str, Any], decode_size: tuple[int, int] | None,
               with_image: bool = True) -> dict[str, Any] | str:
        """``{"image", "captions", "image_id", "key"}`` of a raw sample, or the bad-sample reason
        (``health.REASONS``) why it cannot be used. ``with_image=False`` checks that the image is
        there but does not decode it (``image`` is None)."""


def where(raw: dict[str, Any]) -> str:
    """A raw sample's place, for the bad-sample log: its shard and key."""
    return f"{raw.get('__url__')} key {raw.get('__key__')}"


def stream_raw_samples(source: StreamSource, bad: BadSampleCounter, mixed: bool = False) -> Iterator[RawSample]:
    """A source's samples in storage order, untransformed, for ``vlm-lab data inspect``. ``mixed``:
    the source is one of several in a stream, whose image ids are :func:`stream_image_id`'s."""
    for shard in range(source.num_shards):
        for raw in source.read(shard, skip_and_count(bad, source.shard_name(shard))):
            sample = source.decode(raw, None, with_image=False)
            if isinstance(sample, str):
                bad.record(sample, where(raw))
                continue
            # Decoded only when asked: caption statistics need no pixels.
            yield RawSample(tuple(sample["captions"]), stream_image_id(source.name, sample, mixed), where(raw),
                            lambda raw=raw: _decoded_image(source, raw))


def _decoded_image(source: StreamSource, raw: dict[str, Any]) -> Image.Image:
    sample = source.decode(raw, None)
    if isinstance(sample, str):
        raise ValueError(sample)
    return sample["image"]


# --------------------------------------------------------------------------------------------------
# Errors and keys


def skip_and_count(bad: BadSampleCounter, url: str) -> Callable[[Exception], bool]:
    """A webdataset error handler that counts the error as a bad sample and carries on."""

    def skip(error: Exception) -> bool:  # webdataset's contract: True means "carry on"
        bad.record("unreadable shard data", f"{url}: {type(error).__name__}: {error}")
        return True

    return skip


def key_to_id(key: str) -> int:
    """img2dataset keys are digits (``000000003`` -> 3); anything else gets a stable 63-bit hash."""
    if key.isdigit():
        return int(key)
    return key63(key)


def sample_key(source: str, key: str) -> int:
    """The embedding cache's key of a sample: its source's name and its own key, hashed to 63 bits."""
    return key63(f"{source}\x00{key}")


def stream_image_id(source: str, sample: dict[str, Any], mixed: bool) -> int:
    """The image id of a decoded sample of ``source`` in a stream of several sources (``mixed``) or of
    one: keys repeat across sources, so a mixture's ids are their :func:`sample_key` (module docstring)."""
    return sample_key(source, sample["key"]) if mixed else sample["image_id"]


# --------------------------------------------------------------------------------------------------
# Who reads what


@dataclass(frozen=True)
class Portion:
    """The samples of shard ``shard`` whose position ``i`` has ``i % modulus == remainder``."""

    shard: int
    modulus: int = 1
    remainder: int = 0

    def size(self, samples: int) -> int:
        return max(0, -(-(samples - self.remainder) // self.modulus))

    def keeps(self, position: int) -> bool:
        return position % self.modulus == self.remainder


def assign_shards(num_shards: int, num_slots: int) -> list[list[Portion]]:
    """Each slot's portions: whole shards round robin, leftovers split by sample (module docstring)."""
    whole = num_shards // num_slots * num_slots
    slots = [[Portion(s) for s in range(k, whole, num_slots)] for k in range(num_slots)]
    leftover = num_shards - whole
    if leftover:
        group_of = [k * leftover // num_slots for k in range(num_slots)]  # contiguous, sizes differ by <= 1
        for k in range(num_slots):
            members = [m for m in range(num_slots) if group_of[m] == group_of[k]]
            slots[k].append(Portion(whole + group_of[k], len(members), members.index(k)))
    return slots


# --------------------------------------------------------------------------------------------------
# The stream


class ShardStream(IterableDataset):
    """Batches from the shards of one or more sources for one rank: each sample once per epoch.

    Args:
        sources: the sources, whose shards are read as one list (module docstring).
        split: ``train`` (shuffled, whole batches) or ``val`` / ``test`` (storage order).
        transform: PIL image -> tensor.
        collate: list of samples -> batch (tokenises).
        batch_size: samples per batch.
        bad: where skipped samples are counted.
        rank, world_size: this process among the data-parallel ones.
        num_workers: the DataLoader's worker count (0 counts as 1 reader).
        samples_per_epoch: a fixed epoch size over all ranks; without it the sources' counts fix it.
        resampled: draw samples with replacement (``mixtures.py``); needs ``samples_per_epoch``.
        weights: each source's weight in a resampled stream (None: by size; see ``mixtures.py``).
        shuffle_buffer: samples held by each training worker's shuffle buffer (per source when resampled).
        seed: fixes the order of every epoch.
        decode_size: lets JPEGs decode at a reduced scale (see ``transforms.open_image``).
    """

    def __init__(self, sources: list[StreamSource], split: str, transform: Callable[[Image.Image], torch.Tensor],
                 collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], batch_size: int,
                 bad: BadSampleCounter, rank: int, world_size: int, num_workers: int,
                 samples_per_epoch: int | None = None, resampled: bool = False,
                 weights: list[float | None] | None = None, shuffle_buffer: int = 1000, seed: int = 0,
                 decode_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if resampled and samples_per_epoch is None:
            raise ConfigError(f"data.resampled=true draws samples with replacement, so it needs the epoch length: "
                              f"set data.{split}_samples")
        self.sources, self.split, self.train = sources, split, split == "train"
        self.transform, self.collate, self.batch_size, self.bad = transform, collate, batch_size, bad
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.samples_per_epoch, self.resampled = samples_per_epoch, resampled
        self.weights = list(weights) if weights is not None else [None] * len(sources)
        self.shuffle_buffer, self.seed, self.decode_size = shuffle_buffer, seed, decode_size
        # The shards of all sources as one list: (source index, shard index within the source).
        self.shards = [(s, k) for s, source in enumerate(sources) for k in range(source.num_shards)]
        self.mixed = len(sources) > 1  # image ids by source and key (stream_image_id)
        # Samples per shard, per source (None: unknown). Read here, once: the workers inherit them.
        self.source_counts = [source.counts() for source in sources] \
            if resampled or samples_per_epoch is None else [None] * len(sources)
        self.counts = None if samples_per_epoch is not None else self._counts()
        self.assignment = assign_shards(len(self.shards), world_size * self.num_workers)
        self.quotas = self._quotas()
        if sum(self.quotas) == 0:
            total = samples_per_epoch if samples_per_epoch is not None else sum(self.counts or [])
            need = f"at least batch_size={batch_size} per rank in training" if self.train else "at least one"
            raise ConfigError(f"{split}: {total} sample(s) in {len(self.shards)} shard(s) leave rank {rank} of "
                              f"{world_size} nothing to read; it needs {need}")
        # Shared memory: the workers read the epoch the main process sets before each pass, and the
        # batches each reader leaves out at the start of it (a resumed pass, see resume_point).
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._skip = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._position = _Position(0, 0)  # a training reader's place in its pass (set by __iter__)
        # Set by the data module when a locked tower's outputs are cached (vlm_lab/embedding_cache.py),
        # and when a distillation teacher's image features are (vlm_lab/distillation.py).
        self.embeddings: EmbeddingCache | None = None
        self.teacher_embeddings: EmbeddingCache | None = None

    def _counts(self) -> list[int]:
        counts: list[int] = []
        for source, known in zip(self.sources, self.source_counts):
            if known is None:
                raise ConfigError(f"{self.split}: {source.name}: the samples per shard are unknown (remote shards, or "
                                  f"no stats files), so the epoch length is unknown; set data.{self.split}_samples")
            counts += known
        return counts

    # ---------------------------------------------------------------------------------------------
    # Sizes

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.num_workers + worker

    def share(self, rank: int, worker: int) -> int:
        """Samples that belong to a slot (needs the counts)."""
        assert self.counts is not None
        return sum(p.size(self.counts[p.shard]) for p in self.assignment[self.slot(rank, worker)])

    def _quotas(self) -> list[int]:
        """Samples each worker index yields per epoch, equal on every rank."""
        workers, b = self.num_workers, self.batch_size
        if self.samples_per_epoch is not None:
            per_rank = self.samples_per_epoch // self.world_size
            if self.train:  # whole batches, dealt out over the workers
                batches = per_rank // b
                return [b * (batches // workers + (w < batches % workers)) for w in range(workers)]
            return [per_rank // workers + (w < per_rank % workers) for w in range(workers)]
        largest = [max(self.share(r, w) for r in range(self.world_size)) for w in range(workers)]
        return [math.ceil(n / b) * b for n in largest] if self.train else largest

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return sum(math.ceil(q / self.batch_size) for q in self.quotas)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch of the next pass, and the batches every reader leaves out at its start."""
        self._epoch[0] = epoch
        self._skip[0] = skip_batches

    def resume_point(self, batches_done: int) -> tuple[int, int]:
        """Where a pass resumed after ``batches_done`` batches starts: ``(rounds, drop)``.

        A DataLoader hands out its workers' batches round robin, worker 0 first (a worker that runs
        out is passed over), and a new iterator starts at worker 0 again. So each reader leaves out
        its first ``rounds`` batches (the batches of the round the resumed pass starts in come first),
        and the loader drops the first ``drop`` batches of the new iterator: those of that round
        trained already.
        """
        batches = [math.ceil(q / self.batch_size) for q in self.quotas]
        order = [(r, w) for r in range(max(batches, default=0)) for w in range(self.num_workers) if r < batches[w]]
        if batches_done >= len(order):
            return 0, 0
        rounds = order[batches_done][0]
        return rounds, sum(1 for r, _ in order[:batches_done] if r == rounds)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    # ---------------------------------------------------------------------------------------------
    # Reading

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"this {self.split} stream was planned for {self.num_workers} loader worker(s) "
                               f"but is read by {workers}; build its DataLoader with the same num_workers")
        slot, quota = self.slot(self.rank, worker), self.quotas[worker]
        rng = self._rng(slot)
        if info is not None and self.train:
            # A persistent worker carries its random state over epochs; what it draws must depend on
            # the epoch only (vlm_lab/seeding.py). Each sample reseeds again (_decode).
            seed_process(epoch_seed(self.seed, self.epoch, slot))
        # Samples decoded so far in this pass, and how many of the first ones a resumed pass leaves out.
        self._position = _Position(slot, int(self._skip[0]) * self.batch_size if self.train else 0)
        samples = self._resampled(slot, rng) if self.resampled else self._passes(slot, rng)
        batch: list[dict[str, Any]] = []
        for sample in itertools.islice(samples, quota):
            if sample is SKIPPED:
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)

    def _passes(self, slot: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """The slot's samples, decoded; then again (re-shuffled) for as long as the quota asks."""
        portions = self.assignment[slot]
        for number in itertools.count():
            # Repeats top up a short share: their bad samples were counted on the first pass.
            count_bad = number == 0
            order = rng.sample(portions, len(portions)) if self.train else list(portions)
            raw: Iterator[dict[str, Any]] = self._read(order, count_bad)
            if self.train and self.shuffle_buffer > 1:
                raw = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw)
            good = 0
            for sample in raw:
                decoded = self._decode(sample, count_bad)
                if decoded is not None:
                    good += 1
                    yield decoded
            if good == 0:
                if portions and number == 0:
                    log.warning("%s: reader %d found no usable sample in its share of the shards", self.split, slot)
                return

    def _rng(self, slot: int, *more: object) -> random.Random:
        """The random stream of a reader (and, resampled, of one of its sources) in this epoch."""
        return random.Random("-".join(map(str, (self.seed, self.split, self.epoch, slot, *more))))

    def _resampled(self, slot: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Samples drawn with replacement: a source by weight per sample, shards by size per source."""
        sizes = [sum(counts) if counts is not None else None for counts in self.source_counts]
        streams = [self._endless(index, self._rng(slot, "source", index)) for index in range(len(self.sources))]
        return interleave(streams, mixture_weights(self.weights, sizes), rng)

    def _endless(self, index: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Decoded samples of source ``index`` forever, its shards drawn with replacement. Each draw is
        a fresh read, so its bad samples are counted each time."""
        source = self.sources[index]
        raw: Iterator[dict[str, Any]] = self._drawn_shards(index, rng)
        if self.shuffle_buffer > 1:
            raw = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw)
        unusable = 0
        for sample in raw:
            decoded = self._decode(sample, count_bad=True)
            if decoded is not None:
                unusable = 0
                yield decoded
                continue
            unusable += 1
            if unusable == MAX_UNUSABLE_IN_A_ROW:
                raise ConfigError(f"{self.split}: source {source.name}: {unusable} samples in a row were unusable "
                                  f"(see the bad-sample log); is the source's data broken?")

    def _drawn_shards(self, index: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        source = self.sources[index]
        empty: set[int] = set()
        for shard in weighted_draws(self.source_counts[index], source.num_shards, rng):
            read = 0
            for sample in self._shard(index, shard, Portion(shard), count_bad=True):
                read += 1
                yield sample
            if read == 0:
                empty.add(shard)
                if len(empty) == source.num_shards:
                    raise ConfigError(f"{self.split}: source {source.name}: none of its {source.num_shards} shard(s) "
                                      f"holds a readable sample")

    def _read(self, portions: list[Portion], count_bad: bool) -> Iterator[dict[str, Any]]:
        for portion in portions:
            yield from self._shard(*self.shards[portion.shard], portion, count_bad)

    def _shard(self, index: int, shard: int, portion: Portion, count_bad: bool) -> Iterator[dict[str, Any]]:
        """The raw samples of ``portion`` (of shard ``shard`` of source ``index``).

        A damaged shard loses its samples from the damage on: an error webdataset reports counts one
        of them, and when the shard's count is known the rest are counted too. A tar cut between two
        members reports no error at all; only the count tells.
        """
        source = self.sources[index]
        errors = 0

        def skip(error: Exception) -> bool:
            nonlocal errors
            errors += 1
            return skip_and_count(self.bad, source.shard_name(shard))(error) if count_bad else True

        kept = 0
        for position, sample in enumerate(source.read(shard, skip)):
            if portion.keeps(position):
                sample["__source__"] = index
                kept += 1
                yield sample
        counts = self.source_counts[index]
        lost = portion.size(counts[shard]) - kept - errors if counts is not None else 0
        if count_bad and lost > 0:
            self.bad.record("unreadable shard data", f"{source.shard_name(shard)}: {lost} more sample(s) than read "
                                                     f"(its count says {counts[shard]})", count=lost)

    def _decode(self, raw: dict[str, Any], count_bad: bool) -> dict[str, Any] | None:
        source = self.sources[raw["__source__"]]
        cached = self.embeddings is not None
        sample = source.decode(raw, self.decode_size, with_image=not cached)
        if not isinstance(sample, str) and cached:  # the locked tower's stored outputs stand in for the image
            try:
                outputs = self.embeddings.lookup_key(sample_key(source.name, sample["key"]))
            except KeyError:
                raise RuntimeError(f"{where(raw)} is not in the embedding cache: the shards changed since it was "
                                   f"filled; delete {self.embeddings.folder or 'the cache'} and run again") from None
            if outputs is None:  # unusable when the cache was filled: counted as an uncached epoch would
                sample = "undecodable image"
            else:
                if self.train and not self._take_place():
                    return SKIPPED
                return {**outputs, **self._teacher_entries(source, sample), "captions": sample["captions"],
                        "image_id": stream_image_id(source.name, sample, self.mixed)}
        if isinstance(sample, str):
            if count_bad:
                self.bad.record(sample, where(raw))
            return None
        if self.train and not self._take_place():
            return SKIPPED
        return {"pixel_values": self.transform(sample["image"]), **self._teacher_entries(source, sample),
                "captions": sample["captions"], "image_id": stream_image_id(source.name, sample, self.mixed)}

    def _teacher_entries(self, source: StreamSource, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.teacher_embeddings is None:
            return {}
        return teacher_image_entries(self.teacher_embeddings, key=sample_key(source.name, sample["key"]))

    def _take_place(self) -> bool:
        """Count a usable training sample in the reader's pass; False when a resumed pass leaves it out
        (trained before the checkpoint: its place counts, its pixels are not needed). Else reseed the
        process for it: its crops, and the caption draw the collate makes after a batch's last sample,
        come from its place in the pass, not from what the worker drew before (vlm_lab/seeding.py)."""
        position = self._position
        number, position.decoded = position.decoded, position.decoded + 1
        if number < position.skip:
            return False
        seed_process(epoch_seed(self.seed, self.epoch, position.slot, number, purpose="sample"))
        return True

    # ---------------------------------------------------------------------------------------------
    # The embedding cache's interface for streams (vlm_lab/embedding_cache.py, CacheableStream)

    def cacheable(self) -> bool:
        """Whether every shard's sample count is known: the cache allocates its rows from them."""
        return all(source.counts() is not None for source in self.sources)

    def image_rows(self) -> int:
        return sum(sum(source.counts() or []) for source in self.sources)

    def image_identity(self) -> str:
        shards = [(source.name, [source.shard_name(k) for k in range(source.num_shards)], source.counts())
                  for source in self.sources]
        digest = hashlib.sha1(repr(shards).encode()).hexdigest()
        return f"shard_stream {self.image_rows()} samples {digest} decode_size={self.decode_size} {self.transform}"

    def keyed_images(self) -> "KeyedImages":
        return KeyedImages(self.sources, self.transform, self.decode_size)

    def caption_texts(self) -> list[str]:
        """Every caption a training batch may draw (read from the shards once, images not decoded);
        distillation's teacher cache encodes them once."""
        texts: list[str] = []
        for source in self.sources:
            for shard in range(source.num_shards):
                for raw in source.read(shard, lambda error: True):  # the stream counts what is unreadable
                    sample = source.decode(raw, None, with_image=False)
                    if not isinstance(sample, str):
                        texts += sample["captions"]
        return texts


@dataclass
class _Position:
    """A training reader's place in its pass: samples decoded so far, and how many of the first ones a
    resumed pass leaves out (decoded, so bad samples are found as before, but not transformed)."""

    slot: int
    skip: int
    decoded: int = 0


# What _decode gives for a sample a resumed pass leaves out (ShardStream.__iter__ drops it).
SKIPPED: dict[str, Any] = {"skipped": True}


class KeyedImages(IterableDataset):
    """Every image of some sources once, as ``(sample key, transformed image or None)``: what fills a
    stream's embedding cache. Loader workers take every ``num_workers``-th shard; samples whose
    captions are unusable are left out (the stream skips them before looking images up)."""

    def __init__(self, sources: list[StreamSource], transform: Callable[[Image.Image], torch.Tensor],
                 decode_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.sources, self.transform, self.decode_size = sources, transform, decode_size

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = [(source, k) for source in self.sources for k in range(source.num_shards)]
        for source, shard in shards[worker::workers]:
            for raw in source.read(shard, lambda error: True):  # the stream counts what is unreadable
                sample = source.decode(raw, self.decode_size)
                if sample == "undecodable image":  # the stream looks it up, finds it unusable and counts it
                    yield sample_key(source.name, raw["__key__"]), None
                elif not isinstance(sample, str):
                    yield sample_key(source.name, sample["key"]), self.transform(sample["image"])


class StreamLoader(EpochLoader):
    """The loader of a :class:`ShardStream` (which batches itself): sets the stream's epoch per pass.

    The epoch is set in the main process just before the workers start a pass, so persistent and
    fresh workers alike shuffle for the right epoch; the stream seeds each worker from it too, so its
    workers can stay alive between epochs. A resumed pass starts where the checkpoint left off
    (``ShardStream.resume_point``): its readers read their trained samples again without transforming
    them, and the loader drops the few batches of the round it starts in that were trained already. ``progress`` (see ``EpochLoader``) says whether a checkpoint
    was taken after the pass ended (see ``epochs.TrainingEpochs``). ``slots``: the ones the stream's
    collate stacks pixels into; ``pin_memory``: see ``handoff.SlotLoader``.
    """

    def __init__(self, stream: ShardStream, seed: int, epoch: Callable[[], int], num_workers: int,
                 pin_memory: bool = False, slots: WorkerSlots | None = None,
                 skip: Callable[[], int] | None = None) -> None:
        super().__init__(stream, seed, epoch, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=num_workers > 0, slots=slots, skip=skip)

    def start_pass(self, epoch: int, skip: int) -> int:
        rounds, drop = self.dataset.resume_point(skip) if skip else (0, 0)
        self.dataset.set_epoch(epoch, rounds)
        return drop
