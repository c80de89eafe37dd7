"""A trained ``VisionLanguageModule``'s parts as plain numbers, for the exporters.

The native towers are read back from their modules (layer count, widths, activation, LayerNorm eps)
rather than from the config that built them, so what is exported is what runs. Heads become the
projection matrices both ecosystems use, and the loss becomes a logit scale (and SigLIP's bias).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vlm_lab.errors import ConfigError
from vlm_lab.heads import IdentityHead, LinearHead
from vlm_lab.towers.clip_text import ClipTextTower
from vlm_lab.towers.clip_vit import ClipEncoder, ClipVisionTower, QuickGELU


def encoder_arguments(encoder: ClipEncoder, final_norm: nn.LayerNorm) -> dict[str, Any]:
    """``layers``, ``heads``, ``mlp_hidden``, ``quick_gelu`` and ``layer_norm_eps`` of a native encoder."""
    first = encoder.layers[0]
    return {
        "layers": len(encoder.layers),
        "heads": first.self_attn.heads,
        "mlp_hidden": first.mlp.fc1.out_features,
        "quick_gelu": isinstance(first.mlp.activation_fn, QuickGELU),
        "layer_norm_eps": float(final_norm.eps),
    }


def vision_arguments(tower: ClipVisionTower) -> dict[str, Any]:
    """The architecture of a native ``clip_vit`` tower (``mlp_hidden`` instead of ``mlp_ratio``)."""
    height, width = tower.image_config.size
    if height != width:
        raise ConfigError(f"export: clip_vit image size {height}x{width} is not square; both formats need a square one")
    return {
        "image_size": height,
        "patch_size": tower.embeddings.patch_size,
        "width": tower.output_dim,
        **encoder_arguments(tower.encoder, tower.post_layernorm),
        "image_mean": list(tower.image_config.mean),
        "image_std": list(tower.image_config.std),
    }


def text_arguments(tower: ClipTextTower) -> dict[str, Any]:
    """The architecture of a native ``clip_text`` tower (``mlp_hidden`` instead of ``mlp_ratio``)."""
    return {
        "vocab_size": tower.vocab_size,
        "context_length": tower.max_length,
        "width": tower.output_dim,
        **encoder_arguments(tower.encoder, tower.final_layer_norm),
        "pooling": tower.pooling,
        "eos_token_id": tower.eos_token_id,
    }


def end_of_text_id(tokenizer: Any) -> int:
    """The special token the tokenizer ends every text with ([SEP] for BERT, <|endoftext|> for CLIP).

    ``pooling: eot`` picks the last real token; both HF and open_clip express that as "the first
    occurrence of this id", which is the same token exactly when the tokenizer appends it to every text.
    """
    ids = tokenizer("a")["input_ids"]
    last = ids[-1] if ids else None
    if last is None or last not in set(tokenizer.all_special_ids):
        raise ConfigError(
            "export: the text tower pools the last real token (pooling: eot), but the tokenizer does not end "
            "texts with a special token, so neither Hugging Face nor open_clip can pool the same token"
        )
    return int(last)


def check_no_caption_head(module: Any, fmt: str, reason: str) -> None:
    """Refuse a CoCa model: exporting its dual encoder alone would silently drop the captioner."""
    if getattr(module, "caption_head", None) is not None:
        raise ConfigError(
            f"export {fmt}: the model has a {type(module.caption_head).__name__} caption head (CoCa), which this "
            f"format cannot hold: {reason}; supported: dual encoders without a caption head "
            f"(docs/how-to/export.md, CoCa)"
        )


def projection(head: nn.Module, in_dim: int, name: str, allow_bias: bool = False) -> tuple[Tensor, Tensor | None]:
    """A head as ``(weight [out, in], bias or None)``: a bias-free ``linear`` head, or ``identity``."""
    if isinstance(head, LinearHead) and (head.proj.bias is None or allow_bias):
        bias = head.proj.bias.detach() if head.proj.bias is not None else None
        return head.proj.weight.detach(), bias
    if isinstance(head, IdentityHead):
        return torch.eye(in_dim), None
    kind = "linear head with a bias" if isinstance(head, LinearHead) else type(head).__name__
    raise ConfigError(
        f"export: {name} is a {kind}; the exported formats project with one bias-free matrix "
        f"(use a 'linear' head without bias, or 'identity')"
    )


def logit_scale_and_bias(loss: nn.Module) -> tuple[float, float | None]:
    """``(log of the scale the loss applies, its logit bias or None)``, clamps included.

    The exported models compute ``exp(logit_scale) * similarity`` with no clamp, so the clamped value
    the loss actually uses is what must be written (an ALIGN temperature T becomes ``log(1 / T)``).
    """
    scale = float(loss.logit_scale_value().detach())
    bias = getattr(loss, "logit_bias", None)
    return math.log(scale), (float(bias.detach()) if bias is not None else None)
