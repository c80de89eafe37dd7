"""Experiment configuration: YAML files merged left to right, then ``key=value`` overrides, then checked.

What a config may hold is declared once, in ``vlm_lab/schema.py``: the sections, their keys, types,
defaults and help. This file reads YAML and checks it against that schema, and nothing else::

    defaults (schema) <- file 1 <- file 2 ... <- overrides  ->  interpolations resolved  ->  checked

Interpolations (``width: ${model.embed_dim}``, omegaconf's syntax) may point anywhere in the merged
config; values are checked after they resolve. Every key is checked: an unknown key anywhere is an
error that suggests the closest valid one, and registry specs are checked against their constructors
before anything is built. ``reference_markdown()`` renders the schema as the reference of every key
(``vlm-lab config-reference``; ``docs/reference/config.md``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm_lab import registry
from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.shipped import config_source
from vlm_lab.schema import ExperimentConfig, declarations, defaults, from_section, spec_fields, spec_list_fields
from vlm_lab.typecheck import type_name
from vlm_lab.yaml_text import load_yaml

# Where the registry specs sit in a config, and their kinds (from the schema).
SPECS: dict[tuple[str, ...], str] = {path: field.metadata["spec"] for path, field in spec_fields().items()}
# ... and the lists of specs (loggers, callbacks).
SPEC_LISTS: dict[tuple[str, ...], str] = {path: field.metadata["spec_list"] for path, field in spec_list_fields().items()}


def load_config(*files: str | Path, overrides: Iterable[str] = (), allow_import_paths: bool = False,
                pretrained_model_section: Callable[[str], Mapping[str, Any]] | None = None) -> DictConfig:
    """Merge the defaults, then ``files`` left to right, then dotlist ``overrides``; resolve; validate.

    ``load_config("experiments/quickstart.yaml", overrides=["optim.lr=1e-3"])``; a file may also be
    a packaged experiment's name, ``load_config("quickstart")`` (``vlm_lab.shipped``).

    Spec names resolve only to registered objects. With ``allow_import_paths=True`` a name such as
    ``my_project.towers:MyTower`` is imported and registered under that string first.

    ``model.init_from`` names a pretrained checkpoint whose architecture replaces the default model
    (the files still apply on top). Reading a checkpoint is interop's (a layer above this one), so
    the caller passes the reader as ``pretrained_model_section``: ``vlm_lab.load_config`` does.
    """
    layers = [_read_yaml(file) for file in files]
    overrides = list(overrides)
    if overrides:
        layers.append(_parse_overrides(overrides))
    base = defaults()
    init_from = _get(_resolve(_merge_layers(base, layers)), ("model", "init_from"))
    if isinstance(init_from, str) and init_from:
        if pretrained_model_section is None:
            raise ConfigError(f"model.init_from={init_from!r}: load the config with vlm_lab.load_config, which reads "
                              f"the checkpoint's architecture (vlm_lab.config.load_config does not open checkpoints)")
        base = merge(base, {"model": dict(pretrained_model_section(init_from))})
    merged = _resolve(_merge_layers(base, layers))
    if merged.get("name") is None and files:
        merged["name"] = Path(files[-1]).stem
    if allow_import_paths:
        for path, kind in SPECS.items():
            name = (_get(merged, path) or {}).get("name")
            if isinstance(name, str) and ":" in name:
                registry.register_import_path(kind, name)
        for path, kind in SPEC_LISTS.items():
            for spec in _get(merged, path) if isinstance(_get(merged, path), list) else ():
                name = spec.get("name") if isinstance(spec, Mapping) else None
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
    """Raise ``ConfigError`` for the first unknown key, wrong type, invalid choice or invalid spec."""
    from_section(ExperimentConfig, config, "", unknown="config key")


def _resolve(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its interpolations (``${model.embed_dim}``) replaced by the values they name."""
    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None)
        message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        missing = re.match(r"Interpolation key '(.+)' not found", message)
        hint = did_you_mean(missing.group(1), _dotted_keys(config)) if missing else ""
        raise ConfigError(f"{where + ': ' if where else ''}cannot resolve the config: {message}.{hint}") from None


