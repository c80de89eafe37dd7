"""The vlm-lab checkpoint format: a Lightning checkpoint that alone rebuilds its model, anywhere.

Lightning saves a module's ``__init__`` arguments as ``hyper_parameters``. For vlm-lab those are the
``model`` and ``optim`` config sections as the user wrote them: card names, pretrained weights in
files, folders and packages, a ``model.init_from`` folder, the captions a word vocabulary is built
from. Rebuilding from them re-runs the recipe: it needs every one of those files where the run found
them, and loads pretrained weights only to overwrite them with the trained ones.

So vlm-lab adds one entry of its own to every checkpoint it writes, ``checkpoint["vlm_lab"]``::

    format: 2
    model:           the model section as built: each tower its architecture_spec() (an explicit
                     constructor and arguments, no weights to load), each card resolved to the
                     constructor it builds, no init_from, no tokenizer path or captions file
    tokenizer_files: {file name: bytes}, the module's tokenizer as save_pretrained writes it

``VisionLanguageModule.load_from_checkpoint`` rebuilds from that entry and reads nothing else; the
hyperparameters keep the recipe as written, for the record (``hparams.yaml`` stays readable). A
checkpoint without the entry (format 1, written by vlm-lab up to commit e956f06) still loads by
re-running its recipe where the files it names exist; ``vlm-lab checkpoint upgrade OLD NEW``
(``vlm_lab.api.upgrade_checkpoint``) adds the entry. ``model.init_from`` takes a checkpoint too
(fine-tuning): the architecture and the tokenizer come from this entry, the weights from its state dict.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping

import torch
from torch import nn

from vlm_lab import registry
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer
from vlm_lab.towers.base import RebuildableTower

FORMAT = 2
KEY = "vlm_lab"

# The model section's registry specs and their kinds (the towers are handled apart: they are built objects).
_PART_KINDS = {"vision_head": "head", "text_head": "head", "caption_head": "head", "loss": "loss"}


@dataclass(frozen=True)
class PortableModel:
    """What a checkpoint needs to rebuild its model: the model section as built and the tokenizer's files."""

    model: dict[str, Any]
    tokenizer_files: dict[str, bytes]

    def tokenizer(self) -> Any:
        """The tokenizer, loaded from its files through a temporary directory that is removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="vlm-lab-tokenizer-") as directory:
            for name, data in self.tokenizer_files.items():
                (Path(directory) / name).write_bytes(data)
            return load_tokenizer(directory)

    def entry(self) -> dict[str, Any]:
        """The ``checkpoint["vlm_lab"]`` entry (plain types only, so ``weights_only`` loading reads it)."""
        return {"format": FORMAT, "model": self.model, "tokenizer_files": self.tokenizer_files}


# --------------------------------------------------------------------------------------------------
# Writing


def portable_model_section(model: Mapping[str, Any], vision: nn.Module, text: nn.Module) -> dict[str, Any]:
    """The ``model`` section that rebuilds a module built from ``model`` with towers ``vision`` and ``text``.

    Non-architecture settings (embed_dim, locks, loss weights, generation...) are kept as they are.
    """
    portable = copy.deepcopy(dict(model))
    portable["vision"] = tower_spec("vision_tower", vision, model["vision"])
    portable["text"] = tower_spec("text_tower", text, model["text"])
    for key, kind in _PART_KINDS.items():
        if key in model:
            portable[key] = resolved_spec(kind, model[key])
    # The tokenizer travels as files and the weights as the state dict: nothing to find or build from.
    portable["tokenizer"] = {**model["tokenizer"], "path": None, "train_from": None}
    portable["init_from"] = None
    return portable


def tower_spec(kind: str, tower: nn.Module, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The tower's own ``architecture_spec()``, or else its config spec with any card resolved."""
    if isinstance(tower, RebuildableTower):
        return tower.architecture_spec()
    return resolved_spec(kind, spec)


