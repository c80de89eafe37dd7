"""What every tower returns, what every vision tower tells the data pipeline, and how a tower says
what rebuilds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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


# The resampling filters an ImageConfig may name: PIL's, under the names timm's transforms take.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class ImageConfig:
    """How images must be prepared for a vision tower: the data modules build transforms from this."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0


@runtime_checkable
class RebuildableTower(Protocol):
    """A tower that can say how to rebuild its architecture without reading any file.

    ``architecture_spec()`` returns a registry spec (``{"name": <registered constructor>, ...}``) that
    builds a tower with the same modules and parameter names as this one, whatever it was built from:
    a card, pretrained weights in a file, folder or package. The weights are then loaded from a
    checkpoint's state dict, so the spec never asks for pretrained weights. A checkpoint stores these
    specs (``vlm_lab/checkpoint_format.py``); a tower without the method is stored as its config spec,
    which is self-contained only if the spec names no file.
    """

    def architecture_spec(self) -> dict[str, Any]: ...
