"""Keys and values kept between decoding steps (what transformers calls ``past_key_values``).

Incremental decoding runs each attention layer on the new positions only. The layer itself reads the
earlier positions' keys and values from its :class:`KeyValues` and appends the new ones
(``ClipAttention.forward(..., cache=...)``); a cross-attention layer computes its context's keys and
values on the first step and reuses them. So a decoding step runs the very layers training runs, and
a change to a layer reaches both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeyValues:
    """One attention layer's cached keys and values, ``[batch, heads, positions, head_dim]`` each."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """How many positions are cached."""
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; return every position's."""
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (beam search: each surviving beam continues its parent's cache)."""
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)


class KVCache:
    """The :class:`KeyValues` of every attention layer of a stack, made as the layers first ask."""

    def __init__(self) -> None:
        self.layers: list[KeyValues] = []

    def layer(self, index: int) -> KeyValues:
        while len(self.layers) <= index:
            self.layers.append(KeyValues())
        return self.layers[index]

    @property
    def length(self) -> int:
        """How many positions the stack has encoded (0 before the first step)."""
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        for entry in self.layers:
            entry.reorder(index)


def causal_mask(queries: int, past: int, device: torch.device) -> torch.Tensor | None:
    """Boolean ``[queries, past + queries]`` mask for the new positions of a causal layer: new position
    ``t`` sees every cached position and the new ones up to ``t``. None for a single new position,
    which may see everything before it."""
    if queries == 1:
        return None
    return torch.ones(queries, past + queries, dtype=torch.bool, device=device).tril(diagonal=past)
