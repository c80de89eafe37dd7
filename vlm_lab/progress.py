"""Progress bars for the long steps outside Lightning's training loop, all through one helper.

Filling the embedding cache, ``vlm-lab data convert``, zero-shot evaluation and sweeps use
:func:`progress`; Lightning draws its own bar for the fit, validate and test loops. The bar is a
``tqdm`` bar on standard error, shown only where someone watches it:

* on the process of global rank 0 (the other ranks of a multi-process run stay quiet), and
* when standard error is a terminal or a Jupyter notebook's output: a log file or a pipe (sweep
  runs, SLURM's ``.out`` files, captured test output) never fills with carriage-return redraws.

The environment variable ``VLM_LAB_PROGRESS`` overrides the terminal test: ``always`` shows the
bars in log files too (for instance to watch a SLURM job's cache fill with ``tail -f``), ``never``
hides them on a terminal. The rank rule holds either way.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm  # the text bar: notebooks show it too, with no ipywidgets needed

from vlm_lab.distributed import process_rank
from vlm_lab.errors import ConfigError

T = TypeVar("T")

PROGRESS_ENV = "VLM_LAB_PROGRESS"
MODES = ("auto", "always", "never")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str,
             unit: str = "it") -> tqdm:
    """A progress bar over ``iterable`` (or, without one, updated by hand with ``bar.update(n)``).

    Always a ``tqdm`` object, so callers never branch: when the bar is not shown (see the module
    docstring) it is tqdm's silent pass-through. Use it as a context manager or iterate it; both
    close the bar at the end.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not shown(), file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def shown() -> bool:
    """Whether progress bars appear in this process (rank 0; a terminal, or ``VLM_LAB_PROGRESS``)."""
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{PROGRESS_ENV}={mode!r} is not one of {', '.join(map(repr, MODES))}")
    if process_rank() != 0 or mode == "never":
        return False
    return mode == "always" or sys.stderr.isatty() or _in_notebook()


def _in_notebook() -> bool:
    # Jupyter replaces sys.stderr with ipykernel's stream, which says it is no terminal but shows
    # carriage-return redraws as a terminal does.
    return type(sys.stderr).__module__.startswith("ipykernel")
