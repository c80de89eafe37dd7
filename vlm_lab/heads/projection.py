"""Projection heads: map a tower's pooled output into the joint image-text embedding space.

Every head takes ``in_dim`` (the tower's output width, supplied by vlm-lab, never set in a config)
and ``out_dim`` (the joint embedding size), exposes ``out_dim``, and maps ``[..., in_dim]`` to
``[..., out_dim]``. Heads do not normalise: the model L2-normalises after the head, so a head can
be reused where unnormalised embeddings are wanted.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_head


def _check_dims(name: str, **dims: int | None) -> None:
    for key, value in dims.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{name} head: {key} must be a positive integer, got {value}")


@register_head("linear")
class LinearHead(nn.Module):
    """A single linear map. No bias by default, as in CLIP: the embedding is normalised afterwards,
    and a shared offset would only shift every embedding towards the same direction."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        _check_dims("linear", in_dim=in_dim, out_dim=out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


@register_head("mlp")
class MLPHead(nn.Module):
    """Linear -> GELU -> dropout -> Linear, for towers whose pooled output is far from the joint
    space (a frozen pretrained tower, where a linear map is too weak an adapter)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        _check_dims("mlp", in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim)
        if not 0 <= dropout < 1:
            raise ConfigError(f"mlp head: dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=bias),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim, bias=bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_head("identity")
class IdentityHead(nn.Module):
    """No projection: the tower already outputs joint embeddings (e.g. a pretrained CLIP tower whose
    projection is part of the tower). ``out_dim`` may be given only to assert the width."""

    def __init__(self, in_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        if out_dim is not None and out_dim != in_dim:
            raise ConfigError(
                f"identity head cannot change the width: the tower outputs {in_dim}, out_dim is {out_dim}; "
                f"use a 'linear' head or set out_dim to {in_dim}"
            )
        self.in_dim = self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        return x
