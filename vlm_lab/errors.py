"""User-facing errors.

Anything raised as a ``ConfigError`` is the user's to fix (a misspelt name, a bad value, a missing
file). The CLI prints it as one line without a traceback; everything else is a bug and keeps its
traceback under ``--debug``.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A problem with the user's configuration or inputs, explained in one line."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choices, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(str(word), sorted(set(choices)), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
