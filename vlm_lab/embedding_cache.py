"""The locked-tower embedding cache: a fully locked vision tower's outputs, computed once per image.

In LiT the image tower never changes, so with deterministic preprocessing (no augmentation) its
output for an image is the same in every epoch. When a fit starts, :class:`LockedTowerCache` (a
callback that ``vlm_lab.api.build_trainer`` adds) runs the locked tower once over every image of the
train and val splits and stores the pooled outputs (and the token outputs when ``tokens: true``).
From then on those splits' datasets hand out the stored rows instead of images: no decoding, no
resizing, no vision forward pass, so an epoch costs about what the text tower alone costs.

The cache is keyed by the images (the dataset's own description of which images sit in which row
and how they are transformed), the tower (a hash of its weights) and what is stored. It lives in
memory (per process) or in ``.npy`` files on disk that later runs with the same key reuse; a sweep of
LiT runs computes the image embeddings once.

The interface with data (what a data module implements to take part)::

    datamodule.cacheable_images(split) -> CacheableImages | None   # None: not deterministic, or unsupported
    datamodule.use_embedding_cache(split, cache)                    # datasets built after this serve rows

A ``CacheableImages`` dataset has ``image_rows()``, ``image_identity()``, ``image_row_pixels(row)``
and an ``embeddings`` attribute: when set, its items carry ``vision_pooled`` (and ``vision_tokens``)
from ``embeddings.lookup(row)`` in place of ``pixel_values``. The collate function stacks whichever
of these keys the samples have, and the module uses ``vision_pooled`` when a batch has it.

Streams (shards read in order, no random access) are ``CacheableStream``s instead: they give every
image once with its *sample key* (a 63-bit hash of the source's name and the sample's key,
``vlm_lab.data.shards.sample_key``) through ``keyed_images()``, and look their rows up by that key
(``embeddings.lookup_key``). So a second pass over the shards, in any order, on any rank or worker,
or a resampled stream that draws a sample many times, never runs the locked tower again. Such a
cache is filled in one go (a disk cache is marked complete when it is) and its rows are the images
in the order they were read; a sorted copy of the keys finds them.

Settings: the ``embedding_cache`` config section (``CacheSettings``, declared in ``vlm_lab/schema.py``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from vlm_lab.errors import ConfigError
from vlm_lab.schema import CacheSettings
from vlm_lab.progress import progress
from vlm_lab.towers.base import TowerOutput

log = logging.getLogger(__name__)

# Row states in the cache's ``state`` array.
MISSING, FILLED, UNUSABLE = 0, 1, 2


class CacheableImages(Protocol):
    """A map-style dataset whose images a locked tower's stored outputs can stand in for."""

    embeddings: "EmbeddingCache | None"

    def image_rows(self) -> int:
        """How many distinct images (cache rows) the dataset shows."""

    def image_identity(self) -> str:
        """Which image sits in which row and how it is transformed: equal strings, equal pixels."""

    def image_row_pixels(self, row: int) -> torch.Tensor | None:
        """The transformed image of a row, or None when it cannot be used (counted as bad when served)."""


class CacheableStream(Protocol):
    """A stream whose images a locked tower's stored outputs, found by sample key, can stand in for."""

    embeddings: "EmbeddingCache | None"

    def image_rows(self) -> int:
        """At most how many images the stream holds (rows to allocate)."""

    def image_identity(self) -> str:
        """Which images the stream holds and how they are transformed: equal strings, equal pixels."""

    def keyed_images(self) -> Dataset:
        """An iterable dataset of ``(sample key, transformed image or None when unusable)``, every
        image once; its loader workers split it among themselves."""


# --------------------------------------------------------------------------------------------------
# Storage