def _dotted_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _read_yaml(file: str | Path) -> dict[str, Any]:
    source = config_source(file)  # a file, or a packaged experiment's name ("quickstart")
    try:
        data = load_yaml(source.read_text(encoding="utf-8"))  # safe: a config never constructs Python objects
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
        # Not resolved here: an interpolation may name a key the files set.
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None


def _get(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        config = config.get(key) if isinstance(config, Mapping) else None
    return config


def to_yaml(config: DictConfig | Mapping[str, Any]) -> str:
    """The resolved config as YAML text (what is saved in the run directory)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return yaml.safe_dump(config, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# The reference of every key, rendered from the schema

Row = tuple[str, str, str, str]  # key, type, default, help


def reference_tables() -> list[tuple[str, str, list[Row]]]:
    """``(title, introduction, rows)`` for each section of the schema, then for each registered data
    module (its arguments) and each other kind of part (its names); ``rows`` are ``(key, type,
    default, help)``."""
    tables = _section_tables(ExperimentConfig, "")
    specs = spec_fields()
    for name, constructor in sorted(registry.constructors("datamodule").items()):
        helps = argument_help(constructor)
        rows = [(argument, type_name(hint), "(required)" if default is inspect.Parameter.empty else _inline(default),
                 helps.get(argument, "")) for argument, hint, default in registry.arguments(constructor)
                if argument not in specs[("data",)].metadata["provided"]]
        summary = _first_sentence(inspect.getdoc(constructor) or "")
        tables.append((f"data: {name}", f"`data: {{name: {name}, ...}}`. {summary}", rows))
    for kind in registry.KINDS:
        if kind == "datamodule":
            continue
        rows = []
        cards = registry.cards(kind)
        for name in registry.names(kind):
            card = cards.get(name) if name not in registry.constructors(kind) else None
            origin = f"card of `{card.builds}`: `{_inline(card.args)}`" if card else "code"
            doc = card.description if card else inspect.getdoc(registry.constructors(kind)[name]) or ""
            rows.append((name, origin, "", _first_sentence(doc)))
        supplied = "".join(f" For `{'.'.join(path)}` vlm-lab supplies {', '.join(field.metadata['provided'])}."
                           for path, field in specs.items()
                           if field.metadata["spec"] == kind and field.metadata["provided"])
        tables.append((f"{kind} names", f"Names a `{kind}` spec may take; `vlm-lab describe NAME` shows a "
                                         f"constructor's arguments.{supplied}", rows))
    return tables


def reference_markdown() -> str:
    """Every config key with its type, default and help, as Markdown: one table per section."""
    out = ["# Configuration reference", "",
           "Generated from the schema (`vlm_lab/schema.py`) by `vlm_lab.config.reference_markdown()`; "
           "`vlm-lab config-reference` prints the same. A config is YAML files merged left to right, then "
           "`key=value` overrides; `${...}` interpolations are resolved before the values are checked. "
           "Numbers read the same in a file and an override: `1e-3` is the float 0.001 in both (YAML 1.2's "
           "rule; plain PyYAML would read it as text), and a quoted `'1e-3'` is text.", ""]
    for title, introduction, rows in reference_tables():
        header = ("argument", "type", "default") if title.startswith("data: ") else \
            ("name", "what", "") if title.endswith(" names") else ("key", "type", "default")
        out += [f"## {title}", "", _cell(introduction), ""]
        if header[2]:
            out += [f"| {header[0]} | {header[1]} | {header[2]} | description |", "|---|---|---|---|"]
            out += [f"| `{key}` | {_cell(kind)} | {_code(default)} | {_cell(text)} |"
                    for key, kind, default, text in rows]
        else:
            out += [f"| {header[0]} | {header[1]} | description |", "|---|---|---|"]
            out += [f"| `{key}` | {_cell(kind)} | {_cell(text)} |" for key, kind, _, text in rows]
        out.append("")
    return "\n".join(out)


def reference_text(section: str | None = None) -> str:
    """The reference as plain text for a terminal; ``section`` (``optim``, ``model.generation``,
    ``data``...) keeps the tables whose title starts with it."""
    tables = reference_tables()
    if section:
        tables = [t for t in tables if t[0] == section or t[0].startswith((f"{section}.", f"{section}:"))]
        if not tables:
            titles = [t[0].split(":")[0] for t in reference_tables()]
            raise ConfigError(f"config-reference: no section {section!r}.{did_you_mean(section, titles)} "
                              f"Sections: {', '.join(dict.fromkeys(titles))}")
    blocks = []
    for title, _, rows in tables:
        widths = [max([len(row[i]) for row in rows] + [0]) for i in range(3)]
        lines = [title]
        for row in rows:
            lines.append("  " + "  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + _plain(row[3]))
        blocks.append("\n".join(line.rstrip() for line in lines))
    return "\n\n".join(blocks)


def _section_tables(cls: type, where: str) -> list[tuple[str, str, list[Row]]]:
    rows: list[Row] = []
    nested: list[tuple[str, str, list[Row]]] = []
    default = cls()
    for declaration, hint in declarations(cls):
        key, help_ = declaration.name, declaration.metadata.get("help", "")
        path = f"{where}.{key}" if where else key
        if "spec" in declaration.metadata:
            kind = declaration.metadata["spec"]
            rows.append((key, f"{kind} spec", _inline(getattr(default, key)),
                         f"{help_}: `{{name: ..., <arguments>}}` (see {kind} names)"))
        elif "spec_list" in declaration.metadata:
            kind = declaration.metadata["spec_list"]
            rows.append((key, f"list of {kind} specs", _inline(getattr(default, key)),
                         f"{help_}: `[{{name: ..., <arguments>}}, ...]` (see {kind} names)"))
        elif dataclasses.is_dataclass(hint):
            rows.append((key, "section", "", f"{help_} (see `{path}`)"))
            nested += _section_tables(hint, path)
        else:
            rows.append((key, type_name(hint), _inline(getattr(default, key)), help_))
    introduction = _first_sentence(inspect.getdoc(cls) or "")
    return [(where or "top level", introduction, rows), *nested]


def argument_help(constructor: Any) -> dict[str, str]:
    """Each argument's help from the ``Args:`` section of a constructor's docstring (Google style;
    ``a, b: text`` documents both)."""
    helps: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in (inspect.getdoc(constructor) or "").splitlines():
        if re.match(r"^Args\b.*:$", line):
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^ {2,4}([\w, ]+):\s*(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for name in names:
                helps[name] = entry.group(2).strip()
        elif line.strip() and names:
            for name in names:
                helps[name] += " " + line.strip()
    return {name: text.rstrip(".") for name, text in helps.items()}


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph ("e.g. x" does not end one)."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[.!?:])\s+(?=[A-Z`(])", paragraph)[0] if paragraph else ""


def _inline(value: Any) -> str:
    """A value as YAML writes it inline: ``null``, ``0.0005``, ``[0.9, 0.98]``, ``{name: linear}``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def _cell(text: str) -> str:
    """Text safe in Markdown, in a table cell too: docstrings' reST ````code```` becomes Markdown's,
    ``|`` is escaped, and ``<``/``>`` outside code would read as HTML."""
    parts = text.replace("``", "`").replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(part if index % 2 else part.replace("<", "&lt;").replace(">", "&gt;")
                    for index, part in enumerate(parts))


def _code(value: str) -> str:
    """A default as inline code; nothing for a section (no default of its own) or a required argument."""
    return f"`{_cell(value)}`" if value and value != "(required)" else value


def _plain(text: str) -> str:
    return text.replace("``", "").replace("`", "")
