"""Image decoding and transforms, built from the vision tower's ``ImageConfig``.

Every vision tower states how it wants its images (size, mean, std, interpolation, crop_pct): timm
towers take it from ``resolve_data_config``, HF towers from their image processor, native towers from
their own config. The data modules turn that into a transform here, with timm's
``create_transform``, so the pixels a model sees at training time are prepared exactly as its
pretraining prepared them.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from timm.data import create_transform

from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.towers.base import INTERPOLATIONS, ImageConfig

# open_clip's default train crop: a mild RandomResizedCrop. No horizontal flip, since captions say
# "left of" and "right of"; no colour jitter, since they name colours.
AUGMENT_SCALE = (0.9, 1.0)


@dataclass(frozen=True)
class Augmentation:
    """Training-time image augmentation (a data module's ``augment``), built by timm's ``create_transform``.

    ``augment: true`` is this class's defaults: a random crop of 90-100% of the area (aspect 3/4 to
    4/3) resized to the tower's size, nothing else. A mapping sets fields on top of those defaults,
    e.g. ``augment: {auto_augment: rand-m9-mstd0.5, re_prob: 0.25}``. The defaults differ from
    timm's on purpose: no horizontal flip (captions say "left of") and no colour jitter (they name
    colours); ask for them explicitly. Each field is the ``create_transform`` argument of that name:

    Attributes:
        scale: range of the crop's area, as a fraction of the image (``rrc``), or of the random
            rescale (``rkrc``/``rkrr``).
        ratio: range of the crop's aspect ratio.
        train_crop_mode: ``rrc`` (RandomResizedCrop), ``rkrc`` (resize keeping the ratio, centre crop),
            ``rkrr`` (resize keeping the ratio, random crop).
        interpolation: ``bilinear``, ``bicubic``, ``nearest``, ``lanczos``, ``box``, ``hamming`` or
            ``random``; null: the tower's own (``ImageConfig.interpolation``).
        hflip, vflip: probabilities of a horizontal / vertical flip.
        color_jitter: brightness, contrast, saturation (one number for all three, or a list of 3,
            or 4 with hue). timm turns it off when ``auto_augment`` is set.
        color_jitter_prob: apply the jitter with this probability (null: always).
        grayscale_prob, gaussian_blur_prob: probabilities of those (SimCLR-style).
        auto_augment: a timm policy string: RandAugment ``rand-m9-mstd0.5-inc1``, AutoAugment
            ``original`` / ``v0``, AugMix ``augmix-m5-w4-d2``...; null: none.
        re_prob, re_mode, re_count: random erasing (probability; fill ``const``, ``rand`` or
            ``pixel``; regions), applied to the normalised tensor.
    """

    scale: tuple[float, float] = AUGMENT_SCALE
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    train_crop_mode: str = "rrc"
    interpolation: str | None = None
    hflip: float = 0.0
    vflip: float = 0.0
    color_jitter: float | tuple[float, ...] = 0.0
    color_jitter_prob: float | None = None
    grayscale_prob: float = 0.0
    gaussian_blur_prob: float = 0.0
    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "const"
    re_count: int = 1

    CHOICES = {
        "train_crop_mode": ("rrc", "rkrc", "rkrr"),
        "interpolation": (*INTERPOLATIONS, "random"),
        "re_mode": ("const", "rand", "pixel"),
    }

    @classmethod
    def from_config(cls, value: bool | Mapping[str, Any] | None, where: str = "data.augment") -> "Augmentation | None":
        """``false``/null: None (no augmentation); ``true``: the defaults; a mapping: the defaults with
        its fields set. Every value is checked here, with one-line errors naming ``where``."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}={value!r} should be true, false or a mapping of augmentation settings")
        valid = [field.name for field in dataclasses.fields(cls)]
        for key in value:
            if key not in valid:
                raise ConfigError(f"unknown key '{where}.{key}'.{did_you_mean(key, valid)} Valid keys: {', '.join(valid)}")
        settings = dict(value)
        for key in ("scale", "ratio"):
            if key in settings:
                settings[key] = _number_pair(settings[key], f"{where}.{key}")
        if isinstance(settings.get("color_jitter"), list):
            settings["color_jitter"] = tuple(settings["color_jitter"])
        augmentation = cls(**settings)
        augmentation._check(where)
        return augmentation

    def _check(self, where: str) -> None:
        for key, choices in self.CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in choices:
                raise ConfigError(f"{where}.{key}={value!r} is not one of {', '.join(map(repr, choices))}"
                                  f"{did_you_mean(value, choices)}")
        for key in ("hflip", "vflip", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob", "re_prob"):
            value = getattr(self, key)
            if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"{where}.{key}={value!r} should be a probability, from 0 to 1")
        low, high = self.scale
        if not 0.0 < low <= high:
            raise ConfigError(f"{where}.scale={list(self.scale)} should be [low, high] with 0 < low <= high (e.g. [0.9, 1.0])")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"{where}.ratio={list(self.ratio)} should be [low, high] with 0 < low <= high")
        jitter = self.color_jitter if isinstance(self.color_jitter, tuple) else (self.color_jitter,)
        if len(jitter) not in (1, 3, 4) or not all(_is_number(j) and j >= 0 for j in jitter):
            raise ConfigError(f"{where}.color_jitter={self.color_jitter!r} should be a number of at least 0, "
                              f"or a list of 3 (brightness, contrast, saturation) or 4 (and hue)")
        if not isinstance(self.re_count, int) or isinstance(self.re_count, bool) or self.re_count < 1:
            raise ConfigError(f"{where}.re_count={self.re_count!r} should be an integer of at least 1")
        if self.auto_augment is not None:
            # timm parses the policy string when it builds the transform: try it now, for a clear error.
            try:
                create_transform(input_size=(3, 32, 32), is_training=True, auto_augment=self.auto_augment)
            except Exception as error:
                raise ConfigError(f"{where}.auto_augment={self.auto_augment!r} is not a timm augmentation policy "
                                  f"({type(error).__name__}: {error}); e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, "
                                  f"original") from None

    def transform_arguments(self, image_config: ImageConfig) -> dict[str, Any]:
        """The training arguments of ``create_transform`` (the tower's interpolation unless set)."""
        arguments = dataclasses.asdict(self)
        arguments["interpolation"] = self.interpolation or image_config.interpolation
        return arguments


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_pair(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise ConfigError(f"{where}={value!r} should be a list of two numbers, [low, high]")
    return float(value[0]), float(value[1])


def build_transform(image_config: ImageConfig, augment: bool | Augmentation | None = False,
                    normalize: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised ``[3, H, W]`` float tensor, as the tower expects.

    Without ``augment``: resize the short side to ``size / crop_pct`` and centre-crop ``size`` (timm's
    evaluation transform). With ``augment``: timm's training transform as the :class:`Augmentation`
    says (``True``: its defaults, a random crop of 90-100% of the area resized to ``size``).
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
    augmentation = Augmentation() if augment is True else augment or None
    if augmentation is not None:
        if augmentation.re_prob > 0 and not normalize:
            # timm drops random erasing from a transform that stops at uint8 pixels: refuse, not lose it.
            raise ConfigError("data.augment.re_prob: random erasing works on normalised float pixels; "
                              "it cannot be combined with uint8 pixel transforms (normalize=False)")
        return create_transform(is_training=True, **{**common, **augmentation.transform_arguments(image_config)})
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
