"""Experiment configuration: YAML files merged left to right, then ``key=value`` overrides.

A config has these top-level sections::

    name:    run name (default: the last config file's stem)
    seed:    global seed
    model:   vision, text (tower specs), vision_head, text_head, loss, embed_dim, tokenizer
    data:    a data module spec: {name: ..., <its arguments>}
    optim:   AdamW and the cosine schedule
    trainer: passed to ``lightning.Trainer``

Every key is checked: an unknown key anywhere is an error that suggests the closest valid one, and
registry specs are checked against their constructors before anything is built.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm_lab import registry
from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.shipped import config_source

T = TypeVar("T")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "seed": 0,
    "model": {
        "vision": {"name": "clip_vit_tiny"},
        "text": {"name": "clip_text_tiny"},
        "vision_head": {"name": "linear"},
        "text_head": {"name": "linear"},
        "loss": {"name": "clip"},
        "embed_dim": 256,
        # path: a local Hugging Face tokenizer folder (None: MiniLM's WordPiece). train_from: a captions
        # file to build a word-level vocabulary from instead (words seen min_count+ times).
        "tokenizer": {"path": None, "max_length": 32, "train_from": None, "min_count": 5},
        # LiT-style locking per tower (vlm_lab/locking.py): nothing is locked by default.
        "vision_lock": {"lock": False, "unlocked_groups": 0, "freeze_bn_stats": True, "freeze_layer_norm": True},
        "text_lock": {"lock": False, "unlocked_groups": 0, "freeze_bn_stats": True, "freeze_layer_norm": True},
        "init_from": None,
        # Distillation from a frozen teacher CLIP (vlm_lab/distillation.py): a vlm-lab checkpoint file or a
        # Hugging Face / open_clip CLIP folder; its loss term is weighted by weight. Off while teacher is null.
        "distill": {"teacher": None, "weight": 1.0},
        # torch.compile the towers (TorchInductor; docs/how-to/compile.md) when a Trainer sets the module up.
        "compile": False,
        "compile_mode": "default",
        # CoCa (vlm_lab/captioning.py): a weight of 0 means that part is not built.
        "contrastive_weight": 1.0,
        "caption_weight": 0.0,
        "caption_head": {"name": "coca_decoder"},
        # Decoding during validation/test and the defaults of generate() and `vlm-lab caption`
        # (vlm_lab/generation.py); max_images caps how many images evaluation captions.
        "generation": {"max_new_tokens": 20, "min_new_tokens": 0, "num_beams": 1, "length_penalty": 1.0,
                       "repetition_penalty": 1.0, "max_images": None, "log_examples": 5},
    },
    "data": {"name": "synthetic_shapes"},
    "optim": {
        "lr": 5.0e-4,
        "weight_decay": 0.1,
        "betas": [0.9, 0.98],
        "eps": 1.0e-6,
        "warmup_steps": 100,
        "min_lr_ratio": 0.0,
        # Multiplies optim.lr for a tower's parameters: tune a pretrained tower gently (e.g. 0.1)
        # while its new projection head learns at the full rate. Heads, poolers, decoder: optim.lr.
        "lr_scale": {"vision": 1.0, "text": 1.0},
        # Layer-wise lr decay within a tower (open_clip's --image/--text-layer-decay), on top of
        # lr_scale: each layer group learns this times as fast as the one above it (1: off).
        "layer_decay": {"vision": 1.0, "text": 1.0},
        "nonfinite_loss": "error",
    },
    # Zero-shot classification on an image folder (vlm_lab/eval/zeroshot.py); off while root is null.
    "zeroshot": {
        "root": None,
        "classnames": None,
        "templates": "openai_imagenet",
        "every_n_epochs": 1,
        "max_per_class": None,
        "batch_size": 64,
        "num_workers": 0,
    },
    # The locked-tower embedding cache (vlm_lab/embedding_cache.py).
    "embedding_cache": {"enabled": True, "storage": "memory", "dir": None, "tokens": False,
                        "batch_size": 64, "num_workers": 0},
    "trainer": {},
}

# Where the registry specs sit in a config, and their kinds.
SPECS = {
    ("model", "vision"): "vision_tower",
    ("model", "text"): "text_tower",
    ("model", "vision_head"): "head",
    ("model", "text_head"): "head",
    ("model", "caption_head"): "head",
    ("model", "loss"): "loss",
    ("data",): "datamodule",
}

# The type each plain (non-spec) setting must have; a float setting accepts integers.
SETTINGS: dict[tuple[str, ...], type | tuple[type, ...]] = {
    ("name",): (str, type(None)),
    ("seed",): int,
    ("model", "embed_dim"): int,
    ("model", "tokenizer", "path"): (str, type(None)),
    ("model", "tokenizer", "max_length"): int,
    ("model", "tokenizer", "train_from"): (str, type(None)),
    ("model", "tokenizer", "min_count"): int,
    ("model", "vision_lock", "lock"): bool,
    ("model", "vision_lock", "unlocked_groups"): int,
    ("model", "vision_lock", "freeze_bn_stats"): bool,
    ("model", "vision_lock", "freeze_layer_norm"): bool,
    ("model", "text_lock", "lock"): bool,
    ("model", "text_lock", "unlocked_groups"): int,
    ("model", "text_lock", "freeze_bn_stats"): bool,
    ("model", "text_lock", "freeze_layer_norm"): bool,
    ("model", "init_from"): (str, type(None)),
    ("model", "distill", "teacher"): (str, type(None)),
    ("model", "distill", "weight"): float,
    ("model", "compile"): bool,
    ("model", "compile_mode"): str,
    ("model", "contrastive_weight"): float,
    ("model", "caption_weight"): float,
    ("model", "generation", "max_new_tokens"): int,
    ("model", "generation", "min_new_tokens"): int,
    ("model", "generation", "num_beams"): int,
    ("model", "generation", "length_penalty"): float,
    ("model", "generation", "repetition_penalty"): float,
    ("model", "generation", "max_images"): (int, type(None)),
    ("model", "generation", "log_examples"): int,
    ("zeroshot", "root"): (str, type(None)),
    ("zeroshot", "classnames"): (str, type(None)),
    ("zeroshot", "templates"): (str, list),
    ("zeroshot", "every_n_epochs"): int,
    ("zeroshot", "max_per_class"): (int, type(None)),
    ("zeroshot", "batch_size"): int,
    ("zeroshot", "num_workers"): int,
    ("embedding_cache", "enabled"): bool,
    ("embedding_cache", "storage"): str,
    ("embedding_cache", "dir"): (str, type(None)),
    ("embedding_cache", "tokens"): bool,
    ("embedding_cache", "batch_size"): int,
    ("embedding_cache", "num_workers"): int,
    ("optim", "lr"): float,
    ("optim", "weight_decay"): float,
    ("optim", "betas"): list,
    ("optim", "eps"): float,
    ("optim", "warmup_steps"): int,
    ("optim", "min_lr_ratio"): float,
    ("optim", "lr_scale", "vision"): float,
    ("optim", "lr_scale", "text"): float,
    ("optim", "layer_decay", "vision"): float,
    ("optim", "layer_decay", "text"): float,
    ("optim", "nonfinite_loss"): str,
}

# Settings that take one of a few words.
CHOICES: dict[tuple[str, ...], tuple[str, ...]] = {
    # torch.compile's modes (torch._inductor.list_mode_options()).
    ("model", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    ("optim", "nonfinite_loss"): ("error", "skip"),
    ("embedding_cache", "storage"): ("memory", "disk"),
}


def load_config(*files: str | Path, overrides: Iterable[str] = (), allow_import_paths: bool = False) -> DictConfig:
    """Merge the defaults, then ``files`` left to right, then dotlist ``overrides``; validate.

    ``load_config("experiments/quickstart.yaml", overrides=["optim.lr=1e-3"])``; a file may also be
    a packaged experiment's name, ``load_config("quickstart")`` (``vlm_lab.shipped``).

    Spec names resolve only to registered objects. With ``allow_import_paths=True`` a name such as
    ``my_project.towers:MyTower`` is imported and registered under that string first.
    """
    layers = [_read_yaml(file) for file in files]
    overrides = list(overrides)
    if overrides:
        layers.append(_parse_overrides(overrides))
    base = _plain(DEFAULTS)
    init_from = _get(_merge_layers(base, layers), ("model", "init_from"))
    if isinstance(init_from, str) and init_from:
        # A pretrained CLIP's architecture replaces the default model; the files still apply on top.
        from vlm_lab.interop import init_model_section

        base = merge(base, {"model": init_model_section(init_from)})
    merged = _merge_layers(base, layers)
    if merged.get("name") is None and files:
        merged["name"] = Path(files[-1]).stem
    if allow_import_paths:
        for path, kind in SPECS.items():
            name = (_get(merged, path) or {}).get("name")
            if isinstance(name, str) and ":" in name:
                registry.register_import_path(kind, name)
    validate(merged)
    return OmegaConf.create(merged)


def merge(base: Mapping[str, Any], update: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deep-merge ``update`` into ``base``.

    One rule beyond a plain deep merge: when a registry spec changes its ``name``, the new spec
    replaces the old one whole, so the arguments of ``clip_vit`` never leak into a ``timm`` tower.
    """
    out = dict(base)
    for key, value in update.items():
        here = path + (str(key),)
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            renamed = here in SPECS and "name" in value and value["name"] != old.get("name")
            out[key] = dict(value) if renamed else merge(old, value, here)
        else:
            out[key] = value
    return out


