"""Does a value read from YAML fit a type hint? One checker, one wording, for every config value.

The config schema's settings (``vlm_lab/schema.py``) and the arguments of registered constructors
(towers, heads, losses, data modules: ``vlm_lab/registry.py``) are both checked here, so the same
mistake reads the same wherever it is made::

    optim.lr='fast' should be a number
    vision_tower 'clip_vit': argument layers='four' should be an integer
    optim.nonfinite_loss='skp' is not one of 'error', 'skip'. Did you mean 'skip'?

Nothing is converted: an integer is accepted where a number is expected (YAML writes ``1`` for
``1.0``), and that is the only leniency. Types YAML cannot express (tensors, callables) are left
to the code that receives them.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Any, Mapping

from vlm_lab.errors import did_you_mean

_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
_SEQUENCES = (list, tuple, typing.Sequence, collections.abc.Sequence)
_MAPPINGS = (dict, typing.Mapping, collections.abc.Mapping)


def type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit ``hint`` (``"should be an integer"``...), or None when it fits."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return None
        close = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        return f"is not one of {', '.join(map(repr, choices))}{close}"
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        problems = [type_problem(value, option) for option in options]
        if all(problems):
            literal = [p for p in problems if p and p.startswith("is not one of")]
            return literal[0] if literal else f"should be {type_name(hint)}"
        return None
    if hint is type(None):
        return None if value is None else "should be null"
    if hint is bool:
        return None if isinstance(value, bool) else "should be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "should be an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "should be a number"
    if hint is str:
        return None if isinstance(value, str) else "should be a string"
    if origin in _SEQUENCES or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "should be a list"
        item = _item_hint(hint)
        if item is not None and any(type_problem(element, item) for element in value):
            return f"should be a list of {_plural(item)}"
        return None
    if origin in _MAPPINGS or hint is dict:
        return None if isinstance(value, Mapping) else "should be a mapping"
    return None  # anything richer (tensors, callables) is the receiving code's to check


def type_name(hint: Any) -> str:
    """The words for a type hint: ``"an integer"``, ``"a string or null"``, ``"one of 'a', 'b'"``."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return "anything"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(hint))
    if hint in _WORDS:
        return _WORDS[hint]
    if origin in _SEQUENCES or hint in (list, tuple):
        item = _item_hint(hint)
        return f"a list of {_plural(item)}" if item is not None else "a list"
    if origin in _MAPPINGS or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _item_hint(hint: Any) -> Any:
    """The element type of ``list[X]``, ``Sequence[X]`` or ``tuple[X, ...]`` (None: unknown or mixed)."""
    args = typing.get_args(hint)
    if len(args) == 1:
        return args[0]
    if len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _plural(hint: Any) -> str:
    words = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return words.get(hint, type_name(hint))
