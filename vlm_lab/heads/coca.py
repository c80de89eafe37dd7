"""CoCa's captioning half: attentional poolers and the multimodal text decoder.

CoCa (Yu et al., 2022) trains one model with two losses::

    image ─vision tower─▶ tokens ─┬─ contrastive pooler (1 query) ──▶ vision_head ─▶ contrastive loss
                                  └─ caption pooler (N queries) ──┐
    caption ─text tower (causal)─▶ token states ─────────────────▶ multimodal decoder ─▶ next-token logits

The text tower is the "unimodal decoder": it encodes the caption for the contrastive loss, and its
token states are the input of the multimodal decoder, which adds causal self-attention and
cross-attention to the pooled image tokens. Because the text tower is causal, state ``i`` only sees
tokens ``<= i``, so teacher-forced training never peeks at the token it predicts.

:class:`CocaCaptionHead` (registered as the head ``coca_decoder``) holds both poolers and the
decoder. The decoder is made of the text tower's own building blocks (``ClipAttention``, ``ClipMLP``),
so it decodes incrementally the way the tower does: given a :class:`DecoderCache`, each attention layer
keeps its keys and values between steps (the cross-attention's, of the pooled image, are computed
once). ``vlm_lab/generation.py`` runs the decoding loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_lab import registry
from vlm_lab.distributed import sum_over_ranks, world_info
from vlm_lab.errors import ConfigError
from vlm_lab.heads.pooling import AttentionalPooler
from vlm_lab.registry import register_head
from vlm_lab.towers.clip_text import ClipTextTower
from vlm_lab.towers.clip_vit import ClipAttention, ClipMLP
from vlm_lab.towers.kv_cache import KeyValues, KVCache, causal_mask

# --------------------------------------------------------------------------------------------------
# Multimodal decoder


class MultimodalDecoderLayer(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to the pooled image tokens, MLP.

    ``dropout`` (training only): of both attentions' weights, and of each of the three branches'
    outputs before they join the residual stream (the Transformer's residual dropout). Its masks
    come from torch's random stream, which ``vlm_lab.seeding.EpochSeeding`` reseeds before every
    training step, so a resumed run draws the masks the uninterrupted one drew.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = ClipAttention(width, heads, dropout=dropout)
        self.cross_attn = ClipAttention(width, heads, dropout=dropout)
        self.mlp = ClipMLP(width, int(width * mlp_ratio), quick_gelu=False)
        self.norm_self = nn.LayerNorm(width)
        self.norm_cross = nn.LayerNorm(width)
        self.norm_mlp = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)  # no parameters: the state dict is the same with or without

    def forward(self, x: torch.Tensor, image: torch.Tensor, attention_mask: torch.Tensor | None = None,
                self_cache: KeyValues | None = None, cross_cache: KeyValues | None = None) -> torch.Tensor:
        """``attention_mask``: the self-attention's causal mask (``causal_mask``); the caches: the two
        attentions' keys and values between decoding steps."""
        x = x + self.dropout(self.self_attn(self.norm_self(x), attention_mask, self_cache))
        x = x + self.dropout(self.cross_attn(self.norm_cross(x), cache=cross_cache, context=image))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


