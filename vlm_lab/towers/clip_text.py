"""CLIP's causal text transformer, written to match Hugging Face ``CLIPTextModel`` module for module.

Parameter names follow ``transformers.models.clip.modeling_clip`` (``embeddings.token_embedding``,
``encoder.layers.N...``, ``final_layer_norm``), so the state dict of ``CLIPTextModel`` (or the
``text_model.*`` part of a ``CLIPModel``) loads into ``ClipTextTower`` without renaming. The
encoder is the one ``clip_vit.py`` defines.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_text_tower
from vlm_lab.towers.base import TowerOutput
from vlm_lab.towers.clip_vit import ClipEncoder
from vlm_lab.towers.kv_cache import KVCache, causal_mask


class ClipTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context_length, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token plus position embeddings; ``start`` is the first token's position (decoding steps)."""
        seq = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[start:start + seq].unsqueeze(0)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, 1, seq, seq]`` mask for SDPA: query i may attend key j iff j <= i and j is real.

    Each token may also attend itself: with left padding a padded query would otherwise see no key at
    all, and a softmax over nothing is NaN, which would then leak into gradients. Real tokens are
    unaffected because they never see padded keys.
    """
    seq = attention_mask.shape[1]
    device = attention_mask.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    return allowed | torch.eye(seq, dtype=torch.bool, device=device)


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last token with mask 1 in each row (works for right and left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


@register_text_tower("clip_text")
class ClipTextTower(nn.Module):
    """CLIP text encoder (HF ``CLIPTextModel`` layout): causal attention, final LayerNorm.

    ``pooling`` picks the token whose state becomes ``pooled``:

    * ``"eot"``: the last real token according to ``attention_mask``. Works with any tokenizer that
      ends a text with a special token (CLIP's end-of-text, BERT's [SEP]).
    * ``"argmax"``: the token with the largest id, the OpenAI CLIP convention (its end-of-text id
      49407 is the largest in the vocabulary). Wrong for tokenizers where that does not hold.
    * ``"eos_id"``: the first token whose id is ``eos_token_id``. Hugging Face ``CLIPTextModel``
      pools this way whenever its config's ``eos_token_id`` is not the legacy 2, and open_clip
      does with ``pool_type: eos``; checkpoints from either load with the rule they were trained with.

    Causal attention means padding after a text never changes its states; the mask additionally
    keeps left padding out.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        layer_norm_eps: float = 1e-5,
        pooling: Literal["eot", "argmax", "eos_id"] = "eot",
        eos_token_id: int | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("eot", "argmax", "eos_id"):
            raise ConfigError(f"clip_text: pooling must be 'eot', 'argmax' or 'eos_id', got {pooling!r}")
        if (pooling == "eos_id") != (eos_token_id is not None):
            raise ConfigError(
                f"clip_text: eos_token_id goes with pooling 'eos_id' and only with it; "
                f"got pooling={pooling!r}, eos_token_id={eos_token_id!r}"
            )
        # Every argument but grad_checkpointing, explicit (vocab_size too, which a config may leave to
        # the tokenizer): what a checkpoint rebuilds the tower from.
        self._architecture = {
            "vocab_size": vocab_size, "context_length": context_length, "width": width, "layers": layers,
            "heads": heads, "mlp_ratio": mlp_ratio, "quick_gelu": quick_gelu, "layer_norm_eps": layer_norm_eps,
            "pooling": pooling, "eos_token_id": eos_token_id,
        }
        self.pooling = pooling
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.output_dim = width
        self.token_dim = width
        self.max_length = context_length

        self.embeddings = ClipTextEmbeddings(vocab_size, context_length, width)
        self.encoder = ClipEncoder(width, layers, heads, mlp_ratio, quick_gelu, layer_norm_eps, grad_checkpointing)
        self.final_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)

    # Set by clip_text_pretrained (vlm_lab/interop/pretrained.py): the checkpoint directory, and its
    # tokenizer directory (or None).
    pretrained_path: str | None = None
    tokenizer_path: str | None = None

    def architecture_spec(self) -> dict[str, Any]:
        """The ``clip_text`` spec that rebuilds this tower, also when it came from a pretrained checkpoint."""
        return {"name": "clip_text", **self._architecture, "grad_checkpointing": self.encoder.grad_checkpointing}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> TowerOutput:
        """Encode ``input_ids`` ``[batch, seq]``.

        With a ``cache`` (incremental decoding, ``vlm_lab/generation.py``) ``input_ids`` are the positions
        after those the cache holds, every layer appends its keys and values to it, and
        ``attention_mask`` (if given) covers the cached positions and the new ones; ``tokens`` and
        ``pooled`` then come from the new positions. Without one this is the training forward pass.
        """
        batch, seq = input_ids.shape
        past = 0 if cache is None else cache.length
        if past + seq > self.max_length:
            raise ValueError(
                f"clip_text: sequence length {past + seq} exceeds context_length {self.max_length}; "
                f"truncate the text to at most {self.max_length} tokens"
            )
        if cache is not None and attention_mask is None:
            mask = causal_mask(seq, past, input_ids.device)  # no padding: causality alone
            attention_mask = torch.ones_like(input_ids)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            mask = causal_padding_mask(attention_mask)
            if past:  # the new positions' rows; the mask returned covers them only
                mask, attention_mask = mask[:, :, past:], attention_mask[:, past:]

        hidden_states = self.encoder(self.embeddings(input_ids, start=past), mask, cache)
        last_hidden_state = self.final_layer_norm(hidden_states)

        if self.pooling == "argmax":
            index = input_ids.argmax(dim=-1)
        elif self.pooling == "eos_id":
            # argmax returns the first maximum: the first end-of-text even when padding repeats it.
            index = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        else:
            index = last_real_position(attention_mask)
        pooled = last_hidden_state[torch.arange(batch, device=input_ids.device), index]
        return TowerOutput(pooled=pooled, tokens=last_hidden_state, mask=attention_mask)

