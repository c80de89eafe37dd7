"""Distillation from a teacher CLIP (``model.distill``; open_clip's ``--distill``).

The student trains on its usual loss plus ``weight`` times a distillation term
(``vlm_lab.losses.SimilarityDistillation``): the KL divergence between the teacher's and the student's
image-text similarity distributions over the batch (settings: ``vlm_lab.schema.DistillSettings``). The
teacher is a frozen ``VisionLanguageModule`` with a contrastive loss: a vlm-lab checkpoint, or a
Hugging Face / open_clip CLIP folder (``vlm_lab.interop.load_teacher`` reads either;
``vlm_lab.build_module`` attaches it).

The teacher sees what the student sees, in its own terms: the batch's captions (the raw strings)
through its own tokenizer, and the batch's pixels converted to its own image size, mean and std
(:func:`teacher_pixels`; the same crop, resized). It runs in eval mode without a graph.

It is held by a :class:`Teacher`, a plain object rather than a submodule, so that it stays out of
the student's parameters (the optimizer, DDP), its state dict and its checkpoints; the module moves
it to the batch's device on first use.

The teacher cache (``model.distill.cache``, on by default). The teacher never changes, so where the
training images are deterministic (the conditions of the locked-tower embedding cache:
``datamodule.cacheable_images("train")``, i.e. no augmentation, and for a stream known shard counts)
its outputs are the same in every epoch. :class:`TeacherCache` (a callback that
``vlm_lab.api.build_trainer`` adds) then runs the teacher once, when the fit is set up, with the
locked-tower cache's machinery (``vlm_lab.embedding_cache.prepare_cache``, same storage settings from
the ``embedding_cache`` section):

- over every training image: its features are rows of an embedding cache that the datasets serve
  beside the pixels, as ``teacher_image_pooled`` (by row, or by sample key for a stream);
- over every caption a training batch may draw (``caption_texts()`` of the dataset; random caption
  draws are fine, each caption is encoded once): a keyed cache, found by a hash of the caption
  (:func:`caption_key`), that the teacher looks the batch's captions up in.

Training then makes no teacher forward pass, and the weights are bit for bit those of an uncached
run (tests/test_distillation.py). With a fully locked student vision tower both caches stand in for
the pixels, which the batches then no longer carry. Where the images are not deterministic the
callback logs one line and the teacher runs every step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import IterableDataset, get_worker_info

from vlm_lab.data.transforms import normalize_pixels
from vlm_lab.embedding_cache import TEACHER_IMAGE, CacheSettings, EmbeddingCache, key63, prepare_cache, tower_fingerprint
from vlm_lab.errors import ConfigError
from vlm_lab.towers.base import ImageConfig, TowerOutput

log = logging.getLogger(__name__)


class Teacher:
    """A frozen teacher module (a ``VisionLanguageModule`` with a contrastive loss), outside the student.

    :meth:`features` gives its normalised image and text embeddings of a training batch and its logit
    scale, computed without a graph, or read from the teacher cache (module docstring) where it has them.
    """

    def __init__(self, module: torch.nn.Module, source: str = "the teacher") -> None:
        if getattr(module, "loss", None) is None:
            raise ConfigError(f"model.distill.teacher: {source} has no contrastive head (a captioning-only CoCa?); "
                              f"a teacher must embed images and texts")
        module.requires_grad_(False)
        self.module = module.eval()
        self.source = source
        # Set by TeacherCache for the fit it prepares: the keyed cache of caption features, and whether
        # the training batches carry the image features (so need no pixels for the teacher).
        self.text_cache: EmbeddingCache | None = None
        self.images_cached = False

    def features(self, batch: Mapping[str, Any], student_images: ImageConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_features, text_features, logit_scale)`` of the teacher for a training batch.

        The batch must carry pixels (``pixel_values``, prepared for ``student_images``) or the cached
        image features (``teacher_image_pooled``), and its captions as strings (``captions``, one per
        image), as the collate functions give them.
        """
        if "captions" not in batch or not ("pixel_values" in batch or f"{TEACHER_IMAGE}_pooled" in batch):
            raise ConfigError("distillation: the batch has no pixel_values or captions for the teacher (a batch of "
                              "cached embeddings without the teacher's own cache?)")
        module = self.module
        device = (batch["pixel_values"] if "pixel_values" in batch else batch["input_ids"]).device
        if module.device != device:
            module.to(device)
        module.eval()  # a trainer's train() calls never reach it, but a user's might
        image_features = batch.get(f"{TEACHER_IMAGE}_pooled")
        if image_features is None:
            image_features = self.image_features(batch["pixel_values"], student_images)
        text_features = self.text_cache.pooled_by_keys([caption_key(c) for c in batch["captions"]]) \
            if self.text_cache is not None else None
        if text_features is None:  # no cache, or a caption it never saw (a batch from elsewhere)
            text_features = self.text_features(batch["captions"])
        return image_features.to(device), text_features.to(device), module.loss.logit_scale_value()

    def image_features(self, pixels: torch.Tensor, student_images: ImageConfig) -> torch.Tensor:
        """The teacher's normalised embeddings of student-prepared pixels, without a graph."""
        weights_dtype = next(self.module.vision.parameters()).dtype
        with torch.no_grad():
            return self.module.encode_image(teacher_pixels(pixels, student_images, self.module.image_config)
                                            .to(weights_dtype))

    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """The teacher's normalised embeddings of captions (its own tokenizer), without a graph."""
        with torch.no_grad():
            return self.module.encode_text(list(captions))


