"""Labelled images for the classification evaluators: an image folder, its class names, and its features.

An image folder is ``ROOT/<class>/<image files>``; classes are the sub-folders in sorted order, so
label ``i`` is the ``i``-th folder. A ``datasets`` dataset with an image column and an integer label
column works too (:func:`read_classification_table`). Class names (what zero-shot prompts say) come from, in order:

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
    """Class names and ``(image, class index)`` samples: of a ``<class>/<images>`` folder (an image is
    its path), or of a ``datasets`` table (an image is its row, read from ``image_column``)."""

    classnames: list[str]
    samples: list[tuple[Path | int, int]]
    table: Any = None
    image_column: str = "image"


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


def read_labelled_images(root: str | None, dataset: str | None, split: str, image_column: str, label_column: str,
                         classnames: str | None, max_per_class: int | None, where: str) -> ImageFolder:
    """The labelled images of an image folder ``root`` or of split ``split`` of the ``datasets``
    dataset ``dataset`` (a saved folder, Parquet/Arrow files, an imagefolder, or a hub id): exactly one."""
    if (root is None) == (dataset is None):
        raise ConfigError(f"{where}: give either root (an image folder) or dataset (a datasets dataset), "
                          f"not {'both' if root else 'neither'}")
    if root is not None:
        return read_image_folder(root, classnames, max_per_class, where)
    return read_classification_table(dataset, split, image_column, label_column, classnames, max_per_class, where)


def read_classification_table(path: str, split: str, image_column: str, label_column: str, classnames: str | None,
                              max_per_class: int | None, where: str) -> ImageFolder:
    """Split ``split`` of a ``datasets`` dataset with an image column and an integer label column.
    Class names: ``classnames``, else the label column's ``ClassLabel`` names."""
    from datasets import ClassLabel

    from vlm_lab.data.hf_datasets import HFSplits, check_image_column, undecoded

    table = HFSplits(path).open(split, streaming=False)
    check_image_column(table.features, image_column, f"{where}.dataset {path} ({split})")
    if label_column not in table.features:
        raise ConfigError(f"{where}.label_column={label_column!r} is not a column of {path} ({split}); "
                          f"its columns: {', '.join(table.features)}")
    labels = [int(label) for label in table[label_column]]
    feature = table.features[label_column]
    count = feature.num_classes if isinstance(feature, ClassLabel) else max(labels) + 1
    if classnames is not None:
        names = class_names([Path(str(i)) for i in range(count)], classnames, where)
    elif isinstance(feature, ClassLabel):
        names = [name.replace("_", " ") for name in feature.names]
    else:
        raise ConfigError(f"{where}: the label column {label_column!r} of {path} has no class names (not a "
                          f"ClassLabel); give classnames (a file or {', '.join(SHIPPED_CLASSNAMES)})")
    taken = [0] * count
    samples: list[tuple[Path | int, int]] = []
    for row, label in enumerate(labels):
        if max_per_class is None or taken[label] < max_per_class:
            samples.append((row, label))
            taken[label] += 1
    empty = [names[c] for c in range(count) if not taken[c]]
    if empty:
        raise ConfigError(f"{where}: {len(empty)} classes of {path} ({split}) have no images: {', '.join(empty[:5])}")
    return ImageFolder(names, samples, undecoded(table, image_column), image_column)


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
    """``(pixels, label)`` of ``(image, label)`` samples (a path, or a row of ``table``); an unreadable
    image gives label -1 (a counted skip)."""

    def __init__(self, samples: list[tuple[Path | int, int]], transform: Callable[[Image.Image], torch.Tensor],
                 min_size: tuple[int, int], pixel_shape: tuple[int, ...], table: Any = None,
                 image_column: str = "image") -> None:
        self.samples, self.transform, self.min_size, self.pixel_shape = samples, transform, min_size, pixel_shape
        self.table, self.image_column = table, image_column

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from vlm_lab.data.hf_datasets import open_image_value

        image, label = self.samples[index]
        try:
            if self.table is None:
                return self.transform(open_image(image, self.min_size)), label
            return self.transform(open_image_value(self.table[image][self.image_column], self.min_size)), label
        except (OSError, UnidentifiedImageError, ValueError) as error:
            log.warning("skipping unreadable image %s: %s", image, error)
            return torch.zeros(self.pixel_shape), -1


@torch.no_grad()
def image_features(module: Any, images: ImageFolder, batch_size: int, num_workers: int,
                   desc: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D] float32, labels [N])`` of every sample of ``images``, in order, on every rank.

    Each rank encodes its :func:`shard_indices` share; the rows are gathered back with one
    fixed-size all-gather. Labels of unreadable images are -1.
    """
    config = module.image_config
    samples = images.samples
    mine = [samples[i] for i in shard_indices(len(samples))]
    dataset = LabelledImages(mine, build_transform(config, augment=False), decode_size(config),
                             (3, *config.size), images.table, images.image_column)
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
