"""Names for interchangeable parts: towers, heads, losses and data modules.

One flat dict per kind maps a name to a constructor (a class or a function), in the style of timm's
``_registry.py``. Registration returns the object unchanged, so a decorated class is still a plain
class. Besides code, the top-level ``registry/`` folder holds *cards*: YAML presets that name a
registered constructor and fix some of its arguments (``clip_vit_tiny`` is ``clip_vit`` with small
sizes). Cards and constructors share one namespace per kind, so YAML and Python never need to know
which one a name is::

    model:
      vision: {name: clip_vit_tiny, layers: 2}   # a card, with one argument overridden

``build(kind, spec)`` checks every argument against the constructor's signature and type hints before
calling it, so a typo fails at once with the list of valid arguments instead of deep inside a model.
"""

from __future__ import annotations

import fnmatch
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.typecheck import type_problem

T = TypeVar("T")

KINDS = ("vision_tower", "text_tower", "head", "loss", "datamodule")

# Folder of YAML cards, one sub-folder per kind (``registry/vision_tower/clip_vit_tiny.yaml``).
CARDS_DIR = Path(__file__).resolve().parent.parent / "registry"

_constructors: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}


@dataclass(frozen=True)
class Card:
    """A named preset: a registered constructor plus fixed arguments, read from ``registry/``."""

    name: str
    kind: str
    builds: str
    args: dict[str, Any]
    description: str
    path: Path


# --------------------------------------------------------------------------------------------------
# Registering


def register(kind: str, name: str, obj: T | None = None, *, override: bool = False) -> Any:
    """Register ``obj`` as ``name`` of ``kind``; without ``obj``, return a decorator that does.

    Registering the same definition again (a re-run notebook cell) replaces it quietly. A different
    object under a taken name is an error unless ``override=True``.
    """
    table = _table(kind)

    def add(target: T) -> T:
        existing = table.get(name)
        if existing is not None and not override and not _same_definition(existing, target):
            raise ConfigError(
                f"{kind} name {name!r} is already registered to {_where(existing)}; "
                f"pass override=True to replace it"
            )
        table[name] = target
        return target

    return add if obj is None else add(obj)


