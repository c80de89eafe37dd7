"""Image decoding and transforms, built from the vision tower's ``ImageConfig``.

Every vision tower states how it wants its images (size, mean, std, interpolation, crop_pct): timm
towers take it from ``resolve_data_config``, HF towers from their image processor, native towers from
their own config. The data modules turn that into a transform here, with timm's
``create_transform``, so the pixels a model sees at training time are prepared exactly as its
pretraining prepared them.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from timm.data import create_transform

from vlm_lab.towers.base import ImageConfig

# open_clip's default train crop: a mild RandomResizedCrop. No horizontal flip, since captions say
# "left of" and "right of"; no colour jitter, since they name colours.
AUGMENT_SCALE = (0.9, 1.0)


def build_transform(image_config: ImageConfig, augment: bool = False,
                    normalize: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised ``[3, H, W]`` float tensor, as the tower expects.

    Without ``augment``: resize the short side to ``size / crop_pct`` and centre-crop ``size`` (timm's
    evaluation transform). With ``augment``: a random crop of 90-100% of the area, resized to ``size``.
    ``normalize=False`` stops before the float conversion and gives the ``uint8`` pixels, a quarter of
    the bytes for loader workers to hand over; :func:`normalize_pixels` then finishes the job where
    the batch arrives (the model accepts ``uint8`` pixels and does it on its device).
    """
    common = dict(
        input_size=(3, *image_config.size),
        interpolation=image_config.interpolation,
        mean=tuple(image_config.mean),
        std=tuple(image_config.std),
        normalize=normalize,
    )
    if augment:
        return create_transform(is_training=True, scale=AUGMENT_SCALE, hflip=0.0, color_jitter=0.0, **common)
    return create_transform(is_training=False, crop_pct=image_config.crop_pct, **common)


def normalize_pixels(pixels: torch.Tensor, image_config: ImageConfig) -> torch.Tensor:
    """``uint8`` pixels ``[..., 3, H, W]`` -> the normalised float pixels ``build_transform`` gives.

    The same operations, in the same order, as timm's ``ToTensor`` and ``Normalize``, so on the CPU the
    result is bit for bit that of ``build_transform(..., normalize=True)`` (on a GPU it may differ in
    the last bit: CUDA divides by the constant 255 as a multiplication by its reciprocal).
    """
    mean = torch.tensor(image_config.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(image_config.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.to(torch.float32).div(255).sub_(mean).div_(std)


def decode_size(image_config: ImageConfig) -> tuple[int, int]:
    """The smallest (width, height) an image must keep when decoded: the resize before the crop."""
    height, width = image_config.size
    scale = max(height, width) / image_config.crop_pct
    return math.ceil(scale), math.ceil(scale)


def open_image(source: bytes | str | Path, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file or its bytes to RGB, fully (a truncated file raises here, not later).

    ``min_size`` lets a JPEG decode at a reduced DCT scale that still covers it (PIL's ``draft``):
    a 640x480 COCO photo bound for a 64-pixel tower decodes at 1/4 scale, several times faster, and
    the resize that follows sees no fewer pixels than it needs.
    """
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if min_size is not None and image.format == "JPEG":
        image.draft("RGB", min_size)
    return image.convert("RGB")
