"""A development split carved from the training images (``data.dev_split``).

Recipe choices (epochs, learning rates, which checkpoint to keep) made on the validation split turn
its figures into training figures: the split that is reported must not be the one that chose. The dev
split is a fixed set of training images set aside for those choices: ``data.dev_split: {images: 500}``
removes 500 images (with all their captions) from training and serves them as the ``dev`` split, to
the ``retrieval`` evaluator (``split: dev``) and, with ``validate: true``, as the validation split of
a fit (its metrics keep their ``val/`` names, so ``checkpoint.monitor: val/i2t_R@1`` chooses on dev).

Which images: those whose identity has the smallest hashes. The identity is the file name for
``coco_captions``: the name alone, not its folder or its place in the captions file, so the split is
the same on every machine and in every order, and adding images to the training set moves only a
few in or out. ``hf_dataset`` tables have no files of their own; their identities are chosen by
``vlm_lab.data.hf_datasets.image_identities`` (a column the user names, the stored image file names,
else a hash of the image bytes), with the same properties.

:class:`DevSplitServing` is how a data module serves the split: as ``dev``, and as the validation
split of a fit with ``validate: true``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from vlm_lab.data.records import Record
from vlm_lab.errors import ConfigError
from vlm_lab.schema import Section, from_section, setting

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from vlm_lab.embedding_cache import EmbeddingCache


@dataclasses.dataclass(frozen=True)
class DevSplit(Section):
    """``data.dev_split``: how many training images to set aside, and whether a fit validates on them."""

    where: ClassVar[str] = "data.dev_split"

    images: int = setting(500, "training images (with all their captions) set aside as the dev split")
    validate: bool = setting(False, "a fit validates on the dev split instead of val (metrics keep their val/ names)")
    id_column: str | None = setting(None, "hf_dataset only: the column whose value names each image (default: "
                                          "the image file names, else a hash of the image bytes)")

    def check(self, where: str) -> None:
        if self.images < 1:
            raise ConfigError(f"{where}.images={self.images} should be 1 or more")

    @classmethod
    def from_value(cls, value: Mapping[str, Any] | None) -> "DevSplit | None":
        """None (no dev split) or the checked settings of a ``dev_split`` mapping."""
        return None if value is None else from_section(cls, value, cls.where)

    def carve(self, records: list[Record], source: str,
              identity: Callable[[Record], str] | None = None) -> tuple[list[Record], list[Record]]:
        """``(train, dev)``: the records of the ``images`` smallest identity hashes go to dev, in
        their original order; the rest stay in train. ``identity``: what names a record's image
        (default: its file name). ``source`` names the training data in errors."""
        usable = [r for r in records if not r.duplicate]  # a repeated id is never served anyway
        if self.images >= len(usable):
            raise ConfigError(f"{self.where}.images={self.images} is not smaller than the {len(usable)} training "
                              f"images of {source}; set fewer")
        identity = identity or _file_name
        chosen = {id(r) for r in sorted(usable, key=lambda r: _identity_hash(identity(r), r))[:self.images]}
        return [r for r in records if id(r) not in chosen], [r for r in records if id(r) in chosen]


def _file_name(record: Record) -> str:
    return Path(record.path).name


def _identity_hash(identity: str, record: Record) -> tuple[str, str, tuple[str, ...]]:
    # Two records of one identity (the same image twice) are told apart by their captions, not by
    # their place, so that the choice stays independent of the order.
    return hashlib.sha256(f"vlm-lab dev split {identity}".encode()).hexdigest(), identity, record.captions


class DevSplitServing:
    """The dev split of a map-style data module (mixed in before ``CaptionDataModule``; the module
    sets ``dev``): a fit that validates on dev (``validate: true``) gets it from ``val_dataloader``,
    caches its images as the fit's validation images, and counts its bad samples as ``val``'s.
    Evaluators asking for ``split: val`` still get val."""

    dev: DevSplit | None

    def val_dataloader(self) -> "DataLoader":
        return self._loader(self.fit_split("val"))  # type: ignore[attr-defined]

    def cacheable_images(self, split: str) -> Any:
        # The embedding cache of a fit's validation (vlm_lab/embedding_cache.py asks for "val").
        return super().cacheable_images(self.fit_split(split))  # type: ignore[misc]

    def use_embedding_cache(self, split: str, cache: "EmbeddingCache") -> None:
        super().use_embedding_cache(self.fit_split(split), cache)  # type: ignore[misc]

    def fit_split(self, split: str) -> str:
        """The split a fit's ``split`` is served from: dev for val when the fit validates on dev."""
        return "dev" if split == "val" and self.validates_on_dev else split

    def counted_split(self, split: str) -> str:
        """Where a split's bad samples are counted: a fit that validates on dev reports them as
        ``val/bad_samples`` (data/health.py)."""
        return "val" if split == "dev" and self.validates_on_dev else split

    @property
    def validates_on_dev(self) -> bool:
        return self.dev is not None and self.dev.validate
