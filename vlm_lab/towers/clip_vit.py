"""CLIP's vision transformer, written to match Hugging Face ``CLIPVisionModel`` module for module.

Parameter names follow ``transformers.models.clip.modeling_clip`` (``embeddings.patch_embedding``,
``pre_layrnorm`` with HF's spelling, ``encoder.layers.N.self_attn.q_proj`` ...), so the state dict of
``CLIPVisionModel`` (or the ``vision_model.*`` part of a ``CLIPModel``) loads into
``ClipVisionTower`` without renaming. The encoder layer defined here is shared with the text tower
in ``clip_text.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_vision_tower
from vlm_lab.towers.base import ImageConfig, TowerOutput
from vlm_lab.towers.kv_cache import KeyValues, KVCache

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------
# Encoder (shared with clip_text.py)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that the original OpenAI CLIP checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, as HF stores them: self-attention, or
    cross-attention to a ``context`` (CoCa's decoder), with an optional cache of keys and values.
    ``dropout``: of the attention weights, in training only (CoCa's decoder; the towers use none)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads != 0:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.head_dim = width // heads
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KeyValues | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states`` attend to themselves, or to ``context`` when given.

        ``attention_mask`` is boolean, broadcastable to ``[batch, heads, query, key]``, True = may attend.
        With a ``cache`` (incremental decoding), self-attention appends this call's keys and values to
        the cached positions and attends over all of them; cross-attention computes the context's keys
        and values on the first call and reuses them afterwards.
        """
        batch, seq, width = hidden_states.shape
        q = self._split_heads(self.q_proj(hidden_states))
        if context is not None and cache is not None and cache.keys is not None:
            k, v = cache.keys, cache.values
        else:
            source = hidden_states if context is None else context
            k, v = self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source))
            if cache is not None:
                k, v = cache.append(k, v)
        # SDPA picks a fused kernel (flash / memory-efficient) when it can; its default scale is
        # head_dim ** -0.5, the same as HF's CLIPAttention.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, width))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, width]`` -> ``[batch, heads, seq, head_dim]``."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        # Both activations are parameter-free, so the choice never changes the state dict.
        self.activation_fn = QuickGELU() if quick_gelu else nn.GELU()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class ClipEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, layer_norm_eps: float) -> None:
        super().__init__()
        self.self_attn = ClipAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = ClipMLP(width, int(width * mlp_ratio), quick_gelu)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KeyValues | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask, cache)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class ClipEncoder(nn.Module):
    """A stack of ``ClipEncoderLayer``, optionally recomputing each layer's activations in backward."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        quick_gelu: bool,
        layer_norm_eps: float,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [ClipEncoderLayer(width, heads, mlp_ratio, quick_gelu, layer_norm_eps) for _ in range(layers)]
        )
        self.grad_checkpointing = grad_checkpointing
        self._init_weights(width, layers)

    @torch.no_grad()
    def _init_weights(self, width: int, layers: int) -> None:
        # HF CLIPPreTrainedModel._init_weights with initializer_factor 1: the residual-branch inputs
        # shrink with depth so that the residual stream's variance stays bounded.
        in_proj_std = width**-0.5 * (2 * layers) ** -0.5
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(proj.weight, std=in_proj_std)
            nn.init.normal_(attn.out_proj.weight, std=width**-0.5)
            nn.init.normal_(mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(mlp.fc2.weight, std=in_proj_std)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
                nn.init.zeros_(linear.bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``cache``: each layer's keys and values between decoding steps (``hidden_states`` are then the
        new positions only)."""
        # Checkpointing only pays off when a backward pass will follow.
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for index, layer in enumerate(self.layers):
            if recompute:
                hidden_states = checkpoint(layer, hidden_states, attention_mask, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, attention_mask, None if cache is None else cache.layer(index))
        return hidden_states


# --------------------------------------------------------------------------------------------------
# Vision tower


