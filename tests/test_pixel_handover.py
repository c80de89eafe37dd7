"""Handing pixels over as ``uint8``: the transform stops before normalising, the model finishes.

Loader workers that return normalised float32 pixels hand 600 KB per 224 px image to the main
process; ``uint8`` is a quarter of that (``benchmarks/data_throughput.py``). These tests hold the
two paths to the same numbers, bit for bit on the CPU: the transform's pixels, the batches of a
real data module and the model's embeddings and loss.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_lab
from datasets_on_disk import COCO_MINI, needs_shared
from vlm_lab.data.coco import CocoCaptionsDataModule
from vlm_lab.data.transforms import build_transform, decode_size, normalize_pixels, open_image
from vlm_lab.tokenizer import load_tokenizer
from vlm_lab.towers.base import ImageConfig

from conftest import TINY_CONFIG

# OpenAI CLIP's preprocessing, with a crop so that the resize and crop both act.
CLIP_224 = ImageConfig(size=(224, 224), mean=(0.4815, 0.4578, 0.4082), std=(0.2686, 0.2613, 0.2758),
                       interpolation="bicubic", crop_pct=0.875)


def _photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))


@pytest.mark.parametrize("augment", [False, True])
def test_uint8_pixels_normalise_to_exactly_the_float_transform(augment):
    image = _photo()
    torch.manual_seed(3), random.seed(3)  # the random crop draws from both
    floats = build_transform(CLIP_224, augment=augment)(image)
    torch.manual_seed(3), random.seed(3)
    pixels = build_transform(CLIP_224, augment=augment, normalize=False)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    assert floats.dtype == torch.float32 and floats.abs().max() > 1.5  # really normalised
    assert torch.equal(normalize_pixels(pixels, CLIP_224), floats)
    # A batch normalises image by image to the same values.
    batch = torch.stack([pixels, pixels.flip(-1)])
    assert torch.equal(normalize_pixels(batch, CLIP_224)[0], floats)


class Uint8CocoCaptions(CocoCaptionsDataModule):
    """coco_captions handing its pixels over as uint8."""

    def transform(self, split):
        return build_transform(self.image_config, augment=False, normalize=False)


@needs_shared
def test_a_uint8_data_module_gives_the_float_batches_after_normalising():
    tokenizer = load_tokenizer(None)
    config = ImageConfig(size=(64, 64), mean=CLIP_224.mean, std=CLIP_224.std, interpolation="bicubic")
    common = dict(tokenizer=tokenizer, image_config=config, max_length=32, root=str(COCO_MINI), batch_size=8)
    floats = next(iter(CocoCaptionsDataModule(**common).val_dataloader()))
    pixels = next(iter(Uint8CocoCaptions(**common).val_dataloader()))
    assert pixels["pixel_values"].dtype == torch.uint8
    assert torch.equal(normalize_pixels(pixels["pixel_values"], config), floats["pixel_values"])
    assert torch.equal(pixels["input_ids"], floats["input_ids"])
    # What the data module decodes is a real photo, resized from about 640x480.
    first = open_image(str(COCO_MINI / "val2017" / "000000397133.jpg"), decode_size(config))
    assert first.size[0] > 64


def test_the_model_normalises_uint8_pixels_itself():
    module = vlm_lab.build_module(vlm_lab.load_config(TINY_CONFIG)).eval()
    config = module.image_config
    pixels = torch.randint(0, 256, (4, 3, *config.size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    floats = normalize_pixels(pixels, config)
    assert torch.equal(module.encode_image(pixels), module.encode_image(floats))
    batch = {**module.tokenize(["a red cube", "two balls", "a blue square", "one ball"]),
             "text_image_index": torch.arange(4), "image_ids": torch.arange(4)}
    losses = [module.losses({**batch, "pixel_values": p})["loss"] for p in (pixels, floats)]
    assert torch.equal(*losses)
    # In the weights' dtype, as Lightning converts float batches for 64-true.
    assert module.double().encode_image(pixels).dtype == torch.float64