def register_vision_tower(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    return register("vision_tower", name, obj, override=override)


def register_text_tower(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    return register("text_tower", name, obj, override=override)


def register_head(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    return register("head", name, obj, override=override)


def register_loss(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    return register("loss", name, obj, override=override)


def register_datamodule(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    return register("datamodule", name, obj, override=override)


def register_import_path(kind: str, path: str) -> Any:
    """Import ``"package.module:Attribute"`` and register it under that very string.

    Names in configs resolve only to registered objects; this is the explicit opt-in for naming code
    by import path (``load_config(..., allow_import_paths=True)``, ``--allow-import-paths``).
    """
    import importlib

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"import path {path!r} should look like 'package.module:Attribute'")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {path!r}: {e}") from None
    return register(kind, path, target, override=True)


def _same_definition(a: Any, b: Any) -> bool:
    # A re-run cell makes a new class object with the same module and qualified name.
    return a is b or (
        getattr(a, "__module__", None) == getattr(b, "__module__", object())
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", object())
    )


# --------------------------------------------------------------------------------------------------
# Looking up


def _table(kind: str) -> dict[str, Callable[..., Any]]:
    if kind not in _constructors:
        raise ConfigError(f"unknown registry kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return _constructors[kind]


def constructors(kind: str) -> dict[str, Callable[..., Any]]:
    """The constructors registered in code for ``kind``, by name (a copy)."""
    return dict(_table(kind))


def cards(kind: str | None = None) -> dict[str, Card]:
    """All cards in ``registry/`` (of one kind, if given), by name. Read fresh on every call."""
    found: dict[str, Card] = {}
    for path in sorted(CARDS_DIR.glob("*/*.yaml")):
        card_kind = path.parent.name
        if card_kind not in KINDS or (kind is not None and card_kind != kind):
            continue
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        unknown = set(data) - {"builds", "args", "description"}
        if unknown or "builds" not in data:
            raise ConfigError(
                f"card {path} must have 'builds' and may have 'args', 'description'; "
                f"found {sorted(data)}"
            )
        found[path.stem] = Card(
            name=path.stem,
            kind=card_kind,
            builds=data["builds"],
            args=dict(data.get("args") or {}),
            description=str(data.get("description", "")).strip(),
            path=path,
        )
    return found


def names(kind: str) -> list[str]:
    """Every name ``build`` accepts for ``kind``: registered constructors and cards."""
    return sorted(set(_table(kind)) | set(cards(kind)))


def list_names(kind: str, pattern: str = "*") -> list[str]:
    """Names of ``kind`` matching a shell-style wildcard (``"clip_*"``)."""
    return [n for n in names(kind) if fnmatch.fnmatchcase(n, pattern)]


def list_vision_towers(pattern: str = "*") -> list[str]:
    return list_names("vision_tower", pattern)


def list_text_towers(pattern: str = "*") -> list[str]:
    return list_names("text_tower", pattern)


def list_heads(pattern: str = "*") -> list[str]:
    return list_names("head", pattern)


def list_losses(pattern: str = "*") -> list[str]:
    return list_names("loss", pattern)


def list_datamodules(pattern: str = "*") -> list[str]:
    return list_names("datamodule", pattern)


def resolve(kind: str, name: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Return ``(constructor, preset_args)`` for a name: a constructor has no presets, a card has."""
    table = _table(kind)
    if name in table:
        return table[name], {}
    card = cards(kind).get(name)
    if card is not None:
        if card.builds not in table:
            raise ConfigError(
                f"card {card.path} builds {card.builds!r}, which is not a registered {kind}"
                f"{did_you_mean(card.builds, table)}"
            )
        return table[card.builds], dict(card.args)
    if ":" in name:
        raise ConfigError(
            f"{kind} {name!r} looks like an import path; names resolve only to registered objects. "
            f"To import it, opt in with --allow-import-paths (CLI) or load_config(..., allow_import_paths=True)"
        )
    others = [k for k in KINDS if k != kind and name in names(k)]
    hint = f" ({name!r} is a {others[0]})" if others else ""
    raise ConfigError(
        f"unknown {kind} {name!r}{hint}.{did_you_mean(name, names(kind))} "
        f"Valid: {', '.join(names(kind)) or '(none registered)'}"
    )


# --------------------------------------------------------------------------------------------------
# Building


def spec_arguments(kind: str, spec: Mapping[str, Any], provided: Mapping[str, Any] | None = None):
    """Check ``spec`` against its constructor and return ``(constructor, arguments)``.

    ``provided`` are arguments the framework supplies (a head's input width, a data module's
    tokenizer); the spec may not set them. Raises ``ConfigError`` naming the bad argument and listing
    the valid ones.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"a {kind} spec needs a 'name', e.g. {{name: ...}}; got {spec!r}")
    name = spec["name"]
    constructor, preset = resolve(kind, name)
    provided = dict(provided or {})
    given = {**preset, **{k: v for k, v in spec.items() if k != "name"}}

    params = _parameters(constructor)
    settable = [p for p in params if p not in provided]
    for key in given:
        if key in provided:
            raise ConfigError(f"{kind} {name!r}: argument {key!r} is set by vlm-lab, not in the config")
        if key not in params:
            raise ConfigError(
                f"{kind} {name!r} has no argument {key!r}.{did_you_mean(key, settable)} "
                f"Valid arguments: {', '.join(settable) or '(none)'}"
            )
    arguments = {**given, **provided}
    missing = [p for p, param in params.items() if param.default is inspect.Parameter.empty and p not in arguments]
    if missing:
        raise ConfigError(
            f"{kind} {name!r} is missing required argument(s) {', '.join(missing)}. "
            f"Valid arguments: {', '.join(settable)}"
        )
    hints = _type_hints(constructor)
    for key, value in given.items():
        problem = type_problem(value, hints.get(key, Any))
        if problem:
            raise ConfigError(f"{kind} {name!r}: argument {key}={value!r} {problem}")
    return constructor, arguments


def build(kind: str, spec: Mapping[str, Any], *, contract: type | None = None, **provided: Any) -> Any:
    """Build the object a spec names: ``build("vision_tower", {"name": "clip_vit", "layers": 2})``.

    ``contract`` (a ``typing.Protocol``, see ``vlm_lab/contracts.py``) lists attributes and methods the
    built object must have; a missing one is a one-line ``ConfigError`` naming it.
    """
    constructor, arguments = spec_arguments(kind, spec, provided)
    built = constructor(**arguments)
    if contract is not None:
        missing = [member for member in protocol_members(contract) if not hasattr(built, member)]
        if missing:
            raise ConfigError(
                f"{kind} {spec['name']!r} ({type(built).__name__}) has no {', '.join(missing)}: a {kind} must "
                f"provide {', '.join(protocol_members(contract))} (vlm_lab/contracts.py, {contract.__name__})"
            )
    return built


def protocol_members(contract: type) -> list[str]:
    """The attributes and methods a ``typing.Protocol`` declares (its own and its bases'), ``forward`` aside:
    every ``torch.nn.Module`` has one."""
    members: dict[str, None] = {}
    for cls in reversed(contract.__mro__):
        if cls is object or cls is typing.Protocol or cls.__module__ == "typing":
            continue
        members.update(dict.fromkeys(getattr(cls, "__annotations__", {})))
        members.update(dict.fromkeys(name for name, value in vars(cls).items()
                                     if callable(value) and not name.startswith("_")))
    return [name for name in members if name != "forward"]


def _parameters(constructor: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    signature = inspect.signature(constructor)
    return {
        n: p
        for n, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
    }


def arguments(constructor: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """``(name, type hint, default)`` of each argument a spec may set or vlm-lab supplies, in
    signature order; the default is ``inspect.Parameter.empty`` for a required argument."""
    hints = _type_hints(constructor)
    return [(name, hints.get(name, Any), parameter.default) for name, parameter in _parameters(constructor).items()]


def _type_hints(constructor: Callable[..., Any]) -> dict[str, Any]:
    target = constructor.__init__ if inspect.isclass(constructor) else constructor
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: skip type checks rather than fail
        return {}


# --------------------------------------------------------------------------------------------------
# Describing


def find(name: str) -> list[str]:
    """The kinds under which ``name`` is registered or has a card."""
    return [kind for kind in KINDS if name in names(kind)]


def describe(name: str, kind: str | None = None) -> str:
    """Print and return the signature, docstring and source of a registered name or card."""
    kinds = [kind] if kind else find(name)
    if not kinds:
        every = [n for k in KINDS for n in names(k)]
        raise ConfigError(f"nothing is registered as {name!r}.{did_you_mean(name, every)}")
    blocks = []
    for k in kinds:
        constructor, preset = resolve(k, name)
        card = cards(k).get(name) if name not in _table(k) else None
        lines = [f"{name}  ({k})"]
        if card is not None:
            lines.append(f"  card: {card.path}")
            lines.append(f"  builds: {card.builds} with {preset}")
            if card.description:
                lines.append(f"  {card.description}")
        lines.append(f"  signature: {getattr(constructor, '__name__', constructor)}{inspect.signature(constructor)}")
        lines.append(f"  source: {_where(constructor)}")
        doc = inspect.getdoc(constructor)
        if doc:
            lines += ["", *("  " + line for line in doc.splitlines())]
        blocks.append("\n".join(lines))
    text = "\n\n".join(blocks)
    print(text)
    return text


def _where(obj: Any) -> str:
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (TypeError, OSError):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
