"""Hugging Face ``CLIPModel`` directories: read into the native towers, and export back.

The native towers name their parameters as ``CLIPVisionTransformer`` / ``CLIPTextTransformer`` do,
so the weight mapping is a change of prefix: ``vision_model.`` <-> ``vision.``, ``text_model.`` <->
``text.``, ``visual_projection`` / ``text_projection`` <-> the heads' ``proj``, ``logit_scale`` <->
the loss's. The architecture is read from ``config.json`` (through ``transformers.CLIPConfig``, so
keys a file leaves out get the same defaults Hugging Face gives them).

Text pooling follows ``CLIPTextModel``: a config whose ``eos_token_id`` is the legacy 2 pools the
largest token id (``pooling: argmax``), any other pools the first ``eos_token_id``
(``pooling: eos_id``). On export ``pooling: eot`` (last real token) becomes the second rule with the
tokenizer's end-of-text id.

Export writes a ``CLIPModel`` when both towers are the native ones, otherwise a
``VisionTextDualEncoderModel`` whose halves are the ``hf_vision`` / ``hf_text`` models (a native tower
becomes ``CLIPVisionModel`` / ``CLIPTextModel``, a ``timm`` tower ``TimmWrapperModel``). Either way
``from_pretrained(OUT)`` loads it offline, and ``AutoProcessor.from_pretrained(OUT)`` its
preprocessing (a timm tower's as ``TimmWrapperImageProcessor``, which runs the very transform
vlm-lab's data modules run). An ``hf_text`` tower pooled otherwise than by its model's
``pooler_output`` (MiniLM's mean pooling) needs one step the dual encoder cannot take itself; the
export writes that recipe into ``OUT/README.md``. What is held, and why: docs/how-to/export.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlm_lab.errors import ConfigError
from vlm_lab.interop.checkpoint import (ClipCheckpoint, load_exactly, mlp_ratio, read_json,
                                        tokenizer_dir)
from vlm_lab.interop.parts import (check_no_caption_head, end_of_text_id, logit_scale_and_bias, projection,
                                   text_arguments, vision_arguments)
from vlm_lab.towers.clip_text import ClipTextTower
from vlm_lab.towers.clip_vit import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipVisionTower
from vlm_lab.towers.hf import HFTextTower, HFVisionTower
from vlm_lab.towers.timm_tower import TimmVisionTower

# Weight files save_pretrained writes, in order of preference (an index lists the shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

# HF CLIPTextModel pools with argmax when eos_token_id is this legacy value.
LEGACY_EOS_TOKEN_ID = 2

# HF CLIPModel parameter <-> VisionLanguageModule parameter (prefixes end with a dot).
_RENAMES = {
    "vision_model.": "vision.",
    "text_model.": "text.",
    "visual_projection.weight": "vision_head.proj.weight",
    "text_projection.weight": "text_head.proj.weight",
    "logit_scale": "loss.logit_scale",
}

_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


# --------------------------------------------------------------------------------------------------
# Reading


def is_hf_clip_dir(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and read_json(config).get("model_type") == "clip" and bool(_weight_files(directory))


def _weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        file = directory / name
        if file.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(read_json(file).get("weight_map", {}).values()))
                return [directory / shard for shard in shards]
            return [file]
    return []


def _quick_gelu(config: Any, where: str) -> bool:
    if config.hidden_act not in _ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_act {config.hidden_act!r} has no native counterpart; "
                          f"supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[config.hidden_act]


def read_hf_clip(directory: Path) -> ClipCheckpoint:
    """The ``ClipCheckpoint`` of a ``CLIPModel`` directory written by ``save_pretrained``."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(str(directory), local_files_only=True)
    vision, text = config.vision_config, config.text_config
    if vision.num_channels != 3:
        raise ConfigError(f"{directory}: vision_config.num_channels is {vision.num_channels}; clip_vit takes RGB")
    processor_file = directory / "preprocessor_config.json"
    processor = read_json(processor_file) if processor_file.is_file() else {}

    vision_args = {
        "image_size": int(vision.image_size),
        "patch_size": int(vision.patch_size),
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "heads": vision.num_attention_heads,
        "mlp_ratio": mlp_ratio(vision.intermediate_size, vision.hidden_size),
        "quick_gelu": _quick_gelu(vision, f"{directory} vision_config"),
        "layer_norm_eps": float(vision.layer_norm_eps),
        "image_mean": [float(m) for m in processor.get("image_mean", OPENAI_CLIP_MEAN)],
        "image_std": [float(s) for s in processor.get("image_std", OPENAI_CLIP_STD)],
    }
    if text.eos_token_id == LEGACY_EOS_TOKEN_ID:
        pooling: dict[str, Any] = {"pooling": "argmax"}
    else:
        pooling = {"pooling": "eos_id", "eos_token_id": int(text.eos_token_id)}
    text_args = {
        "vocab_size": text.vocab_size,
        "context_length": text.max_position_embeddings,
        "width": text.hidden_size,
        "layers": text.num_hidden_layers,
        "heads": text.num_attention_heads,
        "mlp_ratio": mlp_ratio(text.intermediate_size, text.hidden_size),
        "quick_gelu": _quick_gelu(text, f"{directory} text_config"),
        "layer_norm_eps": float(text.layer_norm_eps),
        **pooling,
    }
    return ClipCheckpoint(
        path=directory, format="hf", vision=vision_args, text=text_args, embed_dim=config.projection_dim,
        text_head_bias=False, loss="clip", tokenizer_dir=tokenizer_dir(directory),
        weights=_weight_files(directory), to_native=hf_to_native,
    )