def _merge_layers(base: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    for layer in layers:
        base = merge(base, layer)
    return base


def validate(config: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` for the first unknown key, wrong type or invalid spec."""
    _check_keys(config, DEFAULTS, ())
    for path, expected in SETTINGS.items():
        value = _get(config, path)
        if not _is_instance(value, expected):
            raise ConfigError(f"{'.'.join(path)}={value!r} should be {_type_names(expected)}")
    for path, choices in CHOICES.items():
        value = _get(config, path)
        if value not in choices:
            raise ConfigError(f"{'.'.join(path)}={value!r} is not one of {', '.join(map(repr, choices))}"
                              f"{did_you_mean(value, choices)}")
    for path, kind in SPECS.items():
        spec = _get(config, path)
        provided = PROVIDED[kind] + PROVIDED_AT.get(path, ())
        registry.spec_arguments(kind, spec, provided={p: None for p in provided})
    _check_trainer(config.get("trainer") or {})


# Arguments the framework supplies to each kind of spec (never set in YAML).
PROVIDED: dict[str, tuple[str, ...]] = {
    "vision_tower": (),
    "text_tower": (),
    "head": ("in_dim", "out_dim"),
    "loss": (),
    "datamodule": ("tokenizer", "image_config", "max_length"),
}
# ... and those it supplies to one spec only.
PROVIDED_AT: dict[tuple[str, ...], tuple[str, ...]] = {("model", "caption_head"): ("text_dim",)}


def _check_keys(config: Mapping[str, Any], schema: Mapping[str, Any], path: tuple[str, ...]) -> None:
    if not isinstance(config, Mapping):
        raise ConfigError(f"{'.'.join(path) or 'the config'} should be a mapping, got {config!r}")
    for key, value in config.items():
        here = path + (str(key),)
        if here in SPECS or here == ("trainer",):
            continue  # checked against their constructors
        if key not in schema:
            where = ".".join(path) or "the top level"
            raise ConfigError(
                f"unknown config key {'.'.join(here)!r}.{did_you_mean(key, schema)} "
                f"Valid keys in {where}: {', '.join(schema)}"
            )
        if isinstance(schema[key], Mapping):
            _check_keys(value, schema[key], here)


def _check_trainer(trainer: Mapping[str, Any]) -> None:
    import lightning as L

    valid = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        if key not in valid:
            raise ConfigError(
                f"unknown config key 'trainer.{key}' (not a lightning.Trainer argument)."
                f"{did_you_mean(key, valid)}"
            )
    if trainer.get("precision") is not None:
        _check_precision(trainer["precision"])


def _check_precision(value: Any) -> None:
    """``trainer.precision`` must be one Lightning accepts (else Lightning fails late, with a traceback)."""
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    choices = [choice for literal in get_args(_PRECISION_INPUT) for choice in get_args(literal)]
    if isinstance(value, bool) or value not in choices:
        words = list(dict.fromkeys(str(choice) for choice in choices))
        raise ConfigError(f"trainer.precision={value!r} is not a Lightning precision (tested here: 32, bf16-mixed); "
                          f"valid: {', '.join(words)}.{did_you_mean(value, words)}")


def _read_yaml(file: str | Path) -> dict[str, Any]:
    source = config_source(file)  # a file, or a packaged experiment's name ("quickstart")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))  # safe_load: a config never constructs Python objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{file} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file} should hold a mapping of sections, not {type(data).__name__}")
    return data


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} should look like key=value, e.g. optim.lr=1e-3")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None


def _plain(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))  # a deep copy of plain data


def _get(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        config = config.get(key) if isinstance(config, Mapping) else None
    return config


def _is_instance(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _type_names(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    words = {int: "an integer", float: "a number", str: "a string", list: "a list", type(None): "null"}
    return " or ".join(words.get(t, t.__name__) for t in types)


def dataclass_from_section(cls: type[T], section: Mapping[str, Any] | None, where: str) -> T:
    """A settings dataclass (``TowerLock``, ``ZeroShotSettings``...) from its config section.

    An unknown key fails with the closest valid one; a missing section (``None``, as in a checkpoint
    written before the section existed) gives the defaults.
    """
    section = dict(section or {})
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in section:
        if key not in valid:
            raise ConfigError(f"unknown key '{where}.{key}'.{did_you_mean(key, valid)} Valid keys: {', '.join(valid)}")
    return cls(**section)


def to_yaml(config: DictConfig | Mapping[str, Any]) -> str:
    """The resolved config as YAML text (what is saved in the run directory)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return yaml.safe_dump(config, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Reference documentation
#
# TO BE REPLACED: a first implementation for the docs site (docs/hooks.py renders its output as
# docs/reference/config.md). It walks today's DEFAULTS, SETTINGS and CHOICES; the help texts below
# restate the comments beside DEFAULTS. The schema refactor replaces all of this with a version that
# reads type, default and help from the one schema, so that each setting is declared in one place.

_REFERENCE_HELP: dict[str, str] = {
    "name": "run name; default: the last config file's stem",
    "seed": "global seed; each epoch's random state is a function of (seed, epoch, rank)",
    "model.embed_dim": "size of the joint embedding space the projection heads map into",
    "model.tokenizer.path": "a local Hugging Face tokenizer folder; null: MiniLM's WordPiece (shipped)",
    "model.tokenizer.max_length": "captions are cut to this many tokens (and the text tower's own limit)",
    "model.tokenizer.train_from": "a captions file (COCO JSON or one caption a line) to build a word-level vocabulary from",
    "model.tokenizer.min_count": "train_from: keep words seen at least this many times",
    "model.vision_lock.lock": "freeze the vision tower (LiT)",
    "model.vision_lock.unlocked_groups": "with lock: keep the top N layer groups trainable",
    "model.vision_lock.freeze_bn_stats": "BatchNorm layers of frozen groups keep their running statistics",
    "model.vision_lock.freeze_layer_norm": "false: LayerNorms of frozen groups stay trainable",
    "model.text_lock.lock": "freeze the text tower",
    "model.text_lock.unlocked_groups": "with lock: keep the top N layer groups trainable",
    "model.text_lock.freeze_bn_stats": "BatchNorm layers of frozen groups keep their running statistics",
    "model.text_lock.freeze_layer_norm": "false: LayerNorms of frozen groups stay trainable (open_clip's --lock-text default)",
    "model.init_from": "a Hugging Face CLIPModel or open_clip directory: architecture, weights and tokenizer",
    "model.distill.teacher": "a teacher CLIP to distil from: a vlm-lab .ckpt file or a Hugging Face / open_clip "
                             "CLIP folder; null: no distillation",
    "model.distill.weight": "weight of the distillation loss (KL between teacher and student similarities)",
    "model.compile": "torch.compile the towers when a Trainer sets the module up (fit, validate, test)",
    "model.compile_mode": "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune...",
    "model.contrastive_weight": "CoCa: weight of the contrastive loss; 0: no projection heads or contrastive loss",
    "model.caption_weight": "CoCa: weight of the caption loss; 0 (default): no caption head, a dual encoder",
    "model.generation.max_new_tokens": "captions: at most this many new tokens",
    "model.generation.min_new_tokens": "captions: at least this many new tokens",
    "model.generation.num_beams": "1: greedy; more: beam search",
    "model.generation.length_penalty": "beam search: exponent of the length normalisation",
    "model.generation.repetition_penalty": "above 1 discourages repeated tokens",
    "model.generation.max_images": "evaluation captions at most this many images; null: all",
    "model.generation.log_examples": "image/caption pairs logged at each evaluation",
    "zeroshot.root": "an image folder ROOT/<class>/<images>; null: no zero-shot evaluation",
    "zeroshot.classnames": "a file with one class name a line, in sorted folder order; null: the folder names",
    "zeroshot.templates": "openai_imagenet, cifar, simple, or a list of prompts with {}",
    "zeroshot.every_n_epochs": "during fit, after validation every N epochs; 0: never",
    "zeroshot.max_per_class": "only the first N images of each class",
    "zeroshot.batch_size": "images per batch",
    "zeroshot.num_workers": "loader workers",
    "embedding_cache.enabled": "cache the outputs of a fully locked vision tower",
    "embedding_cache.storage": "memory (per process) or disk (.npy files reused by later runs)",
    "embedding_cache.dir": "disk storage folder; null: $XDG_CACHE_HOME/vlm-lab/embeddings",
    "embedding_cache.tokens": "also store the tower's token outputs",
    "embedding_cache.batch_size": "batch size of the loader that fills the cache",
    "embedding_cache.num_workers": "workers of the loader that fills the cache",
    "optim.lr": "AdamW learning rate (peak of the cosine schedule)",
    "optim.weight_decay": "AdamW weight decay (never on biases, norms or the loss's scale)",
    "optim.betas": "AdamW betas",
    "optim.eps": "AdamW epsilon",
    "optim.warmup_steps": "linear warm-up steps before the cosine decay",
    "optim.min_lr_ratio": "the cosine schedule ends at lr times this",
    "optim.lr_scale.vision": "multiplies optim.lr for the vision tower's parameters",
    "optim.lr_scale.text": "multiplies optim.lr for the text tower's parameters",
    "optim.layer_decay.vision": "layer-wise lr decay in the vision tower: each layer group learns this times "
                                "as fast as the one above (0-1; 1: off)",
    "optim.layer_decay.text": "layer-wise lr decay in the text tower (0-1; 1: off)",
    "optim.nonfinite_loss": "a NaN or Inf loss: error stops the run, skip skips the optimizer step",
}

_REFERENCE_SPEC_HELP: dict[str, str] = {
    "vision_tower": "a vision tower: `name` (a constructor or card) plus its arguments",
    "text_tower": "a text tower: `name` plus its arguments",
    "head": "a head: `name` plus its arguments (`in_dim` and `out_dim` are supplied)",
    "loss": "a loss: `name` plus its arguments",
    "datamodule": "a data module: `name` plus its arguments",
}


def reference_markdown() -> str:
    """Every config key with its type, default and help, as a Markdown page (TO BE REPLACED).

    A first implementation walking ``DEFAULTS``, ``SETTINGS``, ``CHOICES`` and ``SPECS``; the schema
    refactor provides the lasting one. The docs site renders it as ``reference/config.md``.
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def default(value: Any) -> str:
        return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"

    lines = ["# Configuration keys", "",
             "Generated from `vlm_lab.config` when the site is built. Every key is checked when a config "
             "loads: an unknown key, a wrong type or a value outside its choices fails in one line.", ""]
    sections = [key for key in DEFAULTS if isinstance(DEFAULTS[key], Mapping)]
    top = [key for key in DEFAULTS if key not in sections]
    for section in [None, *sections]:
        lines += [f"## `{section}`" if section else "## Top level", ""]
        if section == "trainer":
            lines += ["Any argument of `lightning.Trainer` (checked against its signature), e.g. "
                      "`max_epochs`, `accelerator`, `devices`, `num_nodes`, `strategy`, `precision`.", ""]
            continue
        if section in {path[0] for path in SPECS if len(path) == 1}:
            lines += [f"The `{section}` section is a {SPECS[(section,)]} spec: `name` plus that constructor's "
                      f"arguments (default `{{name: {DEFAULTS[section]['name']}}}`).", ""]
            continue
        lines += ["| key | type | default | help |", "|---|---|---|---|"]
        for path, kind in SPECS.items():
            if path[0] == section:
                spec_default = _get(DEFAULTS, path)
                lines.append(f"| `{'.'.join(path)}` | {kind} spec | {default(spec_default)} | "
                             f"{cell(_REFERENCE_SPEC_HELP[kind])} |")
        for path, expected in SETTINGS.items():
            if (section is None and len(path) == 1 and path[0] in top) or (section and path[0] == section):
                key = ".".join(path)
                kind = "true or false" if expected is bool else _type_names(expected)
                if path in CHOICES:
                    kind = " or ".join(f"`{c}`" for c in CHOICES[path])
                lines.append(f"| `{key}` | {cell(kind)} | {default(_get(DEFAULTS, path))} | "
                             f"{cell(_REFERENCE_HELP.get(key, ''))} |")
        lines.append("")
    return "\n".join(lines)
