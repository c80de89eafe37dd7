"""A development split carved from the training images (``data.dev_split``).

Recipe choices (epochs, learning rates, which checkpoint to keep) made on the validation split turn
its figures into training figures: the split that is reported must not be the one that chose. The dev
split is a fixed set of training images set aside for those choices: ``data.dev_split: {images: 500}``
removes 500 images (with all their captions) from training and serves them as the ``dev`` split, to
the ``retrieval`` evaluator (``split: dev``) and, with ``validate: true``, as the validation split of
a fit (its metrics keep their ``val/`` names, so ``checkpoint.monitor: val/i2t_R@1`` chooses on dev).

Which images: those whose file name has the smallest hashes. The name alone, not its folder or its
place in the captions file, so the split is the same on every machine and in every order, and
adding images to the training set moves only a few in or out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, ClassVar, Mapping

from vlm_lab.data.records import Record
from vlm_lab.errors import ConfigError
from vlm_lab.schema import Section, from_section, setting


@dataclasses.dataclass(frozen=True)
class DevSplit(Section):
    """``data.dev_split``: how many training images to set aside, and whether a fit validates on them."""

    where: ClassVar[str] = "data.dev_split"

    images: int = setting(500, "training images (with all their captions) set aside as the dev split")
    validate: bool = setting(False, "a fit validates on the dev split instead of val (metrics keep their val/ names)")

    def check(self, where: str) -> None:
        if self.images < 1:
            raise ConfigError(f"{where}.images={self.images} should be 1 or more")

    @classmethod
    def from_value(cls, value: Mapping[str, Any] | None) -> "DevSplit | None":
        """None (no dev split) or the checked settings of a ``dev_split`` mapping."""
        return None if value is None else from_section(cls, value, cls.where)

    def carve(self, records: list[Record], source: str) -> tuple[list[Record], list[Record]]:
        """``(train, dev)``: the records of the ``images`` smallest file-name hashes go to dev, in
        their original order; the rest stay in train. ``source`` names the training file in errors."""
        usable = [r for r in records if not r.duplicate]  # a repeated id is never served anyway
        if self.images >= len(usable):
            raise ConfigError(f"{self.where}.images={self.images} is not smaller than the {len(usable)} training "
                              f"images of {source}; set fewer")
        chosen = {id(r) for r in sorted(usable, key=_name_hash)[:self.images]}
        return [r for r in records if id(r) not in chosen], [r for r in records if id(r) in chosen]


def _name_hash(record: Record) -> tuple[str, str]:
    name = Path(record.path).name
    return hashlib.sha256(f"vlm-lab dev split {name}".encode()).hexdigest(), name
