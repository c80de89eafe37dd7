"""A pretrained CLIP on disk, in vlm-lab's terms, whichever ecosystem wrote it.

``read_clip_checkpoint(path)`` looks at a directory, decides whether Hugging Face
(``config.json`` of a ``CLIPModel``) or open_clip (``open_clip_config.json``) wrote it, and returns a
``ClipCheckpoint``: the ``clip_vit`` and ``clip_text`` arguments its config implies, the joint
embedding size, where its tokenizer lives, and a way to read its weights under vlm-lab's parameter
names (``vision.*``, ``text.*``, ``vision_head.proj.*``, ``text_head.proj.*``, ``loss.logit_scale``).
Everything downstream (``init_from``, the ``*_pretrained`` towers) works from that one object, so a
third format would be one more reader, not changes all over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vlm_lab.errors import ConfigError

# Files any Hugging Face tokenizer directory has at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer.model")


@dataclass
class ClipCheckpoint:
    """A CLIP checkpoint translated into vlm-lab: architecture from its config, weights on demand.

    ``vision`` and ``text`` are keyword arguments for ``ClipVisionTower`` and ``ClipTextTower``;
    ``text_head_bias`` says whether the text projection has a bias (open_clip's ``proj_bias``);
    ``loss`` is ``"clip"``, or ``"siglip"`` when the checkpoint has a logit bias.
    """

    path: Path
    format: str
    vision: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int
    text_head_bias: bool
    loss: str
    tokenizer_dir: str | None
    weights: list[Path]
    to_native: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = field(repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's weights under ``VisionLanguageModule`` parameter names."""
        state: dict[str, torch.Tensor] = {}
        for file in self.weights:
            state.update(read_weights_file(file))
        return self.to_native(state)

    def model_section(self) -> dict[str, Any]:
        """The ``model`` config section this checkpoint implies (``init_from`` starts from it)."""
        return {
            "vision": {"name": "clip_vit", **self.vision},
            "text": {"name": "clip_text", **self.text},
            "vision_head": {"name": "linear", "bias": False},
            "text_head": {"name": "linear", "bias": self.text_head_bias},
            "embed_dim": self.embed_dim,
            "loss": {"name": self.loss},
            "tokenizer": {"path": self.tokenizer_dir, "max_length": self.text["context_length"]},
        }


def read_clip_checkpoint(path: str | Path) -> ClipCheckpoint:
    """Read the config of the CLIP checkpoint in directory ``path`` (weights are read later, on demand).

    A Hugging Face ``CLIPModel`` directory (``config.json`` + ``model.safetensors``) and an open_clip
    directory (``open_clip_config.json`` + ``open_clip_model.safetensors`` or a ``.bin``/``.pt``) are
    recognised; a directory with both (many LAION uploads) is read as Hugging Face.
    """
    from vlm_lab.interop import hf_clip, open_clip

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(
            f"no checkpoint directory at {path} (a relative path starts at the current directory); download "
            f"a CLIP there first, e.g. hf download openai/clip-vit-base-patch32 --local-dir {path} (docs/how-to/pretrained-clip.md)"
        )
    if hf_clip.is_hf_clip_dir(directory):
        return hf_clip.read_hf_clip(directory)
    if (directory / open_clip.CONFIG_FILE).is_file():
        return open_clip.read_open_clip(directory)
    raise ConfigError(
        f"{path} is neither a Hugging Face CLIPModel directory (config.json with model_type 'clip' and "
        f"model.safetensors) nor an open_clip one ({open_clip.CONFIG_FILE} and its weights)"
    )


def tokenizer_dir(directory: Path) -> str | None:
    """``directory`` if it holds a Hugging Face tokenizer, else None."""
    return str(directory) if any((directory / name).is_file() for name in TOKENIZER_FILES) else None


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {file}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} should hold a JSON object, found {type(data).__name__}")
    return data


def read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, unwrapping training checkpoints."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(file), device="cpu")
    else:
        # weights_only: a downloaded pickle cannot run code while it loads.
        state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an open_clip training checkpoint: {"epoch", "state_dict", ...}
    if not isinstance(state, dict):
        raise ConfigError(f"{file} does not hold a state dict (found {type(state).__name__})")
    if state and all(key.startswith("module.") for key in state):  # saved from a DDP-wrapped model
        state = {key[len("module."):]: value for key, value in state.items()}
    # Saved from a model wrapped by torch.compile (open_clip_train --torchcompile saves the unwrapped one,
    # other scripts may not): "_orig_mod." levels name the same parameters.
    return {key.replace("_orig_mod.", ""): value for key, value in state.items()}


# --------------------------------------------------------------------------------------------------
# Checked loading


def key_summary(keys: list[str], limit: int = 6) -> str:
    """``"3 (a, b, c)"``: a count and the first few keys, for one-line errors."""
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_exactly(target: nn.Module, state: dict[str, torch.Tensor], source: str,
                 keys: list[str] | None = None) -> None:
    """Copy ``state`` into ``target``; every expected key must be there, with its shape, and nothing else.

    ``keys`` restricts what is expected to part of ``target.state_dict()`` (default: all of it).
    Raises a one-line ``ConfigError`` naming the missing and unexpected keys, or the shape mismatches.
    """
    own = target.state_dict()
    expected = list(own) if keys is None else keys
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ConfigError(
            f"{source} does not match the model: missing {key_summary(missing)}; "
            f"unexpected {key_summary(unexpected)}"
        )
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in expected
             if state[key].shape != own[key].shape]
    if wrong:
        raise ConfigError(f"{source} does not match the model: shapes differ (checkpoint vs model) for "
                          f"{key_summary(wrong)}")
    target.load_state_dict(state, strict=keys is None)


def mlp_ratio(hidden: int, width: int) -> float:
    """The ``mlp_ratio`` whose ``int(width * ratio)`` is exactly ``hidden`` (the native towers' rule)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:  # e.g. 8192 / 1664 rounds to just below 8192 / 1664 * 1664
        ratio = (hidden + 0.5) / width
    return ratio
