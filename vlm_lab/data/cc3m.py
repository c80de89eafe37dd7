"""Web-scale image-text pairs: CC3M, CC12M, LAION-style data, and mixtures of them.

Two layouts, per split:

- webdataset shards as img2dataset writes them (``data.train_shards``: a brace pattern such as
  ``cc3m/{00000..00331}.tar``, or a list), streamed (see ``shards.py`` and ``tar_shards.py``); for training, several
  sources of shards mixed in one stream (``data.train_sources``, optionally ``data.resampled``;
  see ``mixtures.py``);
- a caption table, ``filepath<TAB>caption`` (``.tsv``) or ``filepath,caption`` (``.csv``), with the
  image folder its paths are relative to (``data.train_table`` + ``data.train_images``).

Each split picks its layout on its own: shards for training and a table for validation is fine.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import Dataset

from vlm_lab.data.base import CaptionDataModule
from vlm_lab.data.mixtures import parse_sources
from vlm_lab.data.records import CaptionedImages, RawSample, Record, raw_samples, read_caption_table
from vlm_lab.data.shards import ShardStream, stream_raw_samples
from vlm_lab.data.tar_shards import TarShards, expand_shards
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
        train_sources: several sources of training shards in one stream, instead of ``train_shards``:
            a list of ``{name, shards, weight}`` (``weight`` with ``resampled`` only; see
            ``vlm_lab/data/mixtures.py``).
        resampled: training draws samples with replacement (by the sources' weights), ``train_samples``
            per epoch; without it, an epoch reads every training sample exactly once.
        train_table, val_table: ``.tsv``/``.csv`` caption tables (instead of shards).
        train_images, val_images: image folders of the tables (default: the table's folder).
        train_samples, val_samples: samples per epoch over all ranks (default: from the stats).
        batch_size: training images per batch.
        eval_batch_size: validation images per batch (default: ``batch_size``).
        num_workers: data loader worker processes.
        worker_slots: batches each worker may have in flight in reused shared memory (0: PyTorch's
            hand-off, fresh shared memory per batch; see ``vlm_lab/data/handoff.py``).
        shuffle_buffer: samples each training worker shuffles among (per source when resampled).
        augment: training augmentation: true (a random 90-100% crop) or a mapping of settings for timm's
            ``create_transform`` (``vlm_lab.data.transforms.Augmentation``: auto_augment, color_jitter...).
        seed: fixes the shard order, shuffling, crops and caption draws of every epoch.
    """

    def __init__(self, tokenizer: Any, image_config: ImageConfig, max_length: int,
                 train_shards: str | list[str] | None = None, val_shards: str | list[str] | None = None,
                 train_sources: list[dict[str, Any]] | None = None, resampled: bool = False,
                 train_table: str | None = None, val_table: str | None = None,
                 train_images: str | None = None, val_images: str | None = None,
                 train_samples: int | None = None, val_samples: int | None = None,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 worker_slots: int = 4,
                 shuffle_buffer: int = 1000, augment: bool | dict[str, Any] = False, seed: int = 0) -> None:
        super().__init__(tokenizer, image_config, max_length, batch_size, eval_batch_size, num_workers, augment,
                         seed, worker_slots)
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.samples = {"train": train_samples, "val": val_samples}
        self.sources: dict[str, list[TarShards]] = {}
        self.weights: list[float | None] = []
        self.tables: dict[str, list[Record]] = {}
        if train_sources is not None:
            if train_shards is not None or train_table is not None:
                given = "data.train_shards" if train_shards is not None else "data.train_table"
                raise ConfigError(f"data.train_sources and {given} are both set; list every training source in "
                                  f"data.train_sources")
            specs = parse_sources(train_sources, "train_sources", resampled)
            self.sources["train"] = [TarShards(expand_shards(spec.shards, _source_field(i, spec.name)), spec.name)
                                     for i, spec in enumerate(specs)]
            self.weights = [spec.weight for spec in specs]
        for split, shards, table, images in (("train", train_shards, train_table, train_images),
                                             ("val", val_shards, val_table, val_images)):
            if shards is not None and table is not None:
                raise ConfigError(f"data.{split}_shards and data.{split}_table are both set; give one layout per split")
            if images is not None and table is None:
                raise ConfigError(f"data.{split}_images is the folder of data.{split}_table, which is not set")
            if shards is not None:
                self.sources[split] = [TarShards(expand_shards(shards, f"{split}_shards"), f"{split}_shards")]
            elif table is not None:
                self.tables[split] = read_caption_table(table, images, f"{split}_table")
        if not self.sources and not self.tables:
            raise ConfigError("cc3m needs data.train_shards, data.train_sources or data.train_table "
                              "(and optionally the val_ ones)")
        if resampled:
            if "train" not in self.sources:
                raise ConfigError("data.resampled=true resamples training shards; set data.train_shards or "
                                  "data.train_sources")
            if train_samples is None:
                raise ConfigError("data.resampled=true draws samples with replacement, so it needs the epoch "
                                  "length: set data.train_samples (samples per epoch over all ranks)")

    def _check_split(self, split: str) -> None:
        if split not in self.sources and split not in self.tables:
            hint = "; evaluate on val (vlm-lab validate)" if split == "test" else ""
            raise ConfigError(f"cc3m has no {split} split: set data.{split}_shards or data.{split}_table{hint}")

    def shard_counts(self, split: str) -> list[int] | None:
        """Samples per shard of all the split's sources (stats files, else a scan of local tars), or
        None if some are unknown."""
        counts: list[int] = []
        for source in self.sources[split]:
            known = source.counts()
            if known is None:
                return None
            counts += known
        return counts

    def dataset(self, split: str) -> Dataset:
        self._check_split(split)
        if split in self.tables:
            # Training: an entry per caption (a table row), as the rows are the pairs; evaluation: an
            # entry per image with all its captions, as retrieval scores them.
            return CaptionedImages(self.tables[split], self.transform(split), self.bad_samples[split], self.decode_size,
                                   per_caption=split == "train")
        rank, world_size = world_info()
        return self.stream(split, rank, world_size)

    def stream(self, split: str, rank: int, world_size: int) -> ShardStream:
        """The shard stream of ``split`` as process ``rank`` of ``world_size`` reads it."""
        self._check_split(split)
        samples = self.samples.get(split)
        resampled = self.resampled and split == "train"
        if samples is None:
            for source in self.sources[split]:
                if source.counts() is None:
                    where = f"{source.name} (data.train_sources)" if self.weights else f"data.{split}_shards"
                    raise ConfigError(f"{where}: some shards are remote or lack img2dataset stats files, so the epoch "
                                      f"length is unknown; set data.{split}_samples")
        return ShardStream(
            self.sources[split], split, self.transform(split), self.collate(split),
            self.batch_size if split == "train" else self.eval_batch_size, self.bad_samples[split],
            rank=rank, world_size=world_size, num_workers=self.num_workers, samples_per_epoch=samples,
            resampled=resampled, weights=self.weights if split == "train" and self.weights else None,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, decode_size=self.decode_size,
        )

    def raw_samples(self, split: str) -> Iterator[RawSample]:
        self._check_split(split)
        if split in self.tables:
            yield from raw_samples(self.tables[split])
            return
        mixed = len(self.sources[split]) > 1
        for source in self.sources[split]:
            yield from stream_raw_samples(source, self.bad_samples[split], mixed)

    def split_summary(self, split: str) -> dict[str, int | None]:
        self._check_split(split)
        if split in self.tables:
            records = self.tables[split]
            return {"images": len(records), "captions": sum(len(r.captions) for r in records), "shards": None}
        counts = self.shard_counts(split)
        total = sum(counts) if counts is not None else self.samples.get(split)
        return {"images": total, "captions": None, "shards": sum(s.num_shards for s in self.sources[split])}


def _source_field(index: int, name: str) -> str:
    """How messages name a source: ``train_sources[1] (laion)``, or ``train_sources[1]`` unnamed."""
    field = f"train_sources[{index}]"
    return field if name == field else f"{field} ({name})"
