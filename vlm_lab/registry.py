"""Names for interchangeable parts: towers, heads, losses, data modules, loggers and callbacks.

One flat dict per kind maps a name to a constructor (a class or a function), in the style of timm's
``_registry.py``. Registration returns the object unchanged, so a decorated class is still a plain
class. Besides code, the top-level ``registry/`` folder holds *cards*: YAML presets that name a
registered constructor and fix some of its arguments (``clip_vit_tiny`` is ``clip_vit`` with small
sizes). Cards and constructors share one namespace per kind, so YAML and Python never need to know
which one a name is::

    model:
      vision: {name: clip_vit_tiny, layers: 2}   # a card, with one argument overridden

Cards come from *catalog folders*, each with one sub-folder per kind: the built-in catalog (the
``registry/`` folder, installed as ``vlm_lab.catalog``: see ``vlm_lab/shipped.py``), then the folders
listed in ``$VLM_LAB_CATALOG`` (``os.pathsep``-separated), then those given to ``add_catalog()``. The
folders are read afresh on every lookup; a name defined twice is an error naming both files.

``build(kind, spec)`` checks every argument against the constructor's signature and type hints before
calling it, so a typo fails at once with the list of valid arguments instead of deep inside a model.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

import yaml

from vlm_lab import shipped
from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.typecheck import type_problem
from vlm_lab.yaml_text import load_yaml

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; annotations only
    from importlib.resources.abc import Traversable

T = TypeVar("T")

KINDS = ("vision_tower", "text_tower", "head", "loss", "datamodule", "logger", "callback", "evaluator")

_constructors: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}

# The environment variable that lists the user's catalog folders, os.pathsep-separated.
CATALOG_ENV = "VLM_LAB_CATALOG"

# The catalog folders added from Python by add_catalog(), in order. Beside the constructor tables above,
# this list is the registry's only state: everything else about cards is read from the folders.
_added_catalogs: list[Path] = []


@dataclass(frozen=True)
class CatalogFolder:
    """A folder of cards, ``<kind>/<name>.yaml``, and how it was named: ``built-in``, ``VLM_LAB_CATALOG``
    or ``add_catalog``."""

    path: Path | Traversable
    origin: str

    @property
    def label(self) -> str:
        """What listings show as a card's origin: ``built-in``, or the user's folder."""
        return "built-in" if self.origin == "built-in" else str(self.path)


@dataclass(frozen=True)
class Card:
    """A named preset: a registered constructor plus fixed arguments, read from a catalog folder."""

    name: str
    kind: str
    builds: str
    args: dict[str, Any]
    description: str
    path: Path | Traversable
    catalog: CatalogFolder


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


def register_logger(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    """A logger for the ``loggers:`` list: a function of ``run_dir`` and ``config_name`` (supplied by
    vlm-lab) and its own arguments, returning a ``lightning.pytorch.loggers.Logger`` (vlm_lab/tracking.py)."""
    return register("logger", name, obj, override=override)


def register_callback(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    """A ``lightning.pytorch.Callback`` (class or factory) for the ``callbacks:`` list (vlm_lab/callbacks.py)."""
    return register("callback", name, obj, override=override)


def register_evaluator(name: str, obj: T | None = None, *, override: bool = False) -> Any:
    """An evaluator for the ``eval.evaluators`` section: a class whose constructor takes its data and
    settings and whose ``evaluate(module)`` returns flat metrics (``vlm_lab/eval/suite.py``)."""
    return register("evaluator", name, obj, override=override)


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
# The constructors


def _table(kind: str) -> dict[str, Callable[..., Any]]:
    if kind not in _constructors:
        raise ConfigError(f"unknown registry kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return _constructors[kind]


def constructors(kind: str) -> dict[str, Callable[..., Any]]:
    """The constructors registered in code for ``kind``, by name (a copy)."""
    return dict(_table(kind))


# --------------------------------------------------------------------------------------------------
# The catalog


def add_catalog(path: str | os.PathLike[str]) -> Path:
    """Add a folder of cards (``<kind>/<name>.yaml``) beside the built-in ones, for this process.

    The Python form of ``$VLM_LAB_CATALOG``, as open_clip's ``add_model_config``. Adding a folder that
    is already listed changes nothing (a re-run notebook cell). Returns the folder, resolved.
    """
    folder = _existing_folder(path, "add_catalog")
    if folder not in _added_catalogs:
        _added_catalogs.append(folder)
    return folder


def catalog_folders() -> list[CatalogFolder]:
    """Every catalog folder, in order: built-in, then ``$VLM_LAB_CATALOG``'s, then ``add_catalog``'s."""
    folders = [CatalogFolder(shipped.catalog_folder(), "built-in")]
    for entry in os.environ.get(CATALOG_ENV, "").split(os.pathsep):
        if entry.strip():
            folders.append(CatalogFolder(_existing_folder(entry.strip(), CATALOG_ENV), CATALOG_ENV))
    folders += [CatalogFolder(path, "add_catalog") for path in _added_catalogs]
    unique: list[CatalogFolder] = []  # a folder named twice (say in both places) is read once
    for folder in folders:
        if all(str(folder.path) != str(seen.path) for seen in unique):
            unique.append(folder)
    return unique


def _existing_folder(path: str | os.PathLike[str], where: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"catalog folder {path} (from {where}) is not a directory")
    return folder


def cards(kind: str) -> dict[str, Card]:
    """Every card of ``kind`` in every catalog folder, by name. Read fresh on every call.

    A name given twice, by two cards or by a card and a constructor registered in code, raises a
    ``ConfigError`` naming both.
    """
    table = _table(kind)
    found: dict[str, Card] = {}
    for folder in catalog_folders():
        for card in _read_catalog(folder):
            if card.kind != kind:
                continue
            if card.name in found:
                raise ConfigError(f"{kind} card {card.name!r} is defined twice: {found[card.name].path} and "
                                  f"{card.path}; rename or remove one")
            if card.name in table:
                raise ConfigError(f"{kind} card {card.name!r} ({card.path}) has the name of the {kind} "
                                  f"registered at {_where(table[card.name])}; rename one of them")
            found[card.name] = card
    return found


def _read_catalog(folder: CatalogFolder) -> list[Card]:
    """The cards of one folder. A YAML file anywhere but ``<kind>/<name>.yaml`` is an error, so that a
    misplaced card is never silently left out."""
    found = []
    for entry in sorted(folder.path.iterdir(), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith((".yaml", ".yml")):
            raise ConfigError(f"{entry}: a card belongs in a sub-folder named after its kind "
                              f"({', '.join(KINDS)}), e.g. {folder.path}/vision_tower/{entry.name}")
        if not entry.is_dir():
            continue
        files = sorted((f for f in entry.iterdir() if f.is_file()), key=lambda f: f.name)
        yaml_files = [f for f in files if f.name.endswith((".yaml", ".yml"))]
        if yaml_files and entry.name not in KINDS:
            raise ConfigError(f"{entry}: not a registry kind, so its cards would never be found."
                              f"{did_you_mean(entry.name, KINDS)} Valid kinds: {', '.join(KINDS)}")
        for path in yaml_files:
            if not path.name.endswith(".yaml"):
                raise ConfigError(f"{path}: cards end in .yaml")
            found.append(_read_card(path, entry.name, folder))
    return found


def _read_card(path: Path | Traversable, kind: str, folder: CatalogFolder) -> Card:
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"card {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or "builds" not in data or set(data) - {"builds", "args", "description"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"card {path} must have 'builds' and may have 'args', 'description'; found {found}")
    return Card(
        name=path.name[: -len(".yaml")],
        kind=kind,
        builds=data["builds"],
        args=dict(data.get("args") or {}),
        description=str(data.get("description", "")).strip(),
        path=path,
        catalog=folder,
    )


# --------------------------------------------------------------------------------------------------
# Looking up names


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


def list_loggers(pattern: str = "*") -> list[str]:
    return list_names("logger", pattern)


def list_callbacks(pattern: str = "*") -> list[str]:
    return list_names("callback", pattern)


def list_evaluators(pattern: str = "*") -> list[str]:
    return list_names("evaluator", pattern)


def resolve(kind: str, name: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Return ``(constructor, preset_args)`` for a name: a constructor has no presets, a card has."""
    table = _table(kind)
    # A name registered in code resolves without reading any catalog folder: a checkpoint, which names
    # constructors only, then loads whatever the catalog holds. A card clashing with a constructor is
    # reported by `vlm-lab list` and whenever a card of that kind is looked up.
    if name in table:
        return table[name], {}
    catalog = cards(kind)
    card = catalog.get(name)
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
            where = "the built-in catalog" if card.catalog.origin == "built-in" else \
                f"catalog folder {card.catalog.path} (from {card.catalog.origin})"
            lines.append(f"  from: {where}")
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
