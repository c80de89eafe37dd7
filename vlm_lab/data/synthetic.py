"""A built-in image-caption dataset that needs no download: coloured shapes with compositional captions.

Every image shows a group of one to three identical shapes beside a single other shape, and is
described by captions such as "two small red circles left of a blue square" (and the paraphrase "a
blue square right of two small red circles"). A *composition* is the tuple (count, size, colour,
shape, relation, other colour, other shape); positions vary freely. The validation split uses
compositions that never occur in training, chosen by a stable hash, so retrieval there measures
whether the model learnt the attributes rather than memorised whole scenes.

Everything is drawn on the fly from ``(seed, split, index)``, so two runs with the same seed see the
same pixels and captions, and nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from vlm_lab.data.collate import ImageTextCollate, caption_loader, image_to_tensor
from vlm_lab.data.epochs import TrainingEpochs
from vlm_lab.data.handoff import pins_memory
from vlm_lab.embedding_cache import EmbeddingCache, teacher_image_entries
from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_datamodule
from vlm_lab.towers.base import ImageConfig

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 50, 170),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.14, "large": 0.24}  # side length as a fraction of the image side
COUNTS = {1: "a", 2: "two", 3: "three"}
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class Composition:
    count: int
    size: str
    colour: str
    shape: str
    relation: str
    other_colour: str
    other_shape: str

    def captions(self) -> list[str]:
        """The canonical caption and its paraphrase with the relation reversed."""
        group = f"{COUNTS[self.count]} {self.size} {self.colour} {_plural(self.shape) if self.count > 1 else self.shape}"
        other = f"a {self.other_colour} {self.other_shape}"
        return [f"{group} {self.relation} {other}", f"{other} {RELATIONS[self.relation]} {group}"]

    def is_held_out(self, fraction: float) -> bool:
        # A stable hash, not Python's salted hash(): the split must not change between processes.
        digest = hashlib.sha1(repr(self).encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def all_compositions() -> list[Composition]:
    return [
        Composition(*combo)
        for combo in itertools.product(COUNTS, SIZES, COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES)
        if combo[2:4] != combo[5:7]  # the other shape must look different from the group
    ]


def render(composition: Composition, image_size: int, rng: random.Random) -> Image.Image:
    """Draw a composition with random positions that respect its relation."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    side = max(3, round(SIZES[composition.size] * image_size))
    other_side = max(3, round(SIZES["large" if rng.random() < 0.5 else "small"] * image_size))

    # The group and the other shape get opposite halves of the canvas along the relation's axis.
    half = image_size // 2
    horizontal = composition.relation in ("left of", "right of")
    group_first = composition.relation in ("left of", "above")
    group_box, other_box = _halves(image_size, half, horizontal, group_first)

    _draw_shape(draw, composition.other_shape, COLOURS[composition.other_colour],
                _place(rng, other_box, other_side, []), other_side)
    placed: list[tuple[int, int, int]] = []
    for _ in range(composition.count):
        xy = _place(rng, group_box, side, placed)
        placed.append((*xy, side))
        _draw_shape(draw, composition.shape, COLOURS[composition.colour], xy, side)
    return image


def _halves(size: int, half: int, horizontal: bool, group_first: bool):
    first, second = ((0, 0, half, size), (half, 0, size, size)) if horizontal else (
        (0, 0, size, half), (0, half, size, size))
    return (first, second) if group_first else (second, first)