def hf_to_native(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``CLIPModel`` parameter names -> ``VisionLanguageModule`` ones; unknown keys pass through unchanged
    (so that loading reports them as unexpected)."""
    native = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue  # a buffer older transformers versions saved; the positions are implicit here
        native[_rename(key, _RENAMES)] = value
    return native


def native_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``VisionLanguageModule`` parameter names -> ``CLIPModel`` ones."""
    inverse = {new: old for old, new in _RENAMES.items()}
    return {_rename(key, inverse): value for key, value in state.items()}


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if old.endswith(".") and key.startswith(old):
            return new + key[len(old):]
        if key == old:
            return new
    return key


# --------------------------------------------------------------------------------------------------
# Export


def clip_vision_config(tower: ClipVisionTower) -> Any:
    """The ``CLIPVisionConfig`` of a native ``clip_vit`` tower."""
    from transformers import CLIPVisionConfig

    args = vision_arguments(tower)
    return CLIPVisionConfig(
        hidden_size=args["width"], intermediate_size=args["mlp_hidden"], num_hidden_layers=args["layers"],
        num_attention_heads=args["heads"], num_channels=3, image_size=args["image_size"],
        patch_size=args["patch_size"], hidden_act="quick_gelu" if args["quick_gelu"] else "gelu",
        layer_norm_eps=args["layer_norm_eps"],
    )


def clip_text_config(tower: ClipTextTower, tokenizer: Any) -> Any:
    """The ``CLIPTextConfig`` of a native ``clip_text`` tower, its pooling rule written as ``eos_token_id``."""
    from transformers import CLIPTextConfig

    args = text_arguments(tower)
    if args["pooling"] == "argmax":
        ids = {"eos_token_id": LEGACY_EOS_TOKEN_ID, "bos_token_id": 0, "pad_token_id": 1}
    else:
        eos = args["eos_token_id"] if args["pooling"] == "eos_id" else end_of_text_id(tokenizer)
        if eos == LEGACY_EOS_TOKEN_ID:
            raise ConfigError(
                f"export hf: the text tower pools the first token with id {eos}, but CLIPTextModel reads "
                f"eos_token_id {LEGACY_EOS_TOKEN_ID} as 'pool the largest id'; it cannot express this model"
            )
        start = getattr(tokenizer, "bos_token_id", None)
        start = start if start is not None else getattr(tokenizer, "cls_token_id", None)
        ids = {"eos_token_id": eos, "bos_token_id": start, "pad_token_id": getattr(tokenizer, "pad_token_id", None)}
    return CLIPTextConfig(
        vocab_size=args["vocab_size"], hidden_size=args["width"], intermediate_size=args["mlp_hidden"],
        num_hidden_layers=args["layers"], num_attention_heads=args["heads"],
        max_position_embeddings=args["context_length"], hidden_act="quick_gelu" if args["quick_gelu"] else "gelu",
        layer_norm_eps=args["layer_norm_eps"], **ids,
    )


# Poolings of an hf_text tower that VisionTextDualEncoderModel cannot run itself (it projects the text
# model's pooler_output), each as the expression that computes it from `hidden` (the text model's
# last_hidden_state) and `mask` (the tokenizer's attention_mask). The export's README.md gives the recipe.
TEXT_POOLING_RECIPES = {
    "mean": "(hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)",
    "cls": "hidden[:, 0]",
    "eos": "hidden[torch.arange(len(hidden)), (mask * torch.arange(mask.shape[1])).argmax(1)]",
}

SUPPORTED_TOWERS = {"vision": "clip_vit, timm, hf_vision (pooling: pooler)", "text": "clip_text, hf_text"}


def timm_wrapper_config(tower: TimmVisionTower) -> Any:
    """The ``TimmWrapperConfig`` that rebuilds a ``timm`` tower's model, without weights or hub access.

    ``TimmWrapperModel`` calls ``timm.create_model(architecture, pretrained=False, num_classes=0,
    **model_args)``, the tower's own call, and its ``pooler_output`` is ``forward_head`` of a model
    without classifier: the tower's ``pooled``. ``hidden_size`` is not a timm field;
    ``VisionTextDualEncoderModel`` sizes ``visual_projection`` from it.
    """
    from transformers import TimmWrapperConfig

    config = TimmWrapperConfig(architecture=tower.model_name, model_args=tower.model_args or None, num_labels=0)
    config.hidden_size = tower.output_dim
    return config


def timm_data_config(image_config: Any) -> dict[str, Any]:
    """``image_config`` as the timm data config ``TimmWrapperImageProcessor`` builds its transform from.

    vlm-lab's data modules build their evaluation transform with timm's ``create_transform`` from the
    same five values (``vlm_lab/data/transforms.py``), so the processor prepares images identically.
    """
    height, width = image_config.size
    return {"input_size": [3, height, width], "interpolation": image_config.interpolation,
            "crop_pct": image_config.crop_pct, "crop_mode": "center", "mean": list(image_config.mean),
            "std": list(image_config.std)}


def _portable(config: Any) -> Any:
    """A copy of an HF tower's config without ``_name_or_path``: where its weights were loaded from
    here (a package folder of this machine, or nothing for a tower rebuilt from a checkpoint) is no part
    of the exported model, and keeping it would make two exports of one model differ."""
    config = copy.deepcopy(config)
    config.name_or_path = ""
    return config


def _half(tower: Any, kind: str, tokenizer: Any) -> tuple[Any, dict[str, Tensor]]:
    """``(HF config, state dict)`` of one tower as a standalone HF model."""
    if kind == "vision" and isinstance(tower, ClipVisionTower):
        return clip_vision_config(tower), tower.state_dict()
    if kind == "text" and isinstance(tower, ClipTextTower):
        return clip_text_config(tower, tokenizer), tower.state_dict()
    if kind == "vision" and isinstance(tower, TimmVisionTower):
        # TimmWrapperModel keeps the timm model as `timm_model`.
        return timm_wrapper_config(tower), {f"timm_model.{k}": v for k, v in tower.model.state_dict().items()}
    if kind == "vision" and isinstance(tower, HFVisionTower):
        if tower.pooling != "pooler":
            raise ConfigError(
                f"export hf: the vision tower pools with {tower.pooling!r}, but VisionTextDualEncoderModel uses "
                f"the model's pooler_output; only pooling: pooler exports exactly"
            )
        return _portable(tower.model.config), tower.model.state_dict()
    if kind == "text" and isinstance(tower, HFTextTower):
        return _portable(tower.model.config), tower.model.state_dict()  # a pooling other than `pooler`: see the README
    raise ConfigError(
        f"export hf: the {kind} tower is a {type(tower).__name__}; the Hugging Face export supports "
        f"{SUPPORTED_TOWERS[kind]} towers"
    )


def export_hf(module: Any, out: Path) -> str:
    """Write ``module`` as a Hugging Face model directory; returns the model class written."""
    from transformers import CLIPConfig, CLIPModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    check_no_caption_head(module, "hf", "transformers has no CoCa model class")
    scale, bias = logit_scale_and_bias(module.loss)
    if bias is not None:
        raise ConfigError(
            f"export hf: the loss is {type(module.loss).__name__} with a logit bias (siglip), which CLIPModel and "
            f"VisionTextDualEncoderModel do not have; supported: clip, align (or --format open_clip, which keeps it)"
        )
    vision_weight, _ = projection(module.vision_head, module.vision.output_dim, "vision_head")
    text_weight, _ = projection(module.text_head, module.text.output_dim, "text_head")
    embed_dim = vision_weight.shape[0]
    vision_config, vision_state = _half(module.vision, "vision", module.tokenizer)
    text_config, text_state = _half(module.text, "text", module.tokenizer)

    if isinstance(module.vision, ClipVisionTower) and isinstance(module.text, ClipTextTower):
        config = CLIPConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                            projection_dim=embed_dim, logit_scale_init_value=scale)
        model = CLIPModel(config)
    else:
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision_config, text_config, projection_dim=embed_dim, logit_scale_init_value=scale)
        model = VisionTextDualEncoderModel(config)
    text_pooling = _text_pooling_recipe(module.text)
    if text_pooling is not None:
        config.text_pooling = module.text.pooling  # for readers of config.json; the README has the recipe
    if isinstance(module.vision, TimmVisionTower):
        # Where AutoImageProcessor looks for a timm processor: `pretrained_cfg` in config.json (the
        # TimmWrapperImageProcessor reads config.json, never preprocessor_config.json).
        config.image_processor_type = "TimmWrapperImageProcessor"
        config.pretrained_cfg = timm_data_config(module.image_config)
    # Both classes keep their halves as `vision_model` and `text_model`.
    state = {
        **{"vision_model." + key: value for key, value in vision_state.items()},
        **{"text_model." + key: value for key, value in text_state.items()},
        "visual_projection.weight": vision_weight,
        "text_projection.weight": text_weight,
        "logit_scale": torch.tensor(scale),
    }
    # Buffers a HF model rebuilds itself (position_ids) are not in our towers' state dicts.
    keys = [key for key in model.state_dict() if not key.endswith("position_ids")]
    state = {key: value for key, value in state.items() if not key.endswith("position_ids")}
    load_exactly(model, state, "the exported weights", keys=keys)
    model.save_pretrained(str(out))
    if not isinstance(module.vision, TimmVisionTower):
        _image_processor(module.image_config).save_pretrained(str(out))
    if text_pooling is not None:
        (out / "README.md").write_text(_text_pooling_card(module.text.pooling, text_pooling))
    return type(model).__name__


