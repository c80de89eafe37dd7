"""Starting vlm-lab models from pretrained CLIP checkpoints (Hugging Face or open_clip directories)
or from a vlm-lab checkpoint file (fine-tuning).

Two entry points, both with the architecture read from the checkpoint's config:

* ``model.init_from: DIR`` -- the whole dual encoder. ``load_config`` puts
  ``init_model_section(DIR)`` (native towers with the checkpoint's sizes, linear heads, ``embed_dim``,
  the loss, the tokenizer) under the config files, so they may still change anything that keeps the
  weights loadable (``model.vision.grad_checkpointing``, ``model.tokenizer.max_length``);
  ``VisionLanguageModule`` then calls ``load_into_module``, which loads towers, projections and the
  logit scale, requiring every key to match. A vlm-lab checkpoint file (``last.ckpt``) works the same
  way: its model section as built and its tokenizer (``vlm_lab/checkpoint_format.py``), then every
  weight of the module; the optimizer and the schedule start afresh.
* ``clip_vit_pretrained`` / ``clip_text_pretrained`` (``pretrained_vision_tower(path)`` /
  ``pretrained_text_tower(path)`` in Python): one tower on its own, e.g. a pretrained image tower
  under a new text tower (LiT). Registry cards such as ``openai_clip_vit_b32`` name these with a
  default ``path``. They are registered here, not next to the towers: interop reads checkpoints and
  builds towers, so it sits a layer above them (``vlm_lab/layers.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from vlm_lab import checkpoint_format
from vlm_lab.interop.checkpoint import ClipCheckpoint, load_exactly, read_clip_checkpoint
from vlm_lab.registry import register_text_tower, register_vision_tower
from vlm_lab.towers.clip_text import ClipTextTower
from vlm_lab.towers.clip_vit import ClipVisionTower

# Module parts an init_from checkpoint must fill completely.
_PARTS = ("vision.", "text.", "vision_head.", "text_head.")


def init_model_section(path: str) -> dict[str, Any]:
    """The ``model`` config section that ``init_from: path`` starts from: a CLIP checkpoint directory's, or
    a vlm-lab checkpoint file's model as built (its tokenizer comes from the file too)."""
    if checkpoint_format.is_checkpoint_file(path):
        return checkpoint_format.read_portable_model(path, "model.init_from").model
    return read_clip_checkpoint(path).model_section()


def load_into_module(module: nn.Module, path: str) -> None:
    """Load the checkpoint at ``path`` (a CLIP directory or a vlm-lab checkpoint file) into a
    ``VisionLanguageModule`` built from its model section.

    Towers, heads (and a vlm-lab checkpoint's caption head) must match exactly (a one-line error lists
    missing and unexpected keys); the loss takes the logit scale (and SigLIP's bias) when it has a
    parameter of that name, so ``model.loss`` may be swapped, e.g. to ``align``, which then starts from
    its own temperature.
    """
    own = module.state_dict()
    if checkpoint_format.is_checkpoint_file(path):
        state = checkpoint_format.checkpoint_state_dict(path)
        parts = [key for key in own if not key.startswith("loss.")]
    else:
        state = read_clip_checkpoint(path).state_dict()
        parts = [key for key in own if key.startswith(_PARTS)]
    loss_keys = [key for key in ("loss.logit_scale", "loss.logit_bias") if key in own and key in state]
    keys = parts + loss_keys
    state = {key: value for key, value in state.items() if key in keys or not key.startswith("loss.")}
    load_exactly(module, state, f"init_from {path}", keys=keys)


def load_tower(tower_class: type[nn.Module], half: Literal["vision", "text"], path: str,
               **options: Any) -> nn.Module:
    """One tower of the CLIP checkpoint at ``path``: ``tower_class(**architecture, **options)``, loaded.

    ``options`` are the tower's non-architecture arguments (``grad_checkpointing``). The tower records
    ``pretrained_path``, and a text tower ``tokenizer_path`` (the checkpoint's tokenizer, or None), so
    that the module can pair it with the tokenizer it was trained with.
    """
    checkpoint = read_clip_checkpoint(path)
    tower = tower_class(**getattr(checkpoint, half), **options)
    prefix = f"{half}."
    state = {key[len(prefix):]: value for key, value in checkpoint.state_dict().items() if key.startswith(prefix)}
    load_exactly(tower, state, f"the {half} tower of {path}")
    tower.pretrained_path = str(path)
    if half == "text":
        tower.tokenizer_path = checkpoint.tokenizer_dir
    return tower


@register_vision_tower("clip_vit_pretrained")
def pretrained_vision_tower(path: str, grad_checkpointing: bool = False, patch_dropout: float = 0.0) -> ClipVisionTower:
    """The vision tower of the CLIP checkpoint directory ``path`` (Hugging Face ``CLIPModel`` or open_clip).

    The architecture (sizes, activation, LayerNorm eps, image mean/std) comes from the checkpoint's
    config and every weight must load. ``grad_checkpointing`` and ``patch_dropout`` (FLIP) change how
    it trains, not its weights.
    """
    return load_tower(ClipVisionTower, "vision", path, grad_checkpointing=grad_checkpointing,
                      patch_dropout=patch_dropout)


@register_text_tower("clip_text_pretrained")
def pretrained_text_tower(path: str, grad_checkpointing: bool = False) -> ClipTextTower:
    """The text tower of the CLIP checkpoint directory ``path`` (Hugging Face ``CLIPModel`` or open_clip).

    The architecture, vocabulary size and pooling rule come from the checkpoint's config and every
    weight must load; the module then uses the checkpoint's tokenizer unless ``model.tokenizer.path``
    names one.
    """
    return load_tower(ClipTextTower, "text", path, grad_checkpointing=grad_checkpointing)
