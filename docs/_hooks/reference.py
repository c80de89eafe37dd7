"""MkDocs hook: the Reference pages, generated from the code each time the site is built.

Nothing under ``reference/`` is written by hand or committed: the pages below are made here from

- ``vlm_lab.config.reference_markdown()``: every config key with type, default and help;
- the argparse parser of ``vlm_lab/cli.py``: every command and flag;
- ``vlm_lab.registry``: every registered constructor (signature, documentation) and every card;
- one mkdocstrings page per public module: the Python API from its docstrings.

A file committed at one of these paths is replaced by the generated page (and named in the log), so a
hand-edited copy can never shadow what the code says.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import typing
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("mkdocs.hooks.reference")

# The modules the Python API reference documents, one page each (module path, page title).
API_MODULES = [
    ("vlm_lab", "vlm_lab (top level)"),
    ("vlm_lab.api", "vlm_lab.api"),
    ("vlm_lab.config", "vlm_lab.config"),
    ("vlm_lab.schema", "vlm_lab.schema"),
    ("vlm_lab.layers", "vlm_lab.layers"),
    ("vlm_lab.contracts", "vlm_lab.contracts"),
    ("vlm_lab.checkpoint_format", "vlm_lab.checkpoint_format"),
    ("vlm_lab.registry", "vlm_lab.registry"),
    ("vlm_lab.module", "vlm_lab.module"),
    ("vlm_lab.towers.base", "vlm_lab.towers.base"),
    ("vlm_lab.heads", "vlm_lab.heads"),
    ("vlm_lab.losses", "vlm_lab.losses"),
    ("vlm_lab.gradient_cache", "vlm_lab.gradient_cache"),
    ("vlm_lab.heads.coca", "vlm_lab.heads.coca"),
    ("vlm_lab.generation", "vlm_lab.generation"),
    ("vlm_lab.locking", "vlm_lab.locking"),
    ("vlm_lab.embedding_cache", "vlm_lab.embedding_cache"),
    ("vlm_lab.tokenizer", "vlm_lab.tokenizer"),
    ("vlm_lab.distributed", "vlm_lab.distributed"),
    ("vlm_lab.seeding", "vlm_lab.seeding"),
    ("vlm_lab.sweep", "vlm_lab.sweep"),
    ("vlm_lab.search", "vlm_lab.search"),
    ("vlm_lab.tracking", "vlm_lab.tracking"),
    ("vlm_lab.callbacks", "vlm_lab.callbacks"),
    ("vlm_lab.interop", "vlm_lab.interop"),
    ("vlm_lab.data.base", "vlm_lab.data.base"),
    ("vlm_lab.data.health", "vlm_lab.data.health"),
    ("vlm_lab.eval.retrieval", "vlm_lab.eval.retrieval"),
    ("vlm_lab.eval.suite", "vlm_lab.eval.suite"),
    ("vlm_lab.eval.zeroshot", "vlm_lab.eval.zeroshot"),
    ("vlm_lab.eval.image_folder", "vlm_lab.eval.image_folder"),
    ("vlm_lab.eval.image_text_retrieval", "vlm_lab.eval.image_text_retrieval"),
    ("vlm_lab.eval.probes", "vlm_lab.eval.probes"),
    ("vlm_lab.eval.caption_metrics", "vlm_lab.eval.caption_metrics"),
]


def api_page_path(module: str) -> str:
    return f"reference/api/{module}.md"


def on_config(config):
    # The site documents the checkout it is built from, not whichever vlm_lab is installed.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    # mkdocs.yml names the API index once; its module pages follow from API_MODULES.
    config["nav"] = [_expand_api(entry) for entry in config["nav"] or []]
    return config


def _expand_api(entry):
    if isinstance(entry, dict):
        return {title: _expand_api(value) for title, value in entry.items()}
    if isinstance(entry, list):
        return [_expand_api(item) for item in entry]
    if entry == "reference/api/index.md":
        return [{"Overview": entry}, *({title: api_page_path(module)} for module, title in API_MODULES)]
    return entry


def on_files(files: Files, config) -> Files:
    import vlm_lab.config

    pages = {
        "reference/config.md": vlm_lab.config.reference_markdown(),
        "reference/cli.md": cli_markdown(),
        "reference/catalog.md": catalog_markdown(),
        "reference/api/index.md": api_index_markdown(),
    }
    for module, title in API_MODULES:
        pages[api_page_path(module)] = f"# {title}\n\n::: {module}\n"
    for path, content in pages.items():
        existing = files.get_file_from_path(path)
        if existing is not None:
            log.info("reference: %s is generated; the committed file there is ignored", path)
            files.remove(existing)
        files.append(File.generated(config, path, content=content))
    return files


# --------------------------------------------------------------------------------------------------
# The command line


def cli_markdown() -> str:
    from vlm_lab.cli import _parser  # the parser vlm-lab itself runs

    parser = _parser()
    lines = ["# Command line", "", "Generated from the argparse parser of `vlm_lab/cli.py` when the site is built.",
             "", "```text", parser.format_usage().strip(), "```", ""]
    lines += _arguments_table(parser)
    for path, sub in _subcommands(parser, ["vlm-lab"]):
        lines += [f"## `{' '.join(path)}`", ""]
        if sub.description:
            lines += [sub.description[0].upper() + sub.description[1:] + ".", ""]
        lines += ["```text", sub.format_usage().strip().removeprefix("usage: "), "```", ""]
        lines += _arguments_table(sub)
    lines += ["User errors (a bad config, a missing file) print one line, `vlm-lab: error: ...`, and exit with "
              "status 2; any other failure prints one line and exits with status 1; `--debug` shows the traceback.",
              ""]
    return "\n".join(lines)


def _subcommands(parser: argparse.ArgumentParser, path: list[str]):
    # argparse offers no public way to list subcommands; its _SubParsersAction is the documented
    # return type of add_subparsers() and holds them in `choices`.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name]
                yield [*path, name], sub
                yield from _subcommands(sub, [*path, name])


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) or (action.metavar or action.dest)
        if action.option_strings and action.nargs != 0:
            name += " " + (action.metavar or action.dest.upper())
        details = []
        if action.choices:
            details.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
            details.append(f"default `{action.default}`")
        if action.required and action.option_strings:
            details.append("required")
        if action.nargs in ("+", "*"):
            details.append("repeatable")
        help_text = (action.help or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {help_text} | {'; '.join(details)} |")
    if not rows:
        return []
    return ["| argument | what | |", "|---|---|---|", *rows, ""]


# --------------------------------------------------------------------------------------------------
# The registry's catalog


def catalog_markdown() -> str:
    from vlm_lab import registry

    lines = ["# Card catalog", "",
             "Generated from `vlm_lab.registry` when the site is built: every name a config's `name:` accepts, "
             "by kind. *Constructors* are registered in code; *cards* are YAML presets in `registry/<kind>/` that "
             "fix some of a constructor's arguments. `vlm-lab list` and `vlm-lab describe NAME` print the same.", ""]
    for kind in registry.KINDS:
        lines += [f"## {kind}", ""]
        constructors = registry.constructors(kind)
        cards = registry.cards(kind)
        if constructors:
            lines += ["### Constructors", ""]
            for name in sorted(constructors):
                lines += _constructor_entry(name, constructors[name])
        if cards:
            lines += ["### Cards", "", "| card | builds | arguments | description |", "|---|---|---|---|"]
            for name, card in sorted(cards.items()):
                args = ", ".join(f"{k}: {v}" for k, v in card.args.items())
                description = " ".join(card.description.split()).replace("|", "\\|")
                lines.append(f"| `{name}` | `{card.builds}` | {('`' + args + '`') if args else ''} | {description} |")
            lines.append("")
    return "\n".join(lines)


def _constructor_entry(name: str, constructor) -> list[str]:
    from vlm_lab import registry

    lines = [f"#### `{name}`", ""]
    doc = inspect.getdoc(constructor) or ""
    if doc:
        lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
    where = getattr(constructor, "__module__", "?") + "." + getattr(constructor, "__qualname__", name)
    lines += [f"`{where}`", ""]
    params = registry._parameters(constructor)
    try:
        hints = typing.get_type_hints(constructor.__init__ if inspect.isclass(constructor) else constructor)
    except Exception:  # unresolvable annotations: show the signature without types
        hints = {}
    rows = []
    for pname, param in params.items():
        hint = hints.get(pname, param.annotation)
        kind = "" if hint is inspect.Parameter.empty else _type_text(hint)
        default = "required" if param.default is inspect.Parameter.empty else f"`{param.default!r}`"
        rows.append(f"| `{pname}` | {kind.replace('|', '&#124;')} | {default.replace('|', '&#124;')} |")
    if rows:
        lines += ["| argument | type | default |", "|---|---|---|", *rows, ""]
    return lines


def _type_text(hint) -> str:
    text = hint if isinstance(hint, str) else getattr(hint, "__name__", None) or str(hint)
    if typing.get_args(hint):
        text = str(hint)
    return f"`{text.replace('typing.', '').replace('NoneType', 'None')}`"


def api_index_markdown() -> str:
    lines = ["# Python API", "",
             "Generated from the docstrings (mkdocstrings) when the site is built. The top-level package holds "
             "what a notebook needs: `load_config`, `build_module`, `build_datamodule`, `build_trainer`, `fit`, "
             "`validate`, `test`, the `register_*` decorators, `build`, `list_*` and `describe`.", ""]
    for module, title in API_MODULES:
        lines.append(f"- [{title}]({module}.md)")
    return "\n".join(lines) + "\n"
