"""The files that ship inside the package: the catalog of cards and the example experiments.

Each has one source, a top-level folder of the clone that a reader browses (``registry/``,
``experiments/``). setup.cfg installs those folders as the packages ``vlm_lab.catalog`` and
``vlm_lab.experiments`` (``package_dir`` + ``package_data``), so a wheel carries them inside
``vlm_lab/`` and they are found through ``importlib.resources`` wherever pip put them.
docs/how-to/catalog.md and docs/how-to/install.md say where each lives.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

from vlm_lab.errors import ConfigError

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; annotations only
    from importlib.resources.abc import Traversable

# The clone this vlm_lab/ sits in, if it sits in one (in a wheel install this is site-packages).
_CLONE = Path(__file__).resolve().parent.parent


def _folder(package: str, source: str) -> Traversable:
    """The folder of a data package: the clone's own source folder when this code runs from a clone,
    else the installed package.

    From a clone (``PYTHONPATH=clone`` or ``pip install -e``) both name the same folder, except when
    the environment holds an editable install of *another* clone: then the package would map to that
    clone's cards while the code comes from this one. Reading the folder beside the code keeps code
    and cards from one tree. ``setup.cfg`` next to ``vlm_lab/`` is what marks a clone: site-packages
    has none.
    """
    if (_CLONE / "setup.cfg").is_file() and (_CLONE / source / "__init__.py").is_file():
        return _CLONE / source
    return importlib.resources.files(package)


def catalog_folder() -> Traversable:
    """The built-in catalog: ``<kind>/<name>.yaml`` cards (``registry/`` of the clone)."""
    return _folder("vlm_lab.catalog", "registry")


def experiments_folder() -> Traversable:
    """The packaged example experiments: the top-level ``*.yaml`` of the clone's ``experiments/``."""
    return _folder("vlm_lab.experiments", "experiments")


def experiments() -> dict[str, Traversable]:
    """The packaged experiments by name (``quickstart`` for ``quickstart.yaml``), sorted."""
    files = [f for f in experiments_folder().iterdir() if f.is_file() and f.name.endswith(".yaml")]
    return {f.name[: -len(".yaml")]: f for f in sorted(files, key=lambda f: f.name)}


def config_source(item: str | Path) -> Path | Traversable:
    """What a config argument names: an existing file, else a packaged experiment's name.

    A file always wins, so a local ``quickstart`` file shadows the packaged one. A name is a bare
    stem (``quickstart``), never a path, so a mistyped path is reported as a missing file. Anything
    else is one line that lists the packaged names.
    """
    path = Path(item)
    if path.is_file():
        return path
    packaged = experiments()
    if str(item) in packaged:
        return packaged[str(item)]
    raise ConfigError(f"config file not found: {item} (not a file, nor a packaged experiment: "
                      f"{', '.join(packaged) or 'none'})")
