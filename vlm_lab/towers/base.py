"""What every tower returns and what every vision tower tells the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TowerOutput:
    """A tower's result.

    ``pooled`` is the ``[batch, output_dim]`` embedding a projection head maps into the joint space.
    ``tokens`` is the ``[batch, seq, token_dim]`` sequence a captioning head attends to.
    ``mask`` is ``[batch, seq]`` with 1 for real tokens (text towers), or None when every token is
    real (vision towers).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class ImageConfig:
    """How images must be prepared for a vision tower: the data modules build transforms from this."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