@dataclass
class DecoderCache:
    """The multimodal decoder's keys and values between decoding steps: its self-attention's (one
    position more each step) and its cross-attention's (the pooled image, computed once)."""

    self_attention: KVCache = field(default_factory=KVCache)
    cross_attention: KVCache = field(default_factory=KVCache)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (beam search: each surviving beam continues its parent's cache)."""
        self.self_attention.reorder(index)
        self.cross_attention.reorder(index)


@register_head("coca_decoder")
class CocaCaptionHead(nn.Module):
    """CoCa's attentional poolers and multimodal text decoder.

    Args (``in_dim``, ``out_dim`` and ``text_dim`` are supplied by vlm-lab):
        in_dim: the vision tower's token width.
        out_dim: the vocabulary size (the tokenizer's).
        text_dim: the text tower's token width.
        width: the decoder's width (default: ``text_dim``); text states are projected to it if needed.
        layers, heads, mlp_ratio: the decoder's depth, attention heads and MLP expansion.
        image_queries: the caption pooler's number of queries (CoCa: 256).
        contrastive_pooler: pool the image for the contrastive loss with a 1-query attentional pooler
            (CoCa); false keeps the vision tower's own pooled output.
        tie_embedding: share the output projection with the text tower's token embedding (needs
            ``width == text_dim``); false gives the decoder its own output embedding.
        label_smoothing: of the caption cross-entropy.
        dropout: in training, the decoder layers' attention-weight and residual dropout
            (:class:`MultimodalDecoderLayer`); 0 (the default) draws nothing.
        grad_checkpointing: recompute each decoder layer's activations in backward.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        text_dim: int,
        width: int | None = None,
        layers: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        image_queries: int = 64,
        contrastive_pooler: bool = True,
        tie_embedding: bool = False,
        label_smoothing: float = 0.0,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        width = text_dim if width is None else width
        for key, value in (("width", width), ("layers", layers), ("heads", heads), ("image_queries", image_queries)):
            if value <= 0:
                raise ConfigError(f"coca_decoder: {key} must be a positive integer, got {value}")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"coca_decoder: label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"coca_decoder: dropout must be in [0, 1), got {dropout}")
        if tie_embedding and width != text_dim:
            raise ConfigError(f"coca_decoder: tie_embedding needs width == the text tower's width ({text_dim}), "
                              f"got width={width}")
        self.width, self.vocab_size, self.tie_embedding = width, out_dim, tie_embedding
        self.label_smoothing = label_smoothing
        self.grad_checkpointing = grad_checkpointing
        self.caption_pooler = AttentionalPooler(width, in_dim, image_queries, heads)
        self.contrastive_pooler = AttentionalPooler(width, in_dim, 1, heads) if contrastive_pooler else None
        self.text_proj = nn.Linear(text_dim, width) if text_dim != width else nn.Identity()
        self.layers = nn.ModuleList([MultimodalDecoderLayer(width, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.final_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, out_dim, bias=False)
        nn.init.normal_(self.output.weight, std=width**-0.5)

    @property
    def output_dim(self) -> int:
        """The width of the contrastive image embedding (what the vision head maps)."""
        return self.width

    def tie_output_to(self, embedding: nn.Embedding) -> None:
        """Share the output projection with the text tower's token embedding (``tie_embedding``)."""
        if tuple(embedding.weight.shape) != (self.vocab_size, self.width):
            raise ConfigError(f"coca_decoder: cannot tie a {tuple(embedding.weight.shape)} token embedding to a "
                              f"({self.vocab_size}, {self.width}) output; set tie_embedding: false")
        self.output.weight = embedding.weight

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def pool_contrastive(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, seq, in_dim]`` -> ``[B, width]``: the image's contrastive embedding (before the head)."""
        return self.contrastive_pooler(image_tokens)[:, 0]

    def pool_caption(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, seq, in_dim]`` -> ``[B, image_queries, width]``: what the decoder cross-attends to."""
        return self.caption_pooler(image_tokens)

    def decode(self, text_states: torch.Tensor, image: torch.Tensor, cache: DecoderCache | None = None) -> torch.Tensor:
        """Next-token logits ``[B, seq, vocab]`` for text states ``[B, seq, text_dim]`` (only the new
        positions when ``cache`` holds the earlier ones) and pooled image tokens ``[B, queries, width]``."""
        x = self.text_proj(text_states)
        past = 0 if cache is None else cache.self_attention.length
        mask = causal_mask(x.shape[1], past, x.device)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for index, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, image, mask, use_reentrant=False)
            elif cache is not None:
                x = layer(x, image, mask, cache.self_attention.layer(index), cache.cross_attention.layer(index))
            else:
                x = layer(x, image, mask)
        return self.output(self.final_norm(x))

    def caption_loss(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each position's logits against the next token, averaged over the
        non-padding tokens of the *global* batch; padding is ignored.

        Under DDP each rank holds captions of other lengths, so a per-rank token average would weigh
        a token of a rank with few tokens more than one of a rank with many. The loss of the whole
        batch is ``S / N``: the sum of every rank's per-token losses over the number ``N`` of tokens
        on all ranks. Each rank returns ``W * S_r / N`` (``S_r`` its own sum, ``W`` the world size):
        the mean over ranks, which is what ``train/caption_loss`` logs, is then ``S / N``, and DDP's
        averaging of the gradients (a division by ``W``) leaves exactly the gradient of ``S / N``.
        On one process this is the plain token average. Checked against one process in
        ``tests/test_distributed.py``.
        """
        return self.caption_loss_from_sum(self.caption_token_losses(logits, input_ids, attention_mask), attention_mask)

    def caption_token_losses(self, logits: torch.Tensor, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor) -> torch.Tensor:
        """``S_r``: the cross-entropy summed over the batch's non-padding tokens. A sum over pairs,
        so the chunks of a chunked step (vlm_lab/gradient_cache.py) add up to the batch's."""
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing, reduction="sum")

    def caption_loss_from_sum(self, summed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``W * S_r / N`` (``caption_loss``) from ``S_r``, with ``N`` counted on the whole batch's
        ``attention_mask`` (every position but the first predicts a token) and over all ranks."""
        _, world_size = world_info()
        tokens = sum_over_ranks((attention_mask[:, 1:] != 0).sum()).clamp_min(1)
        return summed * world_size / tokens


# --------------------------------------------------------------------------------------------------
# Building


def check_causal_text_tower(text: nn.Module) -> None:
    """CoCa's decoder reads the text tower's token states, so the tower must be causal (``clip_text``)."""
    if not isinstance(text, ClipTextTower):
        raise ConfigError(f"model.caption_head: a caption head needs a causal text tower (clip_text or one of its "
                          f"cards), got {type(text).__name__}; a bidirectional tower would show each position "
                          f"the token it must predict")


def build_caption_head(spec: dict, vision: nn.Module, text: nn.Module) -> CocaCaptionHead:
    """The ``model.caption_head`` spec built for these towers (widths and vocabulary supplied)."""
    check_causal_text_tower(text)
    head = registry.build("head", spec, in_dim=vision.token_dim, out_dim=text.vocab_size, text_dim=text.token_dim)
    if not isinstance(head, CocaCaptionHead):
        raise ConfigError(f"model.caption_head: {spec['name']!r} is not a caption head; use coca_decoder")
    if head.tie_embedding:
        head.tie_output_to(text.embeddings.token_embedding)
    return head