class EmbeddingCache:
    """Rows of stored tower outputs (``pooled`` ``[rows, dim]``, optionally ``tokens``) and their states.

    In memory the arrays are shared-memory tensors, so DataLoader workers read them without copies;
    on disk they are ``.npy`` files under ``folder``, memory-mapped afresh in each process (a worker
    re-opens them rather than receive a pickled copy).
    """

    DTYPES = {"state": (np.uint8, torch.uint8), "keys": (np.int64, torch.int64)}  # the others: float32

    def __init__(self, key: str, rows: int, pooled_shape: tuple[int, ...], tokens_shape: tuple[int, ...] | None,
                 folder: Path | None, keyed: bool = False) -> None:
        self.key, self.rows, self.folder, self.keyed = key, rows, folder, keyed
        self.shapes = {"pooled": (rows, *pooled_shape), "state": (rows,)}
        if tokens_shape is not None:
            self.shapes["tokens"] = (rows, *tokens_shape)
        if keyed:  # rows found by sample key (CacheableStream); see key_index
            self.shapes["keys"] = (rows,)
        self._arrays: dict[str, torch.Tensor] | None = None
        self._maps: dict[str, np.memmap] = {}
        self._index: tuple[np.ndarray, np.ndarray] | None = None
        self._complete = False
        if folder is None:
            self._arrays = {name: torch.zeros(shape, dtype=self.DTYPES.get(name, (None, torch.float32))[1])
                            .share_memory_() for name, shape in self.shapes.items()}

    @property
    def arrays(self) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            assert self.folder is not None
            self._maps = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r+") for name in self.shapes}
            self._arrays = {name: torch.from_numpy(array) for name, array in self._maps.items()}
        return self._arrays

    def reopen(self) -> None:
        """Forget the memory maps; the next access maps the files again (another process wrote them)."""
        if self.folder is not None:
            self._arrays, self._maps, self._index = None, {}, None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_index"] = None  # rebuilt where it is used
        if self.folder is not None:
            state["_arrays"], state["_maps"] = None, {}  # memory maps are re-opened, not pickled
        return state

    def create_files(self) -> None:
        """Create the ``.npy`` files (all rows missing) unless they exist with the expected shapes."""
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, shape in self.shapes.items():
            path = self.folder / f"{name}.npy"
            if path.is_file() and np.load(path, mmap_mode="r").shape == shape:
                continue
            array = np.lib.format.open_memmap(path, mode="w+", dtype=self.DTYPES.get(name, (np.float32,))[0],
                                              shape=shape)
            array.flush()
            del array

    def missing_rows(self) -> list[int]:
        return torch.nonzero(self.arrays["state"] == MISSING).flatten().tolist()

    def counts(self) -> dict[str, int]:
        state = self.arrays["state"]
        return {"filled": int((state == FILLED).sum()), "unusable": int((state == UNUSABLE).sum()),
                "missing": int((state == MISSING).sum())}

    def store(self, rows: torch.Tensor, output: TowerOutput) -> None:
        arrays = self.arrays
        arrays["pooled"][rows] = output.pooled.detach().float().cpu()
        if "tokens" in arrays:
            arrays["tokens"][rows] = output.tokens.detach().float().cpu()
        arrays["state"][rows] = FILLED

    def mark_unusable(self, rows: list[int]) -> None:
        if rows:
            self.arrays["state"][torch.tensor(rows)] = UNUSABLE

    def flush(self) -> None:
        for array in self._maps.values():
            array.flush()

    def lookup(self, row: int, prefix: str = "vision") -> dict[str, torch.Tensor] | None:
        """A row's stored outputs as sample entries (``vision_pooled``..., or under another ``prefix``:
        distillation's teacher rows are ``teacher_image_pooled``), or None if unusable."""
        arrays = self.arrays
        if int(arrays["state"][row]) != FILLED:
            return None
        sample = {f"{prefix}_pooled": arrays["pooled"][row].clone()}
        if "tokens" in arrays:
            sample[f"{prefix}_tokens"] = arrays["tokens"][row].clone()
        return sample

    # Keyed caches (CacheableStream): rows found by sample key.

    def store_keyed(self, first_row: int, keys: torch.Tensor, output: TowerOutput | None,
                    unusable: list[int]) -> int:
        """Store a batch's outputs under their keys from row ``first_row`` on (then the unusable
        images' keys, marked so); return the next free row."""
        arrays, usable = self.arrays, len(keys)
        end = first_row + usable + len(unusable)
        if end > self.rows:
            raise ConfigError(f"embedding cache: the stream holds more images than its shard counts say ({self.rows}); "
                              f"are the stats files out of date?")
        if usable:
            rows = torch.arange(first_row, first_row + usable)
            self.store(rows, output)
            arrays["keys"][rows] = keys
        if unusable:
            rows = torch.arange(first_row + usable, end)
            arrays["keys"][rows] = torch.tensor(unusable, dtype=torch.int64)
            arrays["state"][rows] = UNUSABLE
        return end

    def key_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(the stored keys, sorted; the row of each): built once per process from the ``keys`` array.

        Raises ``ConfigError`` when two images share a key (a source whose samples repeat a key)."""
        if self._index is None:
            state = self.arrays["state"].numpy()
            rows = np.flatnonzero(state != MISSING)
            keys = self.arrays["keys"].numpy()[rows]
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            repeated = int(np.count_nonzero(sorted_keys[1:] == sorted_keys[:-1]))
            if repeated:
                raise ConfigError(f"embedding cache: {repeated} image(s) repeat the sample key of another in their "
                                  f"source; the cache finds images by (source, key): give every sample its own key "
                                  f"or set embedding_cache.enabled=false")
            self._index = (sorted_keys, rows[order])
        return self._index

    def lookup_key(self, key: int, prefix: str = "vision") -> dict[str, torch.Tensor] | None:
        """The stored outputs of the image with sample key ``key`` (entries named as in :meth:`lookup`),
        or None if it was unusable.

        Raises ``KeyError`` for a key the cache has never seen (its stream changed since it was filled).
        """
        sorted_keys, rows = self.key_index()
        at = int(np.searchsorted(sorted_keys, key))
        if at == len(sorted_keys) or int(sorted_keys[at]) != key:
            raise KeyError(f"sample key {key} is not in embedding cache {self.key}")
        return self.lookup(int(rows[at]), prefix)

    def pooled_by_keys(self, keys: list[int]) -> torch.Tensor | None:
        """The stored pooled rows of ``keys``, stacked in their order; None when one of them was never
        stored or was unusable (the caller computes that batch instead)."""
        sorted_keys, rows = self.key_index()
        wanted = np.asarray(keys, dtype=np.int64)
        at = np.minimum(np.searchsorted(sorted_keys, wanted), max(len(sorted_keys) - 1, 0))
        if len(sorted_keys) == 0 or not np.array_equal(sorted_keys[at], wanted):
            return None
        found = torch.from_numpy(rows[at])
        if not bool((self.arrays["state"][found] == FILLED).all()):
            return None
        return self.arrays["pooled"][found].clone()

    @property
    def complete(self) -> bool:
        """Whether a keyed cache was filled to the end (on disk: by any earlier run)."""
        return self._complete or (self.folder is not None and (self.folder / "complete").is_file())

    def mark_complete(self) -> None:
        self._complete = True
        if self.folder is not None:
            self.flush()
            (self.folder / "complete").write_text("every image of the stream is stored\n")


# Distillation's teacher cache (vlm_lab/distillation.py) is served beside the images, under this prefix.
TEACHER_IMAGE = "teacher_image"


def teacher_image_entries(cache: "EmbeddingCache | None", row: int | None = None,
                          key: int | None = None) -> dict[str, torch.Tensor]:
    """What a sample carries of distillation's teacher cache: ``{"teacher_image_pooled": features}``
    of its image (by ``row``, or by sample ``key`` in a stream's cache), or ``{}`` without that cache.

    The sample's image is usable now; a row that was unusable when the cache was filled (or a key the
    cache never saw) means the data changed since, and the cache must be filled again.
    """
    if cache is None:
        return {}
    try:
        entries = cache.lookup(row, TEACHER_IMAGE) if key is None else cache.lookup_key(key, TEACHER_IMAGE)
    except KeyError:
        entries = None
    if entries is None:
        raise RuntimeError(f"distillation's teacher cache has no features for image {row if key is None else key}: "
                           f"the data changed since it was filled; delete {cache.folder or 'the cache'} and run again")
    return entries


def key63(text: str) -> int:
    """The keyed cache's key of a text (a stream's sample key, a caption): SHA-1 of its UTF-8 bytes, 63
    bits, so it fits a non-negative int64. Lone surrogates (a file name decoded with
    ``surrogateescape``) are encoded back as they came, not refused."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogateescape")).digest()[:8], "big") >> 1


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """A hash of a tower's class and weights: equal hashes, equal outputs for equal inputs."""
    digest = hashlib.sha1(f"{type(tower).__module__}.{type(tower).__qualname__}".encode())
    for name, tensor in sorted(tower.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(image_identity: str, tower_hash: str, tokens: bool) -> str:
    description = json.dumps({"images": image_identity, "tower": tower_hash,
                              "outputs": ["pooled", "tokens"] if tokens else ["pooled"], "dtype": "float32"})
    return hashlib.sha1(description.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# Filling


class _MissingRows(Dataset):
    def __init__(self, images: CacheableImages, rows: list[int]) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        row = self.rows[index]
        return row, self.images.image_row_pixels(row)


def _collate_rows(items: list[tuple[int, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    usable = [(row, pixels) for row, pixels in items if pixels is not None]
    unusable = [row for row, pixels in items if pixels is None]
    if not usable:
        return torch.empty(0, dtype=torch.long), None, unusable
    return torch.tensor([row for row, _ in usable]), torch.stack([p for _, p in usable]), unusable


def fill(cache: EmbeddingCache, images: CacheableImages, encode: Callable[[torch.Tensor], TowerOutput],
         device: torch.device, batch_size: int, num_workers: int, desc: str = "embedding cache") -> int:
    """Run ``encode`` over the cache's missing rows and store the outputs; return how many it encoded.

    The loader draws its worker seeds from a generator of its own, so filling the cache leaves the
    global random state (and with it the training data order) as it was. A progress bar (``desc``,
    vlm_lab/progress.py) counts the images: the fill can take minutes before the first training step.
    """
    missing = cache.missing_rows()
    if not missing:
        return 0
    loader = DataLoader(_MissingRows(images, missing), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_rows, generator=torch.Generator().manual_seed(0))
    encoded = 0
    with progress(total=len(missing), desc=desc, unit="img") as bar:
        for rows, pixels, unusable in loader:
            cache.mark_unusable(unusable)
            if pixels is not None:
                cache.store(rows, encode(pixels.to(device)))
                encoded += len(rows)
            bar.update(len(rows) + len(unusable))
    return encoded


def fill_keyed(cache: EmbeddingCache, images: CacheableStream, encode: Callable[[torch.Tensor], TowerOutput],
               device: torch.device, batch_size: int, num_workers: int, desc: str = "embedding cache") -> int:
    """Run ``encode`` over every image of a stream and store the outputs by sample key; return how
    many it encoded. A complete cache is left as it is; an incomplete one is filled afresh. The
    progress bar (``desc``, as in :func:`fill`) counts up to ``image_rows()``, the most the stream
    holds: a stream knows no exact count before it is read."""
    if cache.complete:
        return 0
    cache.arrays["state"].zero_()  # an interrupted fill starts over
    # _collate_rows with keys for rows: (keys of the usable images, their pixels, keys of the unusable ones)
    loader = DataLoader(images.keyed_images(), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_rows, generator=torch.Generator().manual_seed(0))
    row = encoded = 0
    with progress(total=images.image_rows(), desc=desc, unit="img") as bar:
        for keys, pixels, unusable in loader:
            output = encode(pixels.to(device)) if pixels is not None else None
            row = cache.store_keyed(row, keys, output, unusable)
            encoded += len(keys)
            bar.update(len(keys) + len(unusable))
    cache.key_index()  # refuses repeated keys now, not in a loader worker later
    cache.mark_complete()
    return encoded


def open_cache(images: CacheableImages | CacheableStream, tower: torch.nn.Module | None, output: TowerOutput,
               settings: CacheSettings, tower_hash: str | None = None) -> EmbeddingCache:
    """The cache for ``images`` through ``tower`` (``output`` is one sample output, for the shapes;
    ``tower_hash``, when given, stands for the tower's fingerprint)."""
    key = cache_key(images.image_identity(), tower_hash or tower_fingerprint(tower), settings.tokens)
    folder = settings.directory() / key if settings.storage == "disk" else None
    tokens_shape = tuple(output.tokens.shape[1:]) if settings.tokens else None
    return EmbeddingCache(key, images.image_rows(), tuple(output.pooled.shape[1:]), tokens_shape, folder,
                          keyed=is_stream(images))


def is_stream(images: CacheableImages | CacheableStream) -> bool:
    """Whether ``images`` is a stream (keyed rows) rather than a map-style dataset (numbered rows)."""
    return hasattr(images, "keyed_images")


# --------------------------------------------------------------------------------------------------
# The callback


class LockedTowerCache(Callback):
    """Fills and attaches the embedding cache when a fit is set up (see the module docstring).

    It does nothing when the vision tower is not fully locked, and skips (with a log line) splits
    whose images are not deterministic or data modules without the interface. Under DDP with disk
    storage rank 0 fills the files and the other ranks read them; in memory each rank fills its own.
    """

    SPLITS = ("train", "val")

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.report: dict[str, dict[str, float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Not on_fit_start: Lightning creates the first training iterator (and forks its loader
        # workers, each with a copy of the data set) before on_fit_start, so a cache attached then
        # would reach the workers only from the second epoch on. setup runs before any loader exists.
        if stage != "fit":
            return
        locked = getattr(pl_module, "vision_locked", None)
        datamodule = trainer.datamodule
        if locked is None or not locked.fully_locked:
            return
        if not getattr(pl_module, "vision_outputs_cacheable", True):
            log.info("embedding cache: a distillation teacher reads the pixels; the locked tower runs every epoch")
            return
        if not hasattr(datamodule, "cacheable_images"):
            log.info("embedding cache: %s does not serve cached embeddings; the locked tower runs every epoch",
                     type(datamodule).__name__)
            return
        tower_hash = tower_fingerprint(pl_module.vision)
        for split in self.SPLITS:
            if split == "val" and not trainer.limit_val_batches:
                continue  # validation is off: nothing would read that cache
            images = datamodule.cacheable_images(split)
            if images is None:
                log.info("embedding cache: the %s images are not cacheable (augmented, or a stream whose sample "
                         "counts are unknown); the locked tower runs every epoch", split)
                continue
            start, cpu_start = time.perf_counter(), time.process_time()
            cache, encoded = self._prepare(trainer, pl_module, images, tower_hash, f"embedding cache ({split})")
            datamodule.use_embedding_cache(split, cache)
            self.report[split] = {"encoded": encoded, "seconds": time.perf_counter() - start,
                                  "cpu_seconds": time.process_time() - cpu_start, **cache.counts()}
            log.info("embedding cache (%s, %s): %d rows, %d encoded now, %.1f s", split, self.settings.storage,
                     cache.rows, encoded, self.report[split]["seconds"])

    def _prepare(self, trainer: L.Trainer, pl_module: Any, images: CacheableImages | CacheableStream,
                 tower_hash: str, desc: str) -> tuple[EmbeddingCache, int]:
        def encode(pixels: torch.Tensor) -> TowerOutput:
            # The same numerics as an uncached training step: eval mode, no graph, the run's precision.
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                return pl_module.vision_tower_output(pixels)

        was_training = pl_module.vision.training
        pl_module.vision.eval()
        # The strategy moves the module to its device only after setup; the tower goes there now.
        pl_module.vision.to(trainer.strategy.root_device)
        try:
            return prepare_cache(trainer, images, encode, tower_hash, self.settings, desc)
        finally:
            pl_module.vision.train(was_training)


def prepare_cache(trainer: L.Trainer, images: CacheableImages | CacheableStream,
                  encode: Callable[[torch.Tensor], TowerOutput], tower_hash: str, settings: CacheSettings,
                  desc: str) -> tuple[EmbeddingCache, int]:
    """Open the cache of ``images`` through ``encode`` (a frozen network whose weights hash to
    ``tower_hash``) and fill its missing rows; return it and how many images were encoded now.

    In memory each rank fills its own; on disk rank 0 fills the files (under a lock: concurrent runs
    fill once) and every rank then maps them. Used by :class:`LockedTowerCache` and by distillation's
    teacher cache (``vlm_lab/distillation.py``).
    """
    device = trainer.strategy.root_device
    probe = encode(_first_usable_pixels(images)[None].to(device))
    cache = open_cache(images, None, probe, settings, tower_hash)
    filler = fill_keyed if cache.keyed else fill
    if cache.folder is None:
        return cache, filler(cache, images, encode, device, settings.batch_size, settings.num_workers, desc)
    encoded = 0
    if trainer.is_global_zero:
        with _file_lock(cache.folder.parent / f"{cache.key}.lock"):  # concurrent runs: one fills
            if not cache.complete:
                cache.create_files()
            encoded = filler(cache, images, encode, device, settings.batch_size, settings.num_workers, desc)
            cache.flush()
    trainer.strategy.barrier("embedding_cache")
    cache.reopen()  # every rank maps the files rank 0 wrote
    return cache, encoded


def _first_usable_pixels(images: CacheableImages | CacheableStream) -> torch.Tensor:
    candidates = (pixels for _, pixels in images.keyed_images()) if is_stream(images) else \
        (images.image_row_pixels(row) for row in range(images.image_rows()))
    for pixels in candidates:
        if pixels is not None:
            return pixels
    raise ConfigError("embedding cache: no usable image in the split")


class _file_lock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
