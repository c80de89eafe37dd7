"""What every image-caption data module shares: transforms, collate, loaders and bad-sample counts.

Subclasses (``coco.py``, ``cc3m.py``) only say where a split's data is and how to read it:
``dataset(split)`` returns a map-style ``CaptionedImages`` or a ``ShardStream``, ``raw_samples`` and
``split_summary`` feed ``vlm-lab data inspect``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlm_lab.data.collate import ImageTextCollate, caption_loader
from vlm_lab.data.epochs import TrainingEpochs
from vlm_lab.data.handoff import WorkerSlots, pins_memory
from vlm_lab.data.health import BadSampleCounter, attach_report
from vlm_lab.data.records import CaptionedImages, RawSample
from vlm_lab.data.shards import ShardStream, StreamLoader
from vlm_lab.data.transforms import Augmentation, build_transform, decode_size
from vlm_lab.embedding_cache import EmbeddingCache
from vlm_lab.errors import ConfigError
from vlm_lab.towers.base import ImageConfig

SPLITS = ("train", "val", "test", "dev")  # dev: carved from train where a data module offers it (dev_split.py)


class CaptionDataModule(L.LightningDataModule):
    """Base of the image-caption data modules (not registered itself)."""

    def __init__(self, tokenizer: Any, image_config: ImageConfig, max_length: int, batch_size: int,
                 eval_batch_size: int | None, num_workers: int, augment: bool | dict[str, Any] | None, seed: int,
                 worker_slots: int) -> None:
        super().__init__()
        if worker_slots < 0:
            raise ConfigError(f"data.worker_slots must be 0 (PyTorch's hand-off) or more, not {worker_slots}")
        self.tokenizer, self.image_config, self.max_length = tokenizer, image_config, max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        # None, or the training augmentation (``augment: true`` is its defaults; transforms.Augmentation).
        self.augment: Augmentation | None = Augmentation.from_config(augment, "data.augment")
        self.worker_slots = worker_slots
        self._slots: dict[str, WorkerSlots | None] = {}
        self.bad_samples = {split: BadSampleCounter(split) for split in SPLITS}
        self.epochs = TrainingEpochs()
        # The locked-tower embedding cache (vlm_lab/embedding_cache.py): caches by split, and the
        # dataset or stream each split's loader serves (Lightning builds the training loader early).
        self.embedding_caches: dict[str, EmbeddingCache] = {}
        self.teacher_caches: dict[str, EmbeddingCache] = {}  # distillation's teacher cache (vlm_lab/distillation.py)
        self._served: dict[str, CaptionedImages | ShardStream] = {}
        # data.unique_images_per_batch (data/unique_images.py): set by the modules that offer it.
        self.unique_images_per_batch = False

    # ---------------------------------------------------------------------------------------------
    # For subclasses

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``: map-style, or a ``ShardStream`` that batches itself."""
        raise NotImplementedError

    def raw_samples(self, split: str) -> Iterator[RawSample]:
        """The split's samples in storage order, untransformed, for inspection."""
        raise NotImplementedError

    def split_summary(self, split: str) -> dict[str, int | None]:
        """Counts for inspection, e.g. ``{"images": 80, "captions": 400}`` (None: unknown)."""
        raise NotImplementedError

    def transform(self, split: str) -> Callable[[Image.Image], torch.Tensor]:
        """The tower's preprocessing, with the ``augment`` augmentation in training."""
        return build_transform(self.image_config, augment=self.augment if split == "train" else None)

    def collate(self, split: str) -> ImageTextCollate:
        """Tokenises in the loader workers, padding each batch to its longest caption."""
        return ImageTextCollate(self.tokenizer, self.max_length, train=split == "train", slots=self.slots(split))

    def slots(self, split: str) -> WorkerSlots | None:
        """The shared-memory slots the split's loader workers hand pixels over in (``handoff.py``);
        None without workers or with ``worker_slots: 0``."""
        if split not in self._slots:
            batch_size = self.batch_size if split == "train" else self.eval_batch_size
            self._slots[split] = WorkerSlots.for_pixels(self.num_workers, batch_size, self.image_config.size,
                                                        per_worker=self.worker_slots)
        return self._slots[split]

    @property
    def decode_size(self) -> tuple[int, int]:
        """The size JPEGs may be decoded down to (see ``transforms.open_image``)."""
        return decode_size(self.image_config)

    # ---------------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        attach_report(self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch the next training pass shuffles for (plain loops; Lightning sets it itself)."""
        self.epochs.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the epoch a resumed run's first training pass is for, and
        the batches of it trained already (``epochs.TrainingEpochs``)."""
        return self.epochs.state_dict(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs.load_state_dict(state_dict)

    def cacheable_images(self, split: str) -> CaptionedImages | ShardStream | None:
        """The split's images for the embedding cache: a map-style dataset, or a stream whose shard
        counts are known, when not augmented; else None."""
        if self.augment is not None and split == "train":  # every augmentation draws at random
            return None
        dataset = self.dataset(split)
        if isinstance(dataset, CaptionedImages) or isinstance(dataset, ShardStream) and dataset.cacheable():
            return dataset
        return None

    def use_embedding_cache(self, split: str, cache: EmbeddingCache) -> None:
        """The split's datasets and streams, served already or later, hand out the cache's rows."""
        self.embedding_caches[split] = cache
        if split in self._served:
            self._served[split].embeddings = cache

    def use_teacher_cache(self, split: str, cache: EmbeddingCache) -> None:
        """As :meth:`use_embedding_cache`, for distillation's teacher cache: samples carry the teacher's
        image features beside their pixels (vlm_lab/distillation.py)."""
        self.teacher_caches[split] = cache
        if split in self._served:
            self._served[split].teacher_embeddings = cache

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        if isinstance(dataset, (CaptionedImages, ShardStream)):
            dataset.embeddings = self.embedding_caches.get(split)
            dataset.teacher_embeddings = self.teacher_caches.get(split)
            self._served[split] = dataset
        training = split == "train"
        epoch = self._next_epoch if training else lambda: 0
        pin_memory = pins_memory(self.trainer)
        if isinstance(dataset, ShardStream):
            loader: DataLoader = StreamLoader(dataset, self.seed, epoch, num_workers=self.num_workers,
                                              pin_memory=pin_memory, slots=self.slots(split),
                                              skip=self.epochs.skip if training else None)
        else:
            images = dataset.entry_images() if training and self.unique_images_per_batch else None
            loader = caption_loader(dataset, training, self.batch_size if training else self.eval_batch_size,
                                    self.num_workers, self.collate(split), self.seed, epoch, pin_memory,
                                    skip=self.epochs.skip if training else None, entry_images=images)
        if training:
            self.epochs.loader = loader
        return loader

    def _next_epoch(self) -> int:
        return self.epochs.next(self.trainer)
