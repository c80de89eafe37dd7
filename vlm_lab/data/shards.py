"""Streaming webdataset shards (img2dataset's layout) across processes and loader workers.

img2dataset writes ``00000.tar, 00001.tar, ...`` holding ``KEY.jpg`` (the image), ``KEY.txt`` (the
caption) and ``KEY.json`` (url, sizes...), plus ``00000_stats.json`` beside each shard whose
``successes`` is the number of samples in it. The ``webdataset`` library reads the tars (local files,
``pipe:`` commands or URLs) and groups their members into samples. Deciding which process and worker
reads what is done here, because the exact-coverage guarantees below are this module's contract.

Who reads what: the ``R x W`` readers (ranks x loader workers, "slots") split the shards once:

- ``S // (R*W) * (R*W)`` shards are dealt out whole, round robin (each is read by one slot);
- each of the ``S mod (R*W)`` leftover shards goes to a group of about ``R*W / leftover`` slots, which
  all read it and keep every g-th sample (by position in the shard), one residue each.

So every sample belongs to exactly one slot, whatever the counts, and slots get nearly equal shares.
Only the leftover shards are read more than once; a shard count that is a multiple of ``R*W`` reads
every shard once.

Equal lengths: under DDP every rank must run the same number of batches or the collective calls
hang. Each worker index gets a quota of samples, the largest share of that worker index over the
ranks (rounded up to whole batches for training); a slot with a smaller share tops up by reading its
share again. Per-shard sample counts come from the stats files (or a scan of local tars without one),
so the quotas, and ``len()``, are known before reading. With ``samples_per_epoch`` set, the quota is
that number split evenly instead, and slots cycle through (or stop early in) their share.

Epochs: the shard-to-slot assignment is fixed; each epoch, a training slot reads its shards in a new
order through a shuffle buffer, both seeded by (seed, epoch, slot), as are a loader worker's own
random streams (crops, caption draws). The epoch comes from
:class:`StreamLoader`, which sets it before the workers start each pass.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from vlm_lab.data.epochs import EpochLoader
from vlm_lab.data.handoff import WorkerSlots
from vlm_lab.data.health import BadSampleCounter
from vlm_lab.data.transforms import open_image
from vlm_lab.errors import ConfigError
from vlm_lab.seeding import epoch_seed, seed_process

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------------------------------
# Shard lists and their sample counts


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(spec: str | list[str], field: str) -> list[str]:
    """Brace-expand a shard spec (``"cc3m/{00000..00331}.tar"`` or a list of such) and check it.

    Raises ``ConfigError`` for an empty list or local shards that do not exist.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for item in items if str(item).strip() for url in wds.shardlists.expand_urls(str(item))]
    if not urls:
        raise ConfigError(f"data.{field}: the shard list is empty; give paths such as 'shards/{{00000..00009}}.tar'")
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        raise ConfigError(f"data.{field}: {len(missing)} of {len(urls)} shard file(s) do not exist, e.g. {missing[0]}")
    return urls


def stats_path(url: str) -> Path:
    """Where img2dataset puts a shard's stats: ``00000.tar`` -> ``00000_stats.json``."""
    path = Path(url)
    stem = path.name[: -len(".tar")] if path.name.endswith(".tar") else path.stem
    return path.with_name(f"{stem}_stats.json")


def shard_sample_count(url: str) -> int | None:
    """Samples in a shard: its stats file's ``successes``, else a scan of a local tar, else None."""
    if not is_local(url):
        return None
    stats = stats_path(url)
    if stats.is_file():
        return stats_successes(stats)
    return count_tar_samples(url)


def stats_successes(stats: Path) -> int:
    """The ``successes`` of an img2dataset stats file; a one-line ConfigError naming file and field."""
    try:
        data = json.loads(stats.read_bytes())
    except ValueError as error:
        raise ConfigError(f"{stats} is not valid JSON ({error}); img2dataset stats files hold 'successes'") from None
    if not isinstance(data, dict) or "successes" not in data:
        raise ConfigError(f"{stats}: 'successes' missing; an img2dataset stats file gives the shard's sample count there")
    successes = data["successes"]
    if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
        raise ConfigError(f"{stats}: 'successes' should be a count (an integer >= 0), not {json.dumps(successes)[:60]}")
    return successes


