"""The layers of vlm-lab, bottom first: a module may import its own layer and the layers below, never above.

This table is the one place the layering is written down; ``tests/test_layers.py`` parses every
module of the package (imports inside functions included) and fails on an import that runs up a
layer. ``python -m vlm_lab.layers`` prints the same check. Why this order:

* **foundation**: errors, the registry, where shipped cards and experiments live, and small helpers every layer uses. They know nothing of
  models or configs; the registry finds higher-layer code by *name* (that is what it is for).
* **config**: what a config may say (``schema``) and reading it (``config``). Every part below the
  module reads its settings from here, so it sits under all of them and reaches no checkpoint,
  model or data code: ``model.init_from`` is resolved by ``vlm_lab.api.load_config``.
* **parts**: towers, losses, tokenizers, locking, the contracts the module relies on, and what a
  checkpoint carries to rebuild them (``checkpoint_format``: architecture specs and tokenizer files),
  and the loggers and Lightning callbacks a config names (``tracking``, ``callbacks``).
* **heads**: projection heads, attentional poolers and CoCa's decoder; the decoder is built from the
  towers' attention and MLP layers, so heads sit above towers.
* **data**: data modules, transforms and the embedding cache, fed with a tower's ``ImageConfig``.
* **evaluation**: metrics, zero-shot classification and caption decoding. They take a module as an
  argument (duck-typed) and the module uses them (its ``configure_callbacks`` brings the split
  evaluation, ``vlm_lab.eval.split_evaluation``), so they sit under it.
* **module**: ``VisionLanguageModule``, which assembles the parts.
* **interop**: Hugging Face and open_clip checkpoints in and out; it builds towers and heads, loads
  modules and exports them.
* **api**: the Python entry points (``load_config``, ``build_module``, ``fit``...).
* **commands**: the CLI, sweeps, and the package's own ``__init__`` (which imports everything to
  register the built-ins).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "vlm_lab"


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # a name covers that module and, for a package, everything in it


LAYERS: tuple[Layer, ...] = (
    Layer("foundation", ("vlm_lab.errors", "vlm_lab.paths", "vlm_lab.shipped", "vlm_lab.progress",
                         "vlm_lab.seeding", "vlm_lab.typecheck", "vlm_lab.yaml_text", "vlm_lab.registry", "vlm_lab.distributed",
                         "vlm_lab.eval.templates")),  # prompt lists only, importable from any layer
    Layer("config", ("vlm_lab.schema", "vlm_lab.config")),
    Layer("parts", ("vlm_lab.towers", "vlm_lab.losses", "vlm_lab.tokenizer", "vlm_lab.locking",
                    "vlm_lab.contracts",
                    "vlm_lab.checkpoint_format",  # a checkpoint's rebuild spec: towers and tokenizer files
                    "vlm_lab.tracking", "vlm_lab.callbacks",  # loggers and callbacks by name
                    "vlm_lab.preemption",  # step checkpoints, stopping on a signal, SLURM requeue
                    "vlm_lab.gradient_cache",  # the chunked contrastive step's autograd function
                    "vlm_lab.sharding")),  # FSDP2: sharding the parts, Lightning's strategy for it
    Layer("heads", ("vlm_lab.heads",)),
    Layer("data", ("vlm_lab.data", "vlm_lab.embedding_cache")),
    Layer("evaluation", ("vlm_lab.eval", "vlm_lab.generation")),
    Layer("module", ("vlm_lab.module", "vlm_lab.distillation")),  # the module and its distillation teacher
    Layer("interop", ("vlm_lab.interop",)),
    Layer("api", ("vlm_lab.api",)),
    Layer("commands", ("vlm_lab.cli", "vlm_lab.sweep",
                       "vlm_lab.search",  # a sweep's search spaces and its Optuna study
                       "vlm_lab.data.commands", "vlm_lab.layers", PACKAGE)),
)


def layer_of(module: str) -> int | None:
    """The index in ``LAYERS`` of a dotted module name (the most specific entry wins); None if unlisted.

    The package itself (``vlm_lab``, its ``__init__``) matches its own entry only, not its modules.
    """
    best: tuple[int, int] | None = None
    for index, layer in enumerate(LAYERS):
        for name in layer.modules:
            covers = module == name or (name != PACKAGE and module.startswith(name + "."))
            if covers and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` (the folder holding ``__init__.py``), by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for each import of a package module in ``source``, at any depth
    (inside functions too). ``from a import b`` imports ``a.b`` when that is a module in ``known``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in known else base, node.lineno))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def problems(root: Path) -> list[str]:
    """One line per module missing from ``LAYERS`` and per import that runs up a layer, for the
    package at ``root``."""
    modules = module_names(root)
    found = [f"{path}: {name} is in no layer of vlm_lab/layers.py"
             for name, path in modules.items() if layer_of(name) is None]
    for name, path in modules.items():
        own = layer_of(name)
        if own is None:
            continue
        for target, line in imports_of(path.read_text(), name, path.name == "__init__.py", set(modules)):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                found.append(f"{path}:{line}: {name} ({LAYERS[own].name}) imports {target} "
                             f"({LAYERS[theirs].name}), a higher layer")
    return found


if __name__ == "__main__":
    lines = problems(Path(__file__).resolve().parent)
    print("\n".join(lines) or "every import runs down the layers")
    sys.exit(1 if lines else 0)