def resolved_spec(kind: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` naming a registered constructor: a card becomes what it builds, with its arguments."""
    name = spec["name"]
    if name in registry.constructors(kind):
        return dict(spec)
    card = registry.cards(kind).get(name)
    if card is None:  # not registered under this kind; building the module has reported that already
        return dict(spec)
    return {"name": card.builds, **card.args, **{key: value for key, value in spec.items() if key != "name"}}


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by name (whatever the kind of tokenizer)."""
    with tempfile.TemporaryDirectory(prefix="vlm-lab-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}


# --------------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(source: str | Path | IO[bytes], weights_only: bool | None = None) -> dict[str, Any]:
    """A checkpoint's dictionary. A local file is memory-mapped: reading its entry and hyperparameters
    costs no pass over the weights (they are read when used)."""
    weights_only = True if weights_only is None else weights_only
    if isinstance(source, (str, Path)) and Path(source).is_file():
        try:
            return torch.load(source, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError:  # the legacy (non-zip) serialisation cannot be memory-mapped
            pass
    if not isinstance(source, (str, Path)):  # a file object
        return torch.load(source, map_location="cpu", weights_only=weights_only)
    if "://" not in str(source):
        if not Path(source).is_file():
            raise ConfigError(f"no checkpoint file at {source}")
        return torch.load(source, map_location="cpu", weights_only=weights_only)
    import fsspec  # a remote file (s3://, gs://...), as Lightning reads them

    with fsspec.open(str(source), "rb") as remote:
        return torch.load(remote, map_location="cpu", weights_only=weights_only)


def portable_model(checkpoint: Mapping[str, Any], source: str | Path) -> PortableModel | None:
    """The checkpoint's ``vlm_lab`` entry, or None for a checkpoint written before it existed."""
    entry = checkpoint.get(KEY)
    if entry is None:
        if not isinstance(checkpoint.get("hyper_parameters", {}).get("model"), Mapping):
            raise ConfigError(f"{source} is not a vlm-lab checkpoint (no model in its hyper_parameters)")
        return None
    if int(entry.get("format", 0)) > FORMAT:
        raise ConfigError(f"{source} was written by a newer vlm-lab (checkpoint format {entry['format']}, this "
                          f"version reads up to {FORMAT}); upgrade vlm-lab")
    return PortableModel(model=dict(entry["model"]), tokenizer_files=dict(entry["tokenizer_files"]))


def is_checkpoint_file(path: Any) -> bool:
    """Whether ``model.init_from`` names a checkpoint file (a CLIP checkpoint is a directory)."""
    return isinstance(path, str) and bool(path) and Path(path).is_file()


def read_portable_model(path: str | Path, setting: str) -> PortableModel:
    """The portable model of the checkpoint ``path`` that ``setting`` names; one written before the
    format existed is refused with the command that converts it."""
    portable = portable_model(read_checkpoint(path), path)
    if portable is None:
        raise ConfigError(f"{setting}: {path} was written before checkpoints were self-contained; convert it "
                          f"first: {upgrade_command(path)}")
    return portable


def checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The module weights saved in a checkpoint file."""
    state = read_checkpoint(path).get("state_dict")
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path} holds no state_dict; is it a checkpoint of vlm-lab fit?")
    return dict(state)


# --------------------------------------------------------------------------------------------------
# Checkpoints written before the format (format 1)


def upgrade_command(path: str | Path) -> str:
    new = Path(path).with_name(Path(path).stem + "-v2.ckpt")
    return f"vlm-lab checkpoint upgrade {path} {new}"


def legacy_rebuild_error(path: str | Path, error: Exception) -> ConfigError:
    """The one line for a format-1 checkpoint whose recipe cannot be re-run here (a file it names is gone)."""
    return ConfigError(f"{path} was written before checkpoints were self-contained, so it rebuilds its model from "
                       f"the files its config names, and that failed: {error}. Where those files exist, convert it "
                       f"once: {upgrade_command(path)}")


# --------------------------------------------------------------------------------------------------
# Describing


def describe_checkpoint(path: str | Path) -> str:
    """What ``vlm-lab checkpoint show`` prints: format, progress, weights, tokenizer files, model section."""
    import yaml

    checkpoint = read_checkpoint(path)
    portable = portable_model(checkpoint, path)
    state = checkpoint.get("state_dict") or {}
    parameters = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    lines = [f"{path}: epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}, "
             f"{parameters / 1e6:.2f}M parameters and buffers ({_size(weight_bytes)}), "
             f"optimizer state {'kept' if checkpoint.get('optimizer_states') else 'absent'}"]
    if portable is None:
        lines.append(f"format 1: written before checkpoints were self-contained; loading re-runs the recipe "
                     f"below, which needs the files it names. Convert it: {upgrade_command(path)}")
        model = checkpoint["hyper_parameters"]["model"]
    else:
        files = ", ".join(f"{name} ({_size(len(data))})" for name, data in portable.tokenizer_files.items())
        lines.append(f"format {FORMAT}: self-contained; tokenizer files: {files}")
        model = portable.model
    lines.append("model:")
    lines += ["  " + line for line in yaml.safe_dump(model, sort_keys=False).splitlines()]
    return "\n".join(lines)


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
