"""Distillation from a teacher CLIP (``model.distill``; open_clip's ``--distill``).

The student trains on its usual loss plus ``weight`` times a distillation term
(``vlm_lab.losses.SimilarityDistillation``): the KL divergence between the teacher's and the student's
image-text similarity distributions over the batch (settings: ``vlm_lab.schema.DistillSettings``). The
teacher is a frozen ``VisionLanguageModule`` with a contrastive loss: a vlm-lab checkpoint, or a
Hugging Face / open_clip CLIP folder (``vlm_lab.interop.load_teacher`` reads either;
``vlm_lab.build_module`` attaches it).

The teacher sees what the student sees, in its own terms: the batch's captions (the raw strings)
through its own tokenizer, and the batch's pixels converted to its own image size, mean and std
(:func:`teacher_pixels`; the same crop, resized). It runs in eval mode without a graph every step.

It is held by a :class:`Teacher`, a plain object rather than a submodule, so that it stays out of
the student's parameters (the optimizer, DDP), its state dict and its checkpoints; the module moves
it to the batch's device on first use.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from vlm_lab.data.transforms import normalize_pixels
from vlm_lab.errors import ConfigError
from vlm_lab.towers.base import ImageConfig


class Teacher:
    """A frozen teacher module (a ``VisionLanguageModule`` with a contrastive loss), outside the student.

    :meth:`features` gives its normalised image and text embeddings of a training batch and its logit
    scale, computed without a graph.
    """

    def __init__(self, module: torch.nn.Module, source: str = "the teacher") -> None:
        if getattr(module, "loss", None) is None:
            raise ConfigError(f"model.distill.teacher: {source} has no contrastive head (a captioning-only CoCa?); "
                              f"a teacher must embed images and texts")
        module.requires_grad_(False)
        self.module = module.eval()
        self.source = source

    def features(self, batch: Mapping[str, Any], student_images: ImageConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_features, text_features, logit_scale)`` of the teacher for a training batch.

        The batch must carry pixels (``pixel_values``, prepared for ``student_images``) and its
        captions as strings (``captions``, one per image), as the collate functions give them.
        """
        if "pixel_values" not in batch or "captions" not in batch:
            raise ConfigError("distillation: the batch has no pixel_values or captions for the teacher (a batch of "
                              "cached embeddings? the embedding cache is off while a teacher trains the student)")
        pixels = batch["pixel_values"]
        module = self.module
        if module.device != pixels.device:
            module.to(pixels.device)
        module.eval()  # a trainer's train() calls never reach it, but a user's might
        weights_dtype = next(module.vision.parameters()).dtype
        with torch.no_grad():
            images = teacher_pixels(pixels, student_images, module.image_config).to(weights_dtype)
            image_features = module.encode_image(images)
            text_features = module.encode_text(list(batch["captions"]))
            return image_features, text_features, module.loss.logit_scale_value()


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
