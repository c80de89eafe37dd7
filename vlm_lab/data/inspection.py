"""``vlm-lab data inspect``: look at a data module's split before training on it.

Prints the counts, a few samples and caption-length statistics (in words, and in tokens against the
``max_length`` that truncates them), and saves a PNG grid of images with their first caption.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_lab.data.base import CaptionDataModule
from vlm_lab.data.records import RawSample
from vlm_lab.errors import ConfigError

TILE = 192  # pixels per grid image
TEXT_LINES = 4


@dataclass(frozen=True)
class LengthStats:
    """Summary of caption lengths."""

    mean: float
    median: float
    p95: float
    max: int

    @classmethod
    def of(cls, lengths: list[int]) -> "LengthStats":
        values = np.asarray(lengths)
        return cls(float(values.mean()), float(np.median(values)), float(np.percentile(values, 95)), int(values.max()))

    def __str__(self) -> str:
        return f"mean {self.mean:.1f}, median {self.median:.0f}, 95th percentile {self.p95:.0f}, max {self.max}"


def inspect_split(datamodule: CaptionDataModule, split: str, samples: int = 8, limit: int = 2000,
                  grid: str | Path | None = None) -> str:
    """The inspection report of one split (and the grid saved at ``grid`` if given)."""
    if not isinstance(datamodule, CaptionDataModule):
        raise ConfigError(f"vlm-lab data inspect works with image-caption data modules (coco_captions, cc3m, "
                          f"hf_dataset), not {type(datamodule).__name__}")
    summary = datamodule.split_summary(split)
    shown: list[RawSample] = []
    captions: list[str] = []
    images_read = 0
    for sample in islice(datamodule.raw_samples(split), limit):
        images_read += 1
        captions += sample.captions
        if len(shown) < samples:
            shown.append(sample)
    if not captions:
        raise ConfigError(f"{split}: no readable sample to inspect")

    counts = ", ".join(f"{k}: {'unknown' if v is None else v}" for k, v in summary.items())
    scope = "all" if images_read < limit else f"the first {images_read} images'"
    tokens = datamodule.tokenizer(captions, add_special_tokens=True, truncation=False)["input_ids"]
    token_lengths = [len(t) for t in tokens]
    truncated = sum(n > datamodule.max_length for n in token_lengths) / len(token_lengths)
    lines = [
        f"{split}: {counts}",
        f"caption length over {scope} {len(captions)} captions:",
        f"  words:  {LengthStats.of([len(c.split()) for c in captions])}",
        f"  tokens: {LengthStats.of(token_lengths)}; {truncated:.1%} longer than max_length={datamodule.max_length}",
        "samples:",
    ]
    for sample in shown:
        lines.append(f"  [{sample.image_id}] {sample.where}")
        lines += [f"    - {caption}" for caption in sample.captions]
    bad = datamodule.bad_samples[split].take()
    if bad:
        lines.append(f"skipped {sum(bad.values())} bad sample(s) while reading: "
                     + ", ".join(f"{k}: {v}" for k, v in bad.items()))
    if grid is not None:
        save_grid(shown, grid)
        lines.append(f"grid of {len(shown)} images: {grid}")
    return "\n".join(lines)


def save_grid(samples: list[RawSample], path: str | Path, columns: int = 4) -> None:
    """A PNG of the samples' images, each above its first caption."""
    if not samples:
        raise ConfigError("no sample to draw")
    font: Any = ImageFont.load_default(size=12)
    line_height = 14
    cell_w, cell_h = TILE + 8, TILE + 8 + TEXT_LINES * line_height
    rows = -(-len(samples) // columns)
    canvas = Image.new("RGB", (min(columns, len(samples)) * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, sample in enumerate(samples):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        try:
            image = sample.load_image()
            image.thumbnail((TILE, TILE))
            canvas.paste(image, (x + (TILE - image.width) // 2, y + (TILE - image.height) // 2))
        except Exception as error:  # the grid still shows the caption of an unreadable image
            draw.text((x, y), f"unreadable: {type(error).__name__}", fill="red", font=font)
        text = textwrap.wrap(sample.captions[0], width=28)[:TEXT_LINES]
        for j, line in enumerate(text):
            draw.text((x, y + TILE + 2 + j * line_height), line, fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