def _text_pooling_recipe(text: Any) -> str | None:
    """The recipe expression for an hf_text tower's pooling, or None when the model pools it itself."""
    if not isinstance(text, HFTextTower) or text.pooling == "pooler":
        return None
    return TEXT_POOLING_RECIPES[text.pooling]


def _text_pooling_card(pooling: str, recipe: str) -> str:
    """README.md of an export whose text embeddings need the recipe (the tower's pooling is not the model's)."""
    return f"""# A vlm-lab model as a VisionTextDualEncoderModel

The text tower was trained with **{pooling} pooling** of its last hidden state, which
`VisionTextDualEncoderModel` cannot express: its `forward` and `get_text_features` project the text
model's `pooler_output` instead, so their text embeddings are NOT this model's. Compute them so:

```python
import torch
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("THIS_FOLDER").eval()
processor = AutoProcessor.from_pretrained("THIS_FOLDER")
batch = processor(text=["a dog on the grass"], return_tensors="pt", padding=True, truncation=True)
with torch.no_grad():
    hidden = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].to(hidden.dtype)
    text_embeds = model.text_projection({recipe})
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
```

Image embeddings are `model.get_image_features(pixel_values=...).pooler_output` (normalise them the
same way); logits are `model.logit_scale.exp() * image_embeds @ text_embeds.T`. Written by `vlm-lab export`.
"""


def _image_processor(image_config: Any) -> Any:
    """A ``CLIPImageProcessor`` that prepares images as ``image_config`` says (resize, center crop)."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    height, width = image_config.size
    resample = getattr(PILImageResampling, image_config.interpolation.upper(), PILImageResampling.BICUBIC)
    return CLIPImageProcessor(
        size={"shortest_edge": round(min(height, width) / image_config.crop_pct)},
        crop_size={"height": height, "width": width},
        resample=resample,
        image_mean=list(image_config.mean),
        image_std=list(image_config.std),
    )
