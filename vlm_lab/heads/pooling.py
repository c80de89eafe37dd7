"""Attentional pooling: learned queries summarise a tower's token sequence (CoCa, Yu et al. 2022)."""

from __future__ import annotations

import torch
from torch import nn


class AttentionalPooler(nn.Module):
    """Learned queries cross-attend over a tower's tokens: ``[B, seq, context_dim] -> [B, queries, width]``.

    CoCa uses one pooler with a single query for the contrastive embedding and one with N queries
    (256 in the paper) for the decoder, so each task gets the image summary it needs.
    """

    def __init__(self, width: int, context_dim: int, num_queries: int, heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.context_norm = nn.LayerNorm(context_dim)
        self.query_norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.context_norm(tokens)
        queries = self.query_norm(self.queries).unsqueeze(0).expand(len(tokens), -1, -1)
        return self.attn(queries, context, context, need_weights=False)[0]