class PatchDropout(nn.Module):
    """FLIP's patch dropout (Li et al., 2023): in training, keep a random ``1 - prob`` of the patch tokens.

    The class token (position 0) is always kept; each image keeps its own random subset, in random
    order (position embeddings are already added, so order carries no meaning). The transformer then
    runs on about half the tokens at ``prob=0.5``, which is where the speed-up comes from. In eval
    mode, or at ``prob=0``, the input passes through unchanged. As open_clip's ``PatchDropout``
    (``transformer.py``), with the random draw on the input's device.
    """

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ConfigError(f"clip_vit: patch_dropout={prob} should be at least 0 and below 1 (the fraction "
                              f"of patch tokens dropped in training, e.g. 0.5)")
        self.prob = float(prob)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return tokens
        class_token, patches = tokens[:, :1], tokens[:, 1:]
        batch, count = patches.shape[:2]
        keep = max(1, int(count * (1.0 - self.prob)))
        # The top-k of Gaussian noise is a uniformly random subset of k positions per row.
        kept = torch.randn(batch, count, device=tokens.device).topk(keep, dim=-1).indices
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([class_token, patches], dim=1)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class ClipVisionEmbeddings(nn.Module):
    """Patchify with a strided convolution, prepend a class token, add learned positions."""

    def __init__(self, image_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.grid_size**2 + 1, width)
        # HF initialises these from initializer_range 0.02, except the class token (width ** -0.5).
        nn.init.normal_(self.class_embedding, std=width**-0.5)
        nn.init.normal_(self.patch_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Position embeddings ``[1 + grid_height * grid_width, width]`` for a patch grid of that size.

        The class position is kept; the learned square grid of patch positions is resized bicubically,
        as HF's ``interpolate_pos_encoding`` (after DINO) does.
        """
        weight = self.position_embedding.weight
        class_pos, patch_pos = weight[:1], weight[1:]
        width = weight.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid_size, self.grid_size, width).permute(0, 3, 1, 2)
        # Bicubic interpolation is not implemented for half precision on every device.
        patch_pos = F.interpolate(
            patch_pos.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
        ).to(weight.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_height * grid_width, width)
        return torch.cat([class_pos, patch_pos], dim=0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"clip_vit: image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        weight_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(weight_dtype)).flatten(2).transpose(1, 2)
        class_token = self.class_embedding.to(patches.dtype).expand(batch, 1, -1)
        embeddings = torch.cat([class_token, patches], dim=1)

        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        if (grid_height, grid_width) == (self.grid_size, self.grid_size):
            positions = self.position_embedding.weight
        else:
            positions = self.interpolate_pos_encoding(grid_height, grid_width)
        return embeddings + positions.unsqueeze(0)


@register_vision_tower("clip_vit")
class ClipVisionTower(nn.Module):
    """CLIP ViT image encoder (HF ``CLIPVisionModel`` layout).

    ``pooled`` is the post-LayerNormed class token; ``tokens`` is the encoder's last hidden state
    (class token first, not post-normed), exactly HF's ``pooler_output`` / ``last_hidden_state``.
    Images of another size than ``image_size`` work if both sides are multiples of ``patch_size``:
    the position embeddings are then interpolated bicubically.

    ``patch_dropout`` (FLIP): the fraction of patch tokens dropped at random in training, after the
    position embeddings are added; 0 (default) keeps them all, and evaluation always does. In
    training ``tokens`` then holds only the kept patches (after the class token).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        layer_norm_eps: float = 1e-5,
        grad_checkpointing: bool = False,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        patch_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"clip_vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ConfigError(f"clip_vit: image_mean and image_std need 3 values, got {image_mean}, {image_std}")
        # Every argument but grad_checkpointing and patch_dropout, explicit: what a checkpoint rebuilds the
        # tower from.
        self._architecture = {
            "image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers, "heads": heads,
            "mlp_ratio": mlp_ratio, "quick_gelu": quick_gelu, "layer_norm_eps": layer_norm_eps,
            "image_mean": [float(m) for m in image_mean], "image_std": [float(s) for s in image_std],
        }
        self.output_dim = width
        self.token_dim = width
        self.image_config = ImageConfig(
            size=(image_size, image_size),
            mean=tuple(float(m) for m in image_mean),
            std=tuple(float(s) for s in image_std),
            interpolation="bicubic",
        )

        self.embeddings = ClipVisionEmbeddings(image_size, patch_size, width)
        self.patch_dropout = PatchDropout(patch_dropout)  # no parameters: the state dict stays HF's
        self.pre_layrnorm = nn.LayerNorm(width, eps=layer_norm_eps)  # sic: HF's spelling
        self.encoder = ClipEncoder(width, layers, heads, mlp_ratio, quick_gelu, layer_norm_eps, grad_checkpointing)
        self.post_layernorm = nn.LayerNorm(width, eps=layer_norm_eps)

    # Where clip_vit_pretrained (vlm_lab/interop/pretrained.py) loaded the weights from (None: built
    # from arguments).
    pretrained_path: str | None = None

    def architecture_spec(self) -> dict[str, Any]:
        """The ``clip_vit`` spec that rebuilds this tower, also when it came from a pretrained checkpoint."""
        return {"name": "clip_vit", **self._architecture, "grad_checkpointing": self.encoder.grad_checkpointing,
                "patch_dropout": self.patch_dropout.prob}  # training settings: a resumed fit trains as before

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        hidden_states = self.pre_layrnorm(self.patch_dropout(self.embeddings(pixel_values)))
        last_hidden_state = self.encoder(hidden_states)
        pooled = self.post_layernorm(last_hidden_state[:, 0])
        return TowerOutput(pooled=pooled, tokens=last_hidden_state, mask=None)

