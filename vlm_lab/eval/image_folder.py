"""Labelled images for the classification evaluators: an image folder, its class names, and its features.

An image folder is ``ROOT/<class>/<image files>``; classes are the sub-folders in sorted order, so
label ``i`` is the ``i``-th folder. Class names (what zero-shot prompts say) come from, in order:

* ``classnames``: a shipped list (``cifar10``, ``cifar100``, ``imagenet1k``) or a file with one name
  per line, in the sorted order of the folders;
* the shipped ImageNet-1k list, picked up when every folder is named by a WordNet id it knows
  (``n01440764``...): CLIP's curated names ("tench", not "n01440764"), also for a subset of ImageNet;
* the folder names, with ``_`` as spaces.

:func:`image_features` encodes a list of samples on this rank's share (``vlm_lab.distributed.shard_indices``)
and gathers the whole matrix back in sample order on every rank. An unreadable image is a counted
skip: its label becomes -1 and the evaluators leave it out and report how many there were.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from vlm_lab.data.transforms import build_transform, decode_size, open_image
from vlm_lab.distributed import gather_shards, shard_indices
from vlm_lab.errors import ConfigError
from vlm_lab.progress import progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"
SHIPPED_CLASSNAMES = ("cifar10", "cifar100", "imagenet1k")
_WORDNET_ID = re.compile(r"^n\d{8}$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFolder:
    """Class names and ``(image path, class index)`` samples of a ``<class>/<images>`` folder."""

    classnames: list[str]
    samples: list[tuple[Path, int]]


def read_image_folder(root: str | Path, classnames: str | None = None, max_per_class: int | None = None,
                      where: str = "zeroshot") -> ImageFolder:
    """Scan ``root``: class folders in sorted order, their images in file-name order (the first
    ``max_per_class`` of each). ``where`` names the setting in messages."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{where}.root: no image folder at {root}")
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if not folders:
        raise ConfigError(f"{where}.root: {root} has no class folders (expected {root}/<class>/<images>)")
    names = class_names(folders, classnames, where)
    samples: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ConfigError(f"{where}.root: class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples += [(path, label) for path in images[:max_per_class]]
    return ImageFolder(names, samples)


def class_names(folders: list[Path], classnames: str | None, where: str) -> list[str]:
    """The class name of each folder (see the module docstring for where they come from)."""
    if classnames is not None:
        if classnames in SHIPPED_CLASSNAMES:
            names = list(shipped_classnames(classnames).values())
            source = f"the shipped list {classnames}"
        else:
            path = Path(classnames)
            if not path.is_file():
                raise ConfigError(f"{where}.classnames: {classnames!r} is neither a file nor a shipped list "
                                  f"({', '.join(SHIPPED_CLASSNAMES)})")
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            source = str(path)
        if len(names) != len(folders):
            raise ConfigError(f"{where}.classnames: {source} has {len(names)} names for {len(folders)} class "
                              f"folders; give one per line, in the sorted order of the folders ({folders[0].name}, ...)")
        return names
    imagenet = shipped_classnames("imagenet1k")
    if all(_WORDNET_ID.match(f.name) and f.name in imagenet for f in folders):
        return [imagenet[f.name] for f in folders]
    return [folder.name.replace("_", " ") for folder in folders]


@lru_cache(maxsize=None)
def shipped_classnames(name: str) -> dict[str, str]:
    """A shipped class-name list as ``{key: name}``, in label order; ImageNet's keys are WordNet ids."""
    lines = [line for line in (CLASSNAMES_DIR / f"{name}.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    pairs = [line.split("\t", 1) if "\t" in line else (str(i), line) for i, line in enumerate(lines)]
    return {key: value for key, value in pairs}


class LabelledImages(Dataset):
    """``(pixels, label)`` of ``(path, label)`` samples; an unreadable image gives label -1 (a counted skip)."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[[Image.Image], torch.Tensor],
                 min_size: tuple[int, int], pixel_shape: tuple[int, ...]) -> None:
        self.samples, self.transform, self.min_size, self.pixel_shape = samples, transform, min_size, pixel_shape

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            return self.transform(open_image(path, self.min_size)), label
        except (OSError, UnidentifiedImageError, ValueError) as error:
            log.warning("skipping unreadable image %s: %s", path, error)
            return torch.zeros(self.pixel_shape), -1


@torch.no_grad()
def image_features(module: Any, samples: list[tuple[Path, int]], batch_size: int, num_workers: int,
                   desc: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D] float32, labels [N])`` of every sample, in sample order, on every rank.

    Each rank encodes its :func:`shard_indices` share; the rows are gathered back with one
    fixed-size all-gather. Labels of unreadable images are -1.
    """
    config = module.image_config
    mine = [samples[i] for i in shard_indices(len(samples))]
    dataset = LabelledImages(mine, build_transform(config, augment=False), decode_size(config),
                             (3, *config.size))
    # Its own generator: a loader draws a seed from the global RNG otherwise, and evaluating during a
    # fit must not change the training's random draws.
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    features, labels = [], []
    for pixels, label in progress(loader, desc=desc, unit="batch"):
        features.append(module.encode_image(pixels.to(module.device)).float())
        labels.append(label.to(module.device))
    if features:
        local, local_labels = torch.cat(features), torch.cat(labels)
    else:  # more ranks than samples: this rank still joins the gathers, with no rows
        width = module.encode_image(torch.zeros(1, 3, *config.size, device=module.device)).shape[-1]
        local = torch.zeros(0, width, device=module.device)
        local_labels = torch.zeros(0, dtype=torch.long, device=module.device)
    return gather_shards(local, len(samples)).cpu(), gather_shards(local_labels.long(), len(samples)).cpu()
