"""Turning samples into batches: shared by every data module.

A sample is ``{"pixel_values": Tensor[3, H, W], "captions": list[str], "image_id": int}``. A batch is::

    pixel_values       [B, 3, H, W]   normalised float32, or uint8 from a transform built with
                                      normalize=False (the model normalises those on its device)
    input_ids          [T, L]   tokenised captions, padded to the longest in the batch
    attention_mask     [T, L]
    text_image_index   [T]      which image of the batch each caption describes
    image_ids          [B]      dataset-wide image ids (to de-duplicate across ranks)

A data set serving the locked-tower embedding cache (``vlm_lab/embedding_cache.py``) gives
``vision_pooled [B, D]`` (and ``vision_tokens [B, S, D]``) in place of ``pixel_values``, and one
serving a distillation teacher's cache (``vlm_lab/distillation.py``) adds ``teacher_image_pooled [B, D]``.

Training batches carry one caption per image (T == B, drawn at random), so the contrastive targets
are the diagonal. Evaluation batches carry every caption, for multi-caption retrieval.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, SequentialSampler, default_collate

from vlm_lab.data.epochs import EpochLoader
from vlm_lab.data.handoff import SlotLoader, WorkerSlots
from vlm_lab.data.unique_images import UniqueImageBatchSampler
from vlm_lab.towers.base import ImageConfig


def image_to_tensor(image: Image.Image, config: ImageConfig) -> torch.Tensor:
    """Resize (if needed) and normalise a PIL image as the tower expects; no augmentation."""
    height, width = config.size
    image = image.convert("RGB")
    if image.size != (width, height):
        resample = getattr(Image.Resampling, config.interpolation.upper(), Image.Resampling.BICUBIC)
        image = image.resize((width, height), resample)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (array - mean) / std


# What a sample may carry for its image: pixels, or a locked tower's cached outputs; and a
# distillation teacher's cached image features (vlm_lab/distillation.py).
IMAGE_KEYS = ("pixel_values", "vision_pooled", "vision_tokens", "teacher_image_pooled")


class ImageTextCollate:
    """Stack images and tokenise captions with dynamic padding (see the module docstring).

    With ``slots``, loader workers stack the pixels into reused shared memory (``handoff.py``).
    """

    def __init__(self, tokenizer: Any, max_length: int, train: bool, slots: WorkerSlots | None = None) -> None:
        self.tokenizer, self.max_length, self.train, self.slots = tokenizer, max_length, train, slots

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        captions: list[str] = []
        owners: list[int] = []
        for i, sample in enumerate(samples):
            chosen = [random.choice(sample["captions"])] if self.train else sample["captions"]
            captions += chosen
            owners += [i] * len(chosen)
        tokens = self.tokenizer(captions, padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        images = {key: [s[key] for s in samples] for key in IMAGE_KEYS if key in samples[0]}
        pixels = images.pop("pixel_values") if self.slots is not None and "pixel_values" in images else None
        batch = {
            # default_collate stacks straight into shared memory inside a loader worker, saving the
            # copy that sending a normal tensor to the main process makes (1 ms per 224 px image).
            **{key: default_collate(values) for key, values in images.items()},
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "text_image_index": torch.tensor(owners, dtype=torch.long),
            "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            "captions": captions,  # the raw strings: caption metrics score against them, not the tokens
        }
        if pixels is not None:  # the slots stack them (handoff.py)
            return self.slots.pack(batch, pixels)
        return batch


def caption_loader(dataset: Dataset, training: bool, batch_size: int, num_workers: int,
                   collate_fn: ImageTextCollate, seed: int = 0,
                   epoch: Callable[[], int] | None = None, pin_memory: bool = False,
                   skip: Callable[[], int] | None = None, entry_images: Sequence[int] | None = None) -> SlotLoader:
    """The DataLoader of a map-style image-caption dataset: the one policy every data module uses.

    Training shuffles and drops the last partial batch (contrastive batches must keep their size,
    and one sample carries no signal), each pass seeded by (``seed``, ``epoch()``) (an
    :class:`~vlm_lab.data.epochs.EpochLoader`; ``epoch`` is required in training; ``skip``: the batches
    of the pass to leave out, for a resumed run; ``entry_images``: the image of each entry, to deal
    batches that never hold one image twice, ``data/unique_images.py``). Evaluation keeps
    every sample, in order. The loader receives the pixels ``collate_fn.slots`` hands over, and pins
    its batches with ``pin_memory`` (``handoff.pins_memory``: when training on CUDA).
    """
    if training:
        if epoch is None:
            raise ValueError("a training loader needs the epoch of each pass (epoch=...)")
        if entry_images is not None:
            batches = UniqueImageBatchSampler(SequentialSampler(dataset), batch_size, True, entry_images, seed)
            return EpochLoader(dataset, seed, epoch, batch_sampler=batches, num_workers=num_workers,
                               collate_fn=collate_fn, pin_memory=pin_memory, slots=collate_fn.slots, skip=skip)
        return EpochLoader(dataset, seed, epoch, batch_size=batch_size, shuffle=True, drop_last=True,
                           num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
                           slots=collate_fn.slots, skip=skip)
    return SlotLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        slots=collate_fn.slots,
    )
