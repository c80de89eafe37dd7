"""Reading YAML the way people write numbers: ``lr: 1e-3`` is the float 0.001.

PyYAML implements YAML 1.1, whose float rule needs a dot in the mantissa, so ``1e-3`` (no dot) is read
as the *string* ``"1e-3"``; YAML 1.2, OmegaConf's ``key=value`` overrides and Python all read it as a
number. Every config file, card and sweep file goes through :func:`load_yaml` so that a value means
the same in a file as on the command line. Only the float rule changes: the loader is PyYAML's safe
loader (it never constructs Python objects), and ``yes``/``no``/``on``/``off`` stay YAML 1.1 booleans
as before.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule (the mantissa's dot optional)."""


# The float rule: PyYAML's own, with the mantissa's dot made optional (``1e-3``, ``2E+5``), and its
# first characters, which PyYAML uses to pick candidate rules before matching.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)

_Loader.yaml_implicit_resolvers = {first: [(tag, rule) for tag, rule in rules if tag != "tag:yaml.org,2002:float"]
                                   for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """The data of a YAML document (``None`` for an empty one); raises ``yaml.YAMLError`` when malformed."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
