"""Web-scale image-text pairs: CC3M, CC12M, LAION-style data.

Two layouts, per split:

- webdataset shards as img2dataset writes them (``data.train_shards``: a brace pattern such as
  ``cc3m/{00000..00331}.tar``, or a list), streamed (see ``shards.py``);
- a caption table, ``filepath<TAB>caption`` (``.tsv``) or ``filepath,caption`` (``.csv``), with the
  image folder its paths are relative to (``data.train_table`` + ``data.train_images``).

Each split picks its layout on its own: shards for training and a table for validation is fine.
"""

from __future__ import annotations

from typing import Any, Iterator

import webdataset as wds
from torch.utils.data import Dataset

from vlm_lab.data.base import CaptionDataModule
from vlm_lab.data.records import CaptionedImages, RawSample, Record, raw_samples, read_caption_table
from vlm_lab.data.shards import (ShardStream, expand_shards, image_member, key_to_id, sample_captions,
                                 shard_sample_count, skip_and_count)
from vlm_lab.data.transforms import open_image
from vlm_lab.distributed import world_info
from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_datamodule
from vlm_lab.towers.base import ImageConfig


@register_datamodule("cc3m")
class CC3MDataModule(CaptionDataModule):
    """Image-caption pairs from img2dataset shards or a caption table (CC3M, CC12M, LAION...).

    Shards stream: each epoch every rank and loader worker reads its own share, so every sample is
    seen once per epoch (shuffled through a buffer in training); the epoch length comes from
    img2dataset's ``*_stats.json`` files (or a scan of the local tars) unless ``train_samples`` /
    ``val_samples`` fix it. Bad samples (truncated JPEG, missing or empty caption) are skipped and
    counted. A table is read at random like COCO.

    Args:
        train_shards, val_shards: webdataset shards (brace pattern or list).
        train_table, val_table: ``.tsv``/``.csv`` caption tables (instead of shards).
        train_images, val_images: image folders of the tables (default: the table's folder).
        train_samples, val_samples: samples per epoch over all ranks (default: from the stats).
        batch_size: training images per batch.
        eval_batch_size: validation images per batch (default: ``batch_size``).
        num_workers: data loader worker processes.
        worker_slots: batches each worker may have in flight in reused shared memory (0: PyTorch's
            hand-off, fresh shared memory per batch; see ``vlm_lab/data/handoff.py``).
        shuffle_buffer: samples each training worker shuffles among.
        augment: training augmentation: true (a random 90-100% crop) or a mapping of settings for timm's
            ``create_transform`` (``vlm_lab.data.transforms.Augmentation``: auto_augment, color_jitter...).
        seed: fixes the shard order, shuffling, crops and caption draws of every epoch.
    """

    def __init__(self, tokenizer: Any, image_config: ImageConfig, max_length: int,
                 train_shards: str | list[str] | None = None, val_shards: str | list[str] | None = None,
                 train_table: str | None = None, val_table: str | None = None,
                 train_images: str | None = None, val_images: str | None = None,
                 train_samples: int | None = None, val_samples: int | None = None,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 worker_slots: int = 4,
                 shuffle_buffer: int = 1000, augment: bool | dict[str, Any] = False, seed: int = 0) -> None:
        super().__init__(tokenizer, image_config, max_length, batch_size, eval_batch_size, num_workers, augment,
                         seed, worker_slots)
        self.shuffle_buffer = shuffle_buffer
        self.samples = {"train": train_samples, "val": val_samples}
        self.urls: dict[str, list[str]] = {}
        self.tables: dict[str, list[Record]] = {}
        for split, shards, table, images in (("train", train_shards, train_table, train_images),
                                             ("val", val_shards, val_table, val_images)):
            if shards is not None and table is not None:
                raise ConfigError(f"data.{split}_shards and data.{split}_table are both set; give one layout per split")
            if images is not None and table is None:
                raise ConfigError(f"data.{split}_images is the folder of data.{split}_table, which is not set")
            if shards is not None:
                self.urls[split] = expand_shards(shards, f"{split}_shards")
            elif table is not None:
                self.tables[split] = read_caption_table(table, images, f"{split}_table")
        if not self.urls and not self.tables:
            raise ConfigError("cc3m needs data.train_shards or data.train_table (and optionally the val_ ones)")
        self._counts: dict[str, list[int] | None] = {}

    def _check_split(self, split: str) -> None:
        if split not in self.urls and split not in self.tables:
            hint = "; evaluate on val (vlm-lab validate)" if split == "test" else ""
            raise ConfigError(f"cc3m has no {split} split: set data.{split}_shards or data.{split}_table{hint}")

    def shard_counts(self, split: str) -> list[int] | None:
        """Samples per shard (stats files, else a scan of local tars), or None if some are unknown."""
        if split not in self._counts:
            counts = [shard_sample_count(url) for url in self.urls[split]]
            self._counts[split] = None if any(c is None for c in counts) else counts
        return self._counts[split]

    def dataset(self, split: str) -> Dataset:
        self._check_split(split)
        if split in self.tables:
            return CaptionedImages(self.tables[split], self.transform(split), self.bad_samples[split], self.decode_size)
        rank, world_size = world_info()
        return self.stream(split, rank, world_size)

    def stream(self, split: str, rank: int, world_size: int) -> ShardStream:
        """The shard stream of ``split`` as process ``rank`` of ``world_size`` reads it."""
        self._check_split(split)
        samples = self.samples.get(split)
        counts = None if samples is not None else self.shard_counts(split)
        if counts is None and samples is None:
            raise ConfigError(f"data.{split}_shards: some shards are remote or lack img2dataset stats files, so "
                              f"the epoch length is unknown; set data.{split}_samples")
        return ShardStream(
            self.urls[split], split, self.transform(split), self.collate(split),
            self.batch_size if split == "train" else self.eval_batch_size, self.bad_samples[split],
            rank=rank, world_size=world_size, num_workers=self.num_workers, counts=counts,
            samples_per_epoch=samples, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
            decode_size=self.decode_size,
        )

    def raw_samples(self, split: str) -> Iterator[RawSample]:
        self._check_split(split)
        if split in self.tables:
            yield from raw_samples(self.tables[split])
            return
        bad = self.bad_samples[split]
        for url in self.urls[split]:
            for raw in wds.tarfile_samples([{"url": url}], handler=skip_and_count(bad, url)):
                where = f"{url} key {raw.get('__key__')}"
                image_bytes, captions = image_member(raw), sample_captions(raw)
                if image_bytes is None or isinstance(captions, str):
                    bad.record("missing image" if image_bytes is None else captions, where)
                    continue
                # Decoded only when asked: caption statistics need no pixels.
                yield RawSample(tuple(captions), key_to_id(raw["__key__"]), where,
                                lambda data=image_bytes: open_image(data))

    def split_summary(self, split: str) -> dict[str, int | None]:
        self._check_split(split)
        if split in self.tables:
            return {"images": len(self.tables[split]), "captions": len(self.tables[split]), "shards": None}
        counts = self.shard_counts(split)
        total = sum(counts) if counts is not None else self.samples.get(split)
        return {"images": total, "captions": None, "shards": len(self.urls[split])}
