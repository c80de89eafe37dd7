"""What ``VisionLanguageModule`` relies on from each kind of part, declared once.

A tower or loss is any object the registry builds; these Protocols say what the module then reads
from it. The module builds its parts with ``registry.build(kind, spec, contract=...)``, which checks
the built object against its contract, so a custom part that lacks, say, ``output_dim`` fails at
once with one line naming it, instead of deep inside the first training step. They also tell the
author of a new part what to provide (``notebooks/02_custom_tower.ipynb``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from vlm_lab.towers.base import ImageConfig, TowerOutput


class VisionTower(Protocol):
    """``forward(pixel_values [B, 3, H, W]) -> TowerOutput``."""

    output_dim: int  # width of TowerOutput.pooled, what the vision head maps
    token_dim: int  # width of TowerOutput.tokens, what a caption head attends to
    image_config: ImageConfig  # how the data pipeline must prepare its images

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput: ...


class TextTower(Protocol):
    """``forward(input_ids [B, seq], attention_mask [B, seq] | None) -> TowerOutput``."""

    output_dim: int  # width of TowerOutput.pooled, what the text head maps
    token_dim: int  # width of TowerOutput.tokens, what CoCa's decoder reads
    max_length: int | None  # the longest token sequence it takes (None: no limit of its own)
    vocab_size: int | None  # token ids must stay below it (None: not known)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TowerOutput: ...


class ContrastiveLoss(Protocol):
    """``forward(image_features [B, D], text_features [B, D]) -> scalar``, both L2-normalised.

    A loss whose ``multi_positive`` attribute is true is called with ``image_ids=[B]`` as well (the
    training batch's image ids: pairs of one image are positives of each other); others never are.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor: ...

    def logit_scale_value(self) -> torch.Tensor:
        """The multiplier applied to cosine similarities (logged as ``train/logit_scale``)."""

    def no_weight_decay(self) -> set[str]:
        """Names of the loss's own parameters that weight decay must leave alone (temperatures)."""
