"""open_clip ``CLIP`` checkpoints: read into the native towers, and export back.

An open_clip directory holds ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg":
{...}}``, as on the Hugging Face hub, or a bare model config such as open_clip's ``ViT-B-32.json``)
and a state dict (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin`` or a training
checkpoint ``*.pt``). ``open_clip.create_model("local-dir:DIR")`` loads what ``export_open_clip``
writes.

open_clip stores attention as PyTorch's fused ``in_proj_weight`` (q, k and v stacked), names blocks
``resblocks.N.ln_1 / attn / ln_2 / mlp.c_fc / mlp.c_proj`` and keeps projections as ``[in, out]``
matrices applied as ``x @ proj``; the mapping below splits, renames and transposes. Only the
configuration the native towers implement is accepted: a config asking for anything else (layer
scale, attentional pooling, a timm or HF tower, ...) is refused with the option named, never loaded
approximately. This module never imports open_clip: it is needed only by the tests.

Export writes more than reading accepts: a ``timm`` tower becomes open_clip's ``TimmModel``
(``timm_model_name``) and an ``hf_text`` tower its ``HFTextEncoder`` (``hf_model_name``, a
``CustomTextCLIP``); what is held, and why: docs/how-to/export.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlm_lab.errors import ConfigError
from vlm_lab.interop.checkpoint import ClipCheckpoint, mlp_ratio, read_json, tokenizer_dir
from vlm_lab.interop.parts import (check_no_caption_head, end_of_text_id, logit_scale_and_bias, projection,
                                   text_arguments, vision_arguments)
from vlm_lab.towers.clip_text import ClipTextTower
from vlm_lab.towers.clip_vit import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipVisionTower
from vlm_lab.towers.hf import HFTextTower
from vlm_lab.towers.timm_tower import TimmVisionTower

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# What open_clip's own directory loader prefers; otherwise the directory's only weights file.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# open_clip's defaults (CLIPVisionCfg / CLIPTextCfg) for the options the native towers implement.
VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0,
                 "pool_type": "argmax", "eos_id": 2, "proj_bias": False}
# Options the native towers do not implement: accepted only at these (open_clip's default) values.
_COMMON_FIXED = {"ls_init_value": None, "act_kwargs": None, "block_type": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                 "scale_fc": False, "final_ln_after_pool": False}
VISION_FIXED = {**_COMMON_FIXED, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                "pool_type": "tok", "timm_model_name": None}
TEXT_FIXED = {**_COMMON_FIXED, "embed_cls": False, "no_causal_mask": False, "proj_type": "linear",
              "hf_model_name": None}
# Options that do not change the function a checkpoint computes (training-time or tokenizer-side).
VISION_IGNORED = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                  "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
TEXT_IGNORED = {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id", "output_tokens",
                "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "nonscalar_logit_scale", "custom_text"}

# One transformer block: open_clip module -> native module.
_BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Everything outside the blocks: open_clip parameter -> native parameter.
_RENAMES = {
    "visual.conv1.weight": "vision.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision.embeddings.class_embedding",
    "visual.positional_embedding": "vision.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision.post_layernorm.weight",
    "visual.ln_post.bias": "vision.post_layernorm.bias",
    "token_embedding.weight": "text.embeddings.token_embedding.weight",
    "positional_embedding": "text.embeddings.position_embedding.weight",
    "ln_final.weight": "text.final_layer_norm.weight",
    "ln_final.bias": "text.final_layer_norm.bias",
    "text_projection.weight": "text_head.proj.weight",
    "text_projection.bias": "text_head.proj.bias",
}
_TRANSPOSED = {"visual.proj": "vision_head.proj.weight", "text_projection": "text_head.proj.weight"}
_TOWERS = {"visual.transformer.resblocks.": "vision.encoder.layers.", "transformer.resblocks.": "text.encoder.layers."}
# CustomTextCLIP keeps the text tower under `text.`; plain CLIP at the top level.
_CUSTOM_TEXT_KEYS = ("text.token_embedding.", "text.positional_embedding", "text.transformer.", "text.ln_final.",
                     "text.text_projection")


# --------------------------------------------------------------------------------------------------
# Reading


def read_open_clip(directory: Path) -> ClipCheckpoint:
    """The ``ClipCheckpoint`` of an open_clip directory (config + state dict)."""
    raw = read_json(directory / CONFIG_FILE)
    model_cfg = raw.get("model_cfg", raw)
    preprocess = raw.get("preprocess_cfg") or {}
    where = f"{directory / CONFIG_FILE}"
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ConfigError(f"{where}: the model config has no {key!r} (found {sorted(model_cfg)})")
    if model_cfg.get("multimodal_cfg"):
        raise ConfigError(f"{where}: a CoCa model (multimodal_cfg) is not a dual encoder")
    _check_options(model_cfg, MODEL_KEYS, {}, where, "")
    vision = {**VISION_DEFAULTS, **model_cfg["vision_cfg"]}
    text = {**TEXT_DEFAULTS, **model_cfg["text_cfg"]}
    _check_options(vision, set(VISION_DEFAULTS) | set(VISION_FIXED) | VISION_IGNORED | {"norm_kwargs"},
                   VISION_FIXED, where, "vision_cfg.")
    _check_options(text, set(TEXT_DEFAULTS) | set(TEXT_FIXED) | TEXT_IGNORED | {"norm_kwargs"},
                   TEXT_FIXED, where, "text_cfg.")
    if not isinstance(vision["layers"], int):
        raise ConfigError(f"{where}: vision_cfg.layers={vision['layers']} is a ModifiedResNet; clip_vit is a ViT")
    image_size, patch_size = _square(vision["image_size"], where, "image_size"), _square(vision["patch_size"], where,
                                                                                          "patch_size")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if text["pool_type"] not in ("argmax", "eos"):
        raise ConfigError(f"{where}: text_cfg.pool_type={text['pool_type']!r} is not supported; "
                          f"clip_text pools with 'argmax' or 'eos'")
    pooling = {"pooling": "argmax"} if text["pool_type"] == "argmax" else {"pooling": "eos_id",
                                                                         "eos_token_id": int(text["eos_id"])}
    weights = _weight_file(directory)
    return ClipCheckpoint(
        path=directory, format="open_clip",
        vision={
            "image_size": image_size, "patch_size": patch_size, "width": vision["width"],
            "layers": vision["layers"], "heads": vision["width"] // vision["head_width"],
            "mlp_ratio": float(vision["mlp_ratio"]), "quick_gelu": quick_gelu,
            "layer_norm_eps": _eps(vision, where, "vision_cfg"),
            "image_mean": [float(m) for m in preprocess.get("mean", OPENAI_CLIP_MEAN)],
            "image_std": [float(s) for s in preprocess.get("std", OPENAI_CLIP_STD)],
        },
        text={
            "vocab_size": text["vocab_size"], "context_length": text["context_length"], "width": text["width"],
            "layers": text["layers"], "heads": text["heads"], "mlp_ratio": float(text["mlp_ratio"]),
            "quick_gelu": quick_gelu, "layer_norm_eps": _eps(text, where, "text_cfg"), **pooling,
        },
        embed_dim=model_cfg["embed_dim"],
        text_head_bias=bool(text["proj_bias"]),
        loss="siglip" if model_cfg.get("init_logit_bias") is not None else "clip",
        tokenizer_dir=tokenizer_dir(directory),
        weights=[weights],
        to_native=open_clip_to_native,
    )


def _check_options(cfg: dict[str, Any], known: set[str], fixed: dict[str, Any], where: str, prefix: str) -> None:
    for key, value in cfg.items():
        if key not in known:
            raise ConfigError(f"{where}: {prefix}{key} is not an option vlm-lab understands; "
                              f"it cannot load this model exactly")
        if key in fixed and value != fixed[key] and not (fixed[key] is None and value in ({}, "default")):
            raise ConfigError(f"{where}: {prefix}{key}={value!r} is not supported by the native towers "
                              f"(only {fixed[key]!r})")


def _square(value: Any, where: str, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{where}: vision_cfg.{name}={value} is not square; clip_vit needs a square one")
        value = value[0]
    return int(value)


def _eps(cfg: dict[str, Any], where: str, name: str) -> float:
    norm_kwargs = dict(cfg.get("norm_kwargs") or {})
    eps = norm_kwargs.pop("eps", 1e-5)
    if norm_kwargs:
        raise ConfigError(f"{where}: {name}.norm_kwargs {sorted(norm_kwargs)} are not supported (only eps)")
    return float(eps)


def _weight_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    # A training checkpoint (open_clip writes epoch_N.pt), if it is the only candidate.
    candidates = sorted(p.name for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return directory / candidates[0]
    found = f"found {', '.join(candidates)}" if candidates else "found none"
    raise ConfigError(f"{directory}: cannot tell the open_clip weights; expected one of {', '.join(WEIGHT_FILES)} "
                      f"or a single {'/'.join(WEIGHT_SUFFIXES)} file ({found})")


def open_clip_to_native(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip ``CLIP`` parameter names -> ``VisionLanguageModule`` ones; unknown keys pass through
    unchanged (so that loading reports them as unexpected)."""
    native: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(_CUSTOM_TEXT_KEYS):
            key = key[len("text."):]
        if key == "attn_mask":
            continue  # the causal mask, a buffer some versions saved
        if key in _RENAMES:
            native[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            native[_TRANSPOSED[key]] = value.T.contiguous()
        elif key in ("logit_scale", "logit_bias"):
            native[f"loss.{key}"] = value.reshape(())  # nonscalar_logit_scale stores shape [1]
        else:
            native.update(_block_to_native(key, value))
    return native


def _split_block_key(key: str, towers: dict[str, str]) -> tuple[str, str, str] | None:
    """``(block prefix on the other side, module, parameter)`` for a transformer-block key, else None."""
    for prefix, other_prefix in towers.items():
        match = re.fullmatch(re.escape(prefix) + r"(\d+)\.(.+)\.(\w+)", key)
        if match is not None:
            layer, module, parameter = match.groups()
            return f"{other_prefix}{layer}.", module, parameter
    return None


def _block_to_native(key: str, value: Tensor) -> dict[str, Tensor]:
    parts = _split_block_key(key, _TOWERS)
    if parts is None:
        return {key: value}
    base, module, parameter = parts
    if module == "attn" and parameter in ("in_proj_weight", "in_proj_bias"):
        kind = "weight" if parameter == "in_proj_weight" else "bias"
        q, k, v = value.chunk(3, dim=0)  # nn.MultiheadAttention stacks q, k, v in this order
        return {f"{base}self_attn.{name}_proj.{kind}": part.contiguous() for name, part in zip("qkv", (q, k, v))}
    if module in _BLOCK_RENAMES:
        return {f"{base}{_BLOCK_RENAMES[module]}.{parameter}": value}
    return {key: value}


def native_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``VisionLanguageModule`` parameter names -> open_clip ``CLIP`` ones (the inverse of the above).

    A text head with a bias becomes open_clip's ``nn.Linear`` ``text_projection`` (``proj_bias``);
    without one, the transposed matrix open_clip keeps as a bare parameter.
    """
    renames = {native: open for open, native in _RENAMES.items()}
    transposed = {native: open for open, native in _TRANSPOSED.items()}
    if "text_head.proj.bias" not in state:
        del renames["text_head.proj.weight"]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.T.contiguous()
        elif key in ("loss.logit_scale", "loss.logit_bias"):
            out[key[len("loss."):]] = value
        else:
            out.update(_block_to_open_clip(key, value, state))
    return out


def _block_to_open_clip(key: str, value: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
    parts = _split_block_key(key, {native: open for open, native in _TOWERS.items()})
    if parts is None:
        return {key: value}
    base, module, parameter = parts
    if module in ("self_attn.k_proj", "self_attn.v_proj"):
        return {}  # joined with q below
    if module == "self_attn.q_proj":
        name = "in_proj_weight" if parameter == "weight" else "in_proj_bias"
        stacked = [state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
        return {f"{base}attn.{name}": torch.cat(stacked, dim=0)}
    block_renames = {native: open for open, native in _BLOCK_RENAMES.items()}
    if module in block_renames:
        return {f"{base}{block_renames[module]}.{parameter}": value}
    return {key: value}


# --------------------------------------------------------------------------------------------------
# Export


# What open_clip 3.3 can hold besides its native ViT and text transformer: a timm trunk (TimmModel)
# and an encoder-only Hugging Face text model (HFTextEncoder; its hf_configs.arch_dict names the types).
SUPPORTED_TOWERS = {"vision": "clip_vit, timm", "text": "clip_text, hf_text (bert, roberta, xlm-roberta)"}
HF_TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# vlm-lab hf_text pooling -> HFTextEncoder pooler (cls_pooler is the model's pooler_output).
HF_TEXT_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler", "pooler": "cls_pooler"}
# timm model_args open_clip's TimmModel passes on to timm.create_model, under its own names.
TIMM_MODEL_ARGS = {"drop_path_rate": "timm_drop_path"}
# The folder (inside the export) with the text model's config.json, which HFTextEncoder reads.
HF_TEXT_CONFIG_DIR = "hf_text_config"
COCA_DIFFERS = ("open_clip's CoCa decoder differs (each layer adds a second MLP and a LayerNorm on the image "
                "tokens it cross-attends to, and one 256-query pooler serves both losses)")


def export_open_clip(module: Any, out: Path) -> str:
    """Write ``module`` as an open_clip directory (config + safetensors + tokenizer); returns the class.

    Native towers become open_clip's own ViT / text transformer (class ``CLIP``); a ``timm`` tower its
    ``TimmModel`` (``timm_model_name``) and an ``hf_text`` tower its ``HFTextEncoder``
    (``hf_model_name``, which makes the class ``CustomTextCLIP``).
    """
    from safetensors.torch import save_file

    check_no_caption_head(module, "open_clip", COCA_DIFFERS)
    scale, bias = logit_scale_and_bias(module.loss)
    vision_cfg, vision_state, vision_gelu = _vision_half(module)
    text_cfg, text_state, text_gelu = _text_half(module, out)
    if None not in (vision_gelu, text_gelu) and vision_gelu != text_gelu:
        raise ConfigError("export open_clip: one tower uses QuickGELU and the other GELU; open_clip has one "
                          "quick_gelu switch for both")
    quick_gelu = bool(vision_gelu if vision_gelu is not None else text_gelu)
    model_cfg: dict[str, Any] = {"embed_dim": module.vision_head.out_dim, "quick_gelu": quick_gelu,
                                 "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if bias is not None:
        model_cfg["init_logit_bias"] = bias
    height, width = module.image_config.size
    preprocess_cfg = {"size": height if height == width else [height, width],
                      "mean": list(module.image_config.mean), "std": list(module.image_config.std),
                      "interpolation": module.image_config.interpolation, "resize_mode": "shortest",
                      # open_clip ignores it (its transform resizes the short side to `size`); timm's
                      # create_transform takes it to prepare images exactly as vlm-lab did.
                      "crop_pct": module.image_config.crop_pct}

    state = {**vision_state, **text_state, "logit_scale": torch.tensor(scale)}
    if bias is not None:
        state["logit_bias"] = torch.tensor(bias)
    save_file({key: value.detach().float().contiguous() for key, value in state.items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                              indent=2) + "\n")
    return "CustomTextCLIP" if "hf_model_name" in text_cfg else "CLIP"


def _vision_half(module: Any) -> tuple[dict[str, Any], dict[str, Tensor], bool | None]:
    """``(vision_cfg, open_clip state, quick_gelu or None when the tower has no say)``."""
    vision = module.vision
    if isinstance(vision, ClipVisionTower):
        v = vision_arguments(vision)
        weight, _ = projection(module.vision_head, vision.output_dim, "vision_head")
        native = {**{f"vision.{k}": p for k, p in vision.state_dict().items()}, "vision_head.proj.weight": weight}
        vision_cfg = {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["width"],
                      "layers": v["layers"], "head_width": v["width"] // v["heads"],
                      "mlp_ratio": mlp_ratio(v["mlp_hidden"], v["width"]), **_norm_kwargs(v)}
        return vision_cfg, native_to_open_clip(native), v["quick_gelu"]
    if isinstance(vision, TimmVisionTower):
        return (*_timm_half(vision, module.vision_head), None)
    raise ConfigError(f"export open_clip: the vision tower is a {type(vision).__name__}; the open_clip export "
                      f"supports {SUPPORTED_TOWERS['vision']} towers")


def _timm_half(tower: TimmVisionTower, head: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """open_clip's ``TimmModel``: the trunk ``timm.create_model(name)`` with its classifier reset to none
    (``timm_pool: ""`` keeps the model's own pooling, as the tower does) and the head as ``proj``."""
    unsupported = sorted(set(tower.model_args) - set(TIMM_MODEL_ARGS))
    if unsupported:
        raise ConfigError(f"export open_clip: the timm tower's model_args {unsupported} cannot be written: open_clip's "
                          f"TimmModel passes only {', '.join(TIMM_MODEL_ARGS)} to timm.create_model")
    if tower.output_dim != tower.token_dim:
        raise ConfigError(f"export open_clip: {tower.model_name} pools through a {tower.output_dim}-d pre-logits "
                          f"layer, but open_clip's TimmModel projects the {tower.token_dim}-d trunk features")
    weight, proj_bias = projection(head, tower.output_dim, "vision_head", allow_bias=True)
    height, width = tower.image_config.size
    vision_cfg = {"timm_model_name": tower.model_name, "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "timm_proj_bias": proj_bias is not None,
                  "image_size": height if height == width else [height, width],
                  **{TIMM_MODEL_ARGS[key]: value for key, value in tower.model_args.items()}}
    state = {f"visual.trunk.{k}": p for k, p in tower.model.state_dict().items()}
    state["visual.head.proj.weight"] = weight
    if proj_bias is not None:
        state["visual.head.proj.bias"] = proj_bias
    return vision_cfg, state


def _text_half(module: Any, out: Path) -> tuple[dict[str, Any], dict[str, Tensor], bool | None]:
    """``(text_cfg, open_clip state, quick_gelu or None when the tower has no say)``."""
    text = module.text
    if isinstance(text, ClipTextTower):
        t = text_arguments(text)
        weight, text_bias = projection(module.text_head, text.output_dim, "text_head", allow_bias=True)
        if t["pooling"] == "argmax":
            pooling: dict[str, Any] = {"pool_type": "argmax"}
        else:
            eos = t["eos_token_id"] if t["pooling"] == "eos_id" else end_of_text_id(module.tokenizer)
            pooling = {"pool_type": "eos", "eos_id": eos}
        text_cfg = {"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
                    "heads": t["heads"], "layers": t["layers"], "mlp_ratio": mlp_ratio(t["mlp_hidden"], t["width"]),
                    **pooling, "proj_bias": text_bias is not None, **_norm_kwargs(t),
                    "hf_tokenizer_name": _tokenizer_name(module.tokenizer)}
        native = {f"text.{k}": p for k, p in text.state_dict().items()}
        native["text_head.proj.weight"] = weight
        if text_bias is not None:
            native["text_head.proj.bias"] = text_bias
        return text_cfg, native_to_open_clip(native), t["quick_gelu"]
    if isinstance(text, HFTextTower):
        return (*_hf_text_half(module, out), None)
    raise ConfigError(f"export open_clip: the text tower is a {type(text).__name__}; the open_clip export "
                      f"supports {SUPPORTED_TOWERS['text']} towers")


def _hf_text_half(module: Any, out: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """open_clip's ``HFTextEncoder``: the model rebuilt from the config.json written to
    ``OUT/hf_text_config`` (``hf_model_name``, an absolute path: open_clip resolves it from the current
    directory, not from the export), the pooling as an open_clip pooler, the head as ``proj``."""
    tower, config = module.text, module.text.model.config
    if config.model_type not in HF_TEXT_MODEL_TYPES:
        raise ConfigError(f"export open_clip: the hf_text tower is a {config.model_type!r} model; open_clip's "
                          f"HFTextEncoder holds {', '.join(HF_TEXT_MODEL_TYPES)}")
    if tower.pooling not in HF_TEXT_POOLERS:
        raise ConfigError(f"export open_clip: the hf_text tower pools with {tower.pooling!r}, which open_clip's "
                          f"HFTextEncoder has no pooler for; supported: {', '.join(HF_TEXT_POOLERS)}")
    pad_id = getattr(module.tokenizer, "pad_token_id", None)
    if pad_id is None or pad_id != config.pad_token_id:
        # HFTextEncoder masks every position whose id is config.pad_token_id, not the tokenizer's padding.
        raise ConfigError(f"export open_clip: the tokenizer pads with id {pad_id} but the text model's config has "
                          f"pad_token_id {config.pad_token_id}; open_clip's HFTextEncoder needs them equal")
    weight, _ = projection(module.text_head, tower.output_dim, "text_head")
    config.save_pretrained(str(out / HF_TEXT_CONFIG_DIR))
    text_cfg = {"hf_model_name": str((out / HF_TEXT_CONFIG_DIR).resolve()), "hf_model_pretrained": False,
                "hf_tokenizer_name": _tokenizer_name(module.tokenizer), "hf_proj_type": "linear",
                "hf_pooler_type": HF_TEXT_POOLERS[tower.pooling], "context_length": module.max_length}
    # Without cls_pooler, HFTextEncoder builds the model with add_pooling_layer=False.
    keep_pooler = tower.pooling == "pooler"
    state = {f"text.transformer.{k}": p for k, p in tower.model.state_dict().items()
             if keep_pooler or not k.startswith("pooler.")}
    state["text.proj.weight"] = weight
    return text_cfg, state


def _tokenizer_name(tokenizer: Any) -> str:
    # Non-empty: open_clip.get_tokenizer("local-dir:OUT") then loads the tokenizer saved in OUT.
    return str(getattr(tokenizer, "name_or_path", "") or "tokenizer")


def _norm_kwargs(arguments: dict[str, Any]) -> dict[str, Any]:
    eps = arguments["layer_norm_eps"]
    return {} if eps == 1e-5 else {"norm_kwargs": {"eps": eps}}


# --------------------------------------------------------------------------------------------------
# Tokenizer


def clip_tokenizer_from_bpe(bpe_file: str | Path, max_length: int = 77) -> Any:
    """OpenAI CLIP's byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``, shipped with open_clip and
    OpenAI's ``clip`` package) as a Hugging Face ``CLIPTokenizer``.

    open_clip's ``SimpleTokenizer`` builds its vocabulary from that file the same way (256 bytes, the
    same with ``</w>``, the first 48,894 merges, then the two special tokens), so the ids agree; save
    the result with ``save_pretrained(DIR)`` and point ``model.tokenizer.path`` at ``DIR`` when an
    open_clip directory has no tokenizer files.
    """
    import gzip

    from transformers import CLIPTokenizer

    path = Path(bpe_file)
    if not path.is_file():
        raise ConfigError(f"no BPE vocabulary file at {bpe_file}")
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which CLIP's BPE is defined over."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))