def teacher_pixels(pixels: torch.Tensor, source: ImageConfig, target: ImageConfig) -> torch.Tensor:
    """Pixels prepared for ``source`` (normalised floats, or ``uint8``) as ``target`` wants them.

    Unchanged when size, mean and std agree; otherwise back to 0-1 values, resized bicubically (with
    antialiasing) to ``target.size``, and normalised with ``target``'s mean and std. The crop stays the
    student's.
    """
    same_size = tuple(pixels.shape[-2:]) == tuple(target.size)
    if pixels.dtype == torch.uint8:
        if same_size:
            return normalize_pixels(pixels, target)
        values = pixels.float() / 255
    else:
        if same_size and (source.mean, source.std) == (target.mean, target.std):
            return pixels
        values = pixels.float() * _channels(source.std, pixels) + _channels(source.mean, pixels)
    if not same_size:
        values = F.interpolate(values, size=tuple(target.size), mode="bicubic", align_corners=False,
                               antialias=True).clamp_(0, 1)
    return (values - _channels(target.mean, values)) / _channels(target.std, values)


def _channels(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(3, 1, 1)


# --------------------------------------------------------------------------------------------------
# The teacher cache (module docstring)


def caption_key(caption: str) -> int:
    """A caption's key in the teacher's text cache: a 63-bit hash of its text (as a stream's sample keys)."""
    return key63(caption)


class CaptionTexts(IterableDataset):
    """The distinct captions of a split as an embedding cache's *stream* (``CacheableStream``):
    ``(caption key, the caption's index)`` pairs, so that the cache's keyed filling, storage and
    lookup serve captions as they serve a stream's images. The teacher's encode function turns the
    indices back into text (:meth:`texts_of`); loader workers take every ``num_workers``-th caption."""

    def __init__(self, captions: Sequence[str], teacher: Teacher) -> None:
        super().__init__()
        self.captions = sorted(set(captions))
        tokenizer = teacher.module.tokenizer
        self.tokenizer = f"{type(tokenizer).__name__} {len(tokenizer)} max_length={teacher.module.max_length}"

    def texts_of(self, indices: torch.Tensor) -> list[str]:
        return [self.captions[i] for i in indices.tolist()]

    # CacheableStream (vlm_lab/embedding_cache.py)

    def image_rows(self) -> int:
        return len(self.captions)

    def image_identity(self) -> str:
        digest = hashlib.sha1("\n".join(self.captions).encode("utf-8", "surrogateescape")).hexdigest()
        return f"teacher captions {len(self.captions)} {digest} {self.tokenizer}"

    def keyed_images(self) -> "CaptionTexts":
        return self

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.captions), workers):
            yield caption_key(self.captions[index]), torch.tensor(index)


class TeacherCache(Callback):
    """Fills the teacher cache when a fit is set up and attaches it (see the module docstring).

    It does nothing without a teacher or with ``model.distill.cache: false``, and logs one line and
    leaves the teacher running every step when the training images are not deterministic or the data
    module does not serve the cache. ``report`` holds what filling took, as ``LockedTowerCache``'s.
    Added before ``LockedTowerCache``, which may then cache a fully locked student vision tower too.
    """

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = dataclasses.replace(settings, tokens=False)  # the teacher stores features only
        self.report: dict[str, dict[str, float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # In setup, before any loader (and its workers) exists, as LockedTowerCache.
        teacher: Teacher | None = getattr(pl_module, "teacher", None)
        if stage != "fit" or teacher is None:
            return
        teacher.text_cache, teacher.images_cached = None, False  # from an earlier fit of the module
        if not pl_module.distill.cache:
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "use_teacher_cache"):
            log.info("distillation: %s does not serve cached teacher features; the teacher runs every step",
                     type(datamodule).__name__)
            return
        images = datamodule.cacheable_images("train")
        if images is None or not hasattr(images, "caption_texts"):
            log.info("distillation: the train images are not cacheable (augmented, or a stream whose sample counts "
                     "are unknown); the teacher runs every step")
            return
        start, cpu_start = time.perf_counter(), time.process_time()
        teacher_hash = tower_fingerprint(teacher.module)
        device = trainer.strategy.root_device
        teacher.module.to(device).eval()
        student_images = pl_module.image_config
        captions = CaptionTexts(images.caption_texts(), teacher)

        def encode_images(pixels: torch.Tensor) -> TowerOutput:
            # The numerics of an uncached training step: the run's precision context, as there.
            with trainer.precision_plugin.forward_context():
                return TowerOutput(pooled=teacher.image_features(pixels, student_images), tokens=None)

        def encode_texts(indices: torch.Tensor) -> TowerOutput:
            with trainer.precision_plugin.forward_context():
                return TowerOutput(pooled=teacher.text_features(captions.texts_of(indices)), tokens=None)

        image_cache, image_count = prepare_cache(
            trainer, images, encode_images, _hash("teacher image features", teacher_hash, teacher.module.image_config),
            self.settings, "teacher cache (images)")
        text_cache, text_count = prepare_cache(trainer, captions, encode_texts,
                                               _hash("teacher text features", teacher_hash), self.settings,
                                               "teacher cache (captions)")
        datamodule.use_teacher_cache("train", image_cache)
        teacher.text_cache, teacher.images_cached = text_cache, True
        self.report["train"] = {"images": image_cache.rows, "captions": text_cache.rows, "encoded_images": image_count,
                                "encoded_captions": text_count, "seconds": time.perf_counter() - start,
                                "cpu_seconds": time.process_time() - cpu_start}
        log.info("distillation: teacher cache (%s): %d images, %d captions, %.1f s", self.settings.storage,
                 image_cache.rows, text_cache.rows, self.report["train"]["seconds"])


def _hash(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()