def count_tar_samples(path: str) -> int:
    """Samples in a tar as webdataset groups them: runs of members sharing a key (headers only)."""
    count, previous = 0, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if not member.isreg() or key is None or Path(member.name).name.startswith("__"):
                    continue
                if key != previous:
                    count, previous = count + 1, key
    except (tarfile.TarError, OSError) as error:
        log.warning("counting samples in %s stopped at %d: %s", path, count, error)
    return count


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
    """Batches from webdataset shards for one rank: each sample of the split once per epoch.

    Args:
        urls: the expanded shard list.
        split: ``train`` (shuffled, whole batches) or ``val`` / ``test`` (storage order).
        transform: PIL image -> tensor.
        collate: list of samples -> batch (tokenises).
        batch_size: samples per batch.
        bad: where skipped samples are counted.
        rank, world_size: this process among the data-parallel ones.
        num_workers: the DataLoader's worker count (0 counts as 1 reader).
        counts: samples per shard, or None when ``samples_per_epoch`` is given instead.
        samples_per_epoch: a fixed epoch size over all ranks (overrides the counts).
        shuffle_buffer: samples held by each training worker's shuffle buffer.
        seed: fixes the order of every epoch.
        decode_size: lets JPEGs decode at a reduced scale (see ``transforms.open_image``).
    """

    def __init__(self, urls: list[str], split: str, transform: Callable[[Image.Image], torch.Tensor],
                 collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], batch_size: int,
                 bad: BadSampleCounter, rank: int, world_size: int, num_workers: int,
                 counts: list[int] | None, samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 1000, seed: int = 0,
                 decode_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if counts is None and samples_per_epoch is None:
            raise ConfigError(f"{split}: cannot tell the epoch length; give the samples per epoch")
        self.urls, self.split, self.train = urls, split, split == "train"
        self.transform, self.collate, self.batch_size, self.bad = transform, collate, batch_size, bad
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.counts, self.samples_per_epoch = counts, samples_per_epoch
        self.shuffle_buffer, self.seed, self.decode_size = shuffle_buffer, seed, decode_size
        self.assignment = assign_shards(len(urls), world_size * self.num_workers)
        self.quotas = self._quotas()
        if sum(self.quotas) == 0:
            total = samples_per_epoch if samples_per_epoch is not None else sum(counts or [])
            need = f"at least batch_size={batch_size} per rank in training" if self.train else "at least one"
            raise ConfigError(f"{split}: {total} sample(s) in {len(urls)} shard(s) leave rank {rank} of {world_size} "
                              f"nothing to read; it needs {need}")
        # Shared memory: the workers read the epoch the main process sets before each pass.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

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

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

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
        rng = random.Random(f"{self.seed}-{self.split}-{self.epoch}-{slot}")
        if info is not None and self.train:
            # A persistent worker carries its random state over epochs; the random crops and caption
            # draws it makes must depend on the epoch only (vlm_lab/seeding.py).
            seed_process(epoch_seed(self.seed, self.epoch, slot))
        batch: list[dict[str, Any]] = []
        for sample in itertools.islice(self._passes(slot, rng), quota):
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

    def _read(self, portions: list[Portion], count_bad: bool) -> Iterator[dict[str, Any]]:
        for portion in portions:
            url = self.urls[portion.shard]
            samples = wds.tarfile_samples([{"url": url}], handler=self._handler(url, count_bad))
            for position, sample in enumerate(samples):
                if portion.keeps(position):
                    yield sample

    def _handler(self, url: str, count_bad: bool) -> Callable[[Exception], bool]:
        return skip_and_count(self.bad, url) if count_bad else (lambda error: True)

    def _decode(self, raw: dict[str, Any], count_bad: bool) -> dict[str, Any] | None:
        sample = decode_sample(raw, self.decode_size)
        if isinstance(sample, str):
            if count_bad:
                self.bad.record(sample, f"{raw.get('__url__')} key {raw.get('__key__')}")
            return None
        image = sample.pop("image")
        sample["pixel_values"] = self.transform(image)
        return sample


def skip_and_count(bad: BadSampleCounter, url: str) -> Callable[[Exception], bool]:
    """A webdataset error handler that counts the error as a bad sample and carries on."""

    def skip(error: Exception) -> bool:  # webdataset's contract: True means "carry on"
        bad.record("unreadable shard data", f"{url}: {type(error).__name__}: {error}")
        return True

    return skip


def image_member(raw: dict[str, Any]) -> bytes | None:
    """The encoded image of a webdataset sample, whichever its extension."""
    return next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)


def sample_captions(raw: dict[str, Any]) -> list[str] | str:
    """A webdataset sample's captions, or the reason it has none.

    The caption is the ``.txt`` member (UTF-8; other bytes make an "undecodable caption"). A ``.json``
    member with a ``captions`` list (written by ``vlm-lab data convert --per image``) gives every
    caption of the image; a ``captions`` that is not a list of strings is a schema error
    (``ConfigError`` naming the shard, the key and the field), while a ``.json`` that is not JSON at
    all is ignored (img2dataset's metadata is optional).
    """
    if "txt" not in raw:
        return "missing caption"
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "undecodable caption"
    if not caption:
        return "empty caption"
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            meta = None  # metadata is optional: a broken one does not spoil the sample
        listed = meta.get("captions") if isinstance(meta, dict) else None
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
                raise ConfigError(f"{raw.get('__url__')}: {raw.get('__key__')}.json field 'captions' should be a "
                                  f"list of strings, not {json.dumps(listed)[:60]}")
            return [c.strip() for c in listed if c.strip()] or [caption]
    return [caption]


def decode_sample(raw: dict[str, Any], decode_size: tuple[int, int] | None = None) -> dict[str, Any] | str:
    """A webdataset sample -> ``{"image", "captions", "image_id"}``, or the reason it is unusable."""
    image_bytes = image_member(raw)
    if image_bytes is None:
        return "missing image"
    captions = sample_captions(raw)
    if isinstance(captions, str):
        return captions
    try:
        image = open_image(image_bytes, decode_size)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return "undecodable image"
    return {"image": image, "captions": captions, "image_id": key_to_id(raw["__key__"])}


def key_to_id(key: str) -> int:
    """img2dataset keys are digits (``000000003`` -> 3); anything else gets a stable 63-bit hash."""
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") >> 1


class StreamLoader(EpochLoader):
    """The loader of a :class:`ShardStream` (which batches itself): sets the stream's epoch per pass.

    The epoch is set in the main process just before the workers start a pass, so persistent and
    fresh workers alike shuffle for the right epoch; the stream seeds each worker from it too, so its
    workers can stay alive between epochs. ``progress`` (see ``EpochLoader``) says whether a checkpoint
    was taken after the pass ended (see ``epochs.TrainingEpochs``). ``slots``: the ones the stream's
    collate stacks pixels into; ``pin_memory``: see ``handoff.SlotLoader``.
    """

    def __init__(self, stream: ShardStream, seed: int, epoch: Callable[[], int], num_workers: int,
                 pin_memory: bool = False, slots: WorkerSlots | None = None) -> None:
        super().__init__(stream, seed, epoch, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=num_workers > 0, slots=slots)

    def start_pass(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