def _place(rng: random.Random, box, side: int, placed: list[tuple[int, int, int]]) -> tuple[int, int]:
    """A top-left corner inside ``box`` whose square does not touch the already placed ones."""
    x0, y0, x1, y1 = box
    gap = 1
    for _ in range(200):
        x = rng.randint(x0 + 1, max(x0 + 1, x1 - side - 1))
        y = rng.randint(y0 + 1, max(y0 + 1, y1 - side - 1))
        if all(x + side + gap <= px or px + ps + gap <= x or y + side + gap <= py or py + ps + gap <= y
               for px, py, ps in placed):
            return x, y
    return x, y  # a crowded box: overlap is rare and harmless


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour, xy: tuple[int, int], side: int) -> None:
    x, y = xy
    box = (x, y, x + side - 1, y + side - 1)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=colour)
    elif shape == "cross":
        bar = max(1, side // 3)
        draw.rectangle((x + (side - bar) // 2, y, x + (side + bar) // 2, y + side - 1), fill=colour)
        draw.rectangle((x, y + (side - bar) // 2, x + side - 1, y + (side + bar) // 2), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


class SyntheticShapes(Dataset):
    """``size`` samples of one split. Item ``i`` is ``{"image", "captions", "image_id"}``.

    The training split draws compositions at random (with repeats) from the non-held-out ones; the
    validation and test splits use distinct held-out compositions, so no two of their images share a
    caption and retrieval has exactly one right answer per image.
    """

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0,
                 holdout_fraction: float = 0.1, paraphrases: bool = True) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, not {split!r}")
        compositions = all_compositions()
        held_out = [c for c in compositions if c.is_held_out(holdout_fraction)]
        if split == "train":
            self.pool = [c for c in compositions if not c.is_held_out(holdout_fraction)]
        else:
            # val and test take disjoint, fixed halves of the held-out compositions.
            order = random.Random(f"{seed}-heldout").sample(held_out, len(held_out))
            half = len(order) // 2
            self.pool = order[:half] if split == "val" else order[half:]
            if size > len(self.pool):
                raise ValueError(f"{split} has only {len(self.pool)} held-out compositions; "
                                 f"asked for {size} (raise holdout_fraction)")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.paraphrases = paraphrases

    def __len__(self) -> int:
        return self.size

    def composition(self, index: int) -> Composition:
        if self.split == "train":
            return random.Random(f"{self.seed}-{self.split}-{index}-c").choice(self.pool)
        return self.pool[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.image(index), **self.text(index)}

    def text(self, index: int) -> dict[str, Any]:
        """Item ``index`` without its image: ``{"captions", "image_id"}``."""
        if not 0 <= index < self.size:
            raise IndexError(f"{self.split} has {self.size} samples; index {index} is out of range")
        captions = self.composition(index).captions()
        return {"captions": captions if self.paraphrases else captions[:1], "image_id": index}

    def image(self, index: int) -> Image.Image:
        """The image of item ``index`` (the same on every call)."""
        return render(self.composition(index), self.image_size, random.Random(f"{self.seed}-{self.split}-{index}"))


class _Transformed(Dataset):
    """The tower-ready samples of a ``SyntheticShapes``; cacheable (``vlm_lab/embedding_cache.py``).

    With ``embeddings`` set, items carry the cached tower outputs of their image instead of pixels,
    and the image is never drawn.
    """

    def __init__(self, dataset: SyntheticShapes, image_config: ImageConfig) -> None:
        self.dataset, self.image_config = dataset, image_config
        self.embeddings: EmbeddingCache | None = None
        self.teacher_embeddings: EmbeddingCache | None = None  # distillation's teacher cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        teacher = teacher_image_entries(self.teacher_embeddings, index)
        if self.embeddings is not None:
            cached = self.embeddings.lookup(index)
            if cached is not None:
                return {**cached, **teacher, **self.dataset.text(index)}
        return {"pixel_values": self.image_row_pixels(index), **teacher, **self.dataset.text(index)}

    def image_rows(self) -> int:
        return len(self.dataset)

    def image_identity(self) -> str:
        d = self.dataset
        return (f"synthetic_shapes/{d.split} size={d.size} image_size={d.image_size} seed={d.seed} "
                f"pool={len(d.pool)} {self.image_config}")

    def image_row_pixels(self, row: int) -> torch.Tensor:
        return image_to_tensor(self.dataset.image(row), self.image_config)

    def caption_texts(self) -> list[str]:
        """Every caption a training batch may draw; distillation's teacher cache encodes them once."""
        return [caption for index in range(len(self.dataset)) for caption in self.dataset.text(index)["captions"]]


@register_datamodule("synthetic_shapes")
class SyntheticShapesDataModule(L.LightningDataModule):
    """Coloured shapes with compositional captions, drawn on the fly (see ``vlm_lab.data.synthetic``).

    Images are rendered at the vision tower's input size. Validation and test compositions never
    occur in training.

    Args:
        train_size: training images per epoch.
        val_size: validation images, each a distinct held-out composition (at most ~600).
        test_size: test images, distinct held-out compositions disjoint from validation.
        batch_size: images per batch.
        num_workers: data loader worker processes.
        seed: fixes every image and caption, and each epoch's order.
        holdout_fraction: share of compositions kept out of training.
        paraphrases: give each image its caption and the relation-reversed paraphrase.
    """

    def __init__(self, tokenizer: Any, image_config: ImageConfig, max_length: int,
                 train_size: int = 10000, val_size: int = 250, test_size: int = 250,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 holdout_fraction: float = 0.1, paraphrases: bool = True) -> None:
        super().__init__()
        self.tokenizer, self.image_config, self.max_length = tokenizer, image_config, max_length
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.holdout_fraction, self.paraphrases = holdout_fraction, paraphrases
        self.embedding_caches: dict[str, EmbeddingCache] = {}
        self.teacher_caches: dict[str, EmbeddingCache] = {}
        self._datasets: dict[str, _Transformed] = {}
        self.epochs = TrainingEpochs()

    def cacheable_images(self, split: str) -> _Transformed:
        """Every split is deterministic (no augmentation), so every split can be cached."""
        return self.dataset(split)

    def use_embedding_cache(self, split: str, cache: EmbeddingCache) -> None:
        """The split's datasets, built already (Lightning builds the training loader early) or later,
        serve the cache's rows instead of drawing images."""
        self.embedding_caches[split] = cache
        if split in self._datasets:
            self._datasets[split].embeddings = cache

    def use_teacher_cache(self, split: str, cache: EmbeddingCache) -> None:
        """As :meth:`use_embedding_cache`, for distillation's teacher cache: samples carry the teacher's
        image features beside their pixels (vlm_lab/distillation.py)."""
        self.teacher_caches[split] = cache
        if split in self._datasets:
            self._datasets[split].teacher_embeddings = cache

    def dataset(self, split: str) -> _Transformed:
        height, width = self.image_config.size
        if height != width:
            raise ValueError(f"synthetic_shapes draws square images; the tower wants {height}x{width}")
        if split not in self.sizes:
            raise ConfigError(f"synthetic_shapes has no {split} split (valid: {', '.join(self.sizes)}); "
                              f"data.dev_split is a coco_captions setting")
        raw = SyntheticShapes(split, self.sizes[split], height, self.seed,
                              self.holdout_fraction, self.paraphrases)
        dataset = _Transformed(raw, self.image_config)
        dataset.embeddings = self.embedding_caches.get(split)
        dataset.teacher_embeddings = self.teacher_caches.get(split)
        return dataset

    def _loader(self, split: str) -> DataLoader:
        training = split == "train"
        dataset = self._datasets[split] = self.dataset(split)
        loader = caption_loader(dataset, training, self.batch_size, self.num_workers,
                                ImageTextCollate(self.tokenizer, self.max_length, training), self.seed,
                                lambda: self.epochs.next(self.trainer), pins_memory(self.trainer),
                                skip=self.epochs.skip if training else None)
        if training:
            self.epochs.loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the epoch a resumed run's first training pass is for, and
        the batches of it trained already (``epochs.TrainingEpochs``)."""
        return self.epochs.state_dict(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs.load_state_dict(state_dict)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
