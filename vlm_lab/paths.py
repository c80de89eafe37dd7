"""Where vlm-lab keeps what it computes once and reuses (embedding caches, built tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/vlm-lab``, or ``~/.cache/vlm-lab`` when that variable is unset or empty."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm-lab"
