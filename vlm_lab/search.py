"""Search spaces of a sweep: distributions, seeded random trials, and Optuna's Bayesian search.

A sweep file's ``search:`` maps config keys to distributions::

    search:
      optim.lr: {log_uniform: [1.0e-5, 1.0e-3]}       # low, high > 0; sampled uniformly in log space
      optim.weight_decay: {uniform: [0.0, 0.2]}        # low < high
      model.vision.layers: {int_uniform: [1, 4]}       # integers, both ends included
      model.embed_dim: {choice: [64, 128]}             # one of the values
    trials: 20
    seed: 0                                            # the same seed draws the same trials
    sampler: random                                    # random (built in) or tpe (Optuna)

``sampler: random`` draws every trial up front from ``random.Random(seed)`` (so ``--dry-run``
lists them and SLURM runs them like any other run). ``sampler: tpe`` asks Optuna's TPE sampler for
one trial at a time, each informed by the finished ones; it needs the ``optuna`` extra
(``pip install "vlm-lab[optuna]"``) and is driven by ``vlm_lab.sweep``. This module only knows
distributions and Optuna's objects; it runs nothing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from vlm_lab.errors import ConfigError, did_you_mean

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
SAMPLERS = ("random", "tpe")  # tpe: Optuna's Tree-structured Parzen Estimator (Bayesian)
DIRECTIONS = ("maximize", "minimize")
PRUNERS = ("median", "none")  # median: Optuna's MedianPruner on the sweep's metric (the optuna_pruning callback)
OPTUNA_STUDY = "sweep"  # the study's name inside OUT/optuna.db (one study per sweep directory)


@dataclass(frozen=True)
class Parameter:
    """One searched config key: ``kind`` is one of ``DISTRIBUTIONS``; ``values`` are ``[low, high]``
    for the ranges and the candidates for ``choice``."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def sample(self, rng: random.Random) -> Any:
        low, high = self.values[0], self.values[-1]
        if self.kind == "uniform":
            return rng.uniform(low, high)
        if self.kind == "log_uniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.kind == "int_uniform":
            return rng.randint(low, high)
        return self.values[rng.randrange(len(self.values))]


def parse_space(spec: Any, where: str, config: Mapping[str, Any]) -> list[Parameter]:
    """The ``search:`` mapping of a sweep file as parameters, checked: every key is a key of the runs'
    ``config`` (plain, resolved), every distribution one of ``DISTRIBUTIONS`` with valid bounds."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: 'search' should map config keys to distributions, e.g. "
                          f"optim.lr: {{log_uniform: [1.0e-5, 1.0e-3]}}")
    return [_parameter(key, value, where, config) for key, value in spec.items()]


def is_config_key(key: str, config: Mapping[str, Any]) -> bool:
    """Whether ``key`` (dotted) names a setting of ``config``: one it holds, or an argument of a
    registry spec it holds (``model.vision.layers`` under ``model.vision: {name: clip_vit}``: a spec
    lists only the arguments it changes, and its constructor checks the names when the run starts)."""
    *parents, leaf = key.split(".")
    node: Any = config
    for part in parents:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return isinstance(node, Mapping) and (leaf in node or "name" in node)


def _parameter(key: Any, spec: Any, where: str, config: Mapping[str, Any]) -> Parameter:
    place = f"{where}: search.{key}"
    if not isinstance(key, str) or not is_config_key(key, config):
        known = config_keys(config)
        raise ConfigError(f"{place}: {key!r} is not a key of the sweep's config.{did_you_mean(key, known)} "
                          f"Search config keys such as optim.lr or model.embed_dim")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{place} should be one distribution, e.g. {{log_uniform: [1.0e-5, 1.0e-3]}}; "
                          f"valid distributions: {', '.join(DISTRIBUTIONS)}")
    [(kind, values)] = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{place}: unknown distribution {kind!r}.{did_you_mean(kind, DISTRIBUTIONS)} "
                          f"Valid distributions: {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{place}: choice should be a non-empty list of values, got {values!r}")
        return Parameter(key, kind, tuple(values))
    number = int if kind == "int_uniform" else (int, float)
    if not isinstance(values, list) or len(values) != 2 or not all(
            isinstance(v, number) and not isinstance(v, bool) for v in values):
        kinds = "integers" if kind == "int_uniform" else "numbers"
        raise ConfigError(f"{place}: {kind} should be [low, high], two {kinds}, got {values!r}")
    low, high = values
    if low >= high:
        raise ConfigError(f"{place}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{place}: log_uniform needs positive bounds, got [{low}, {high}]; "
                          f"use uniform for a range that includes 0")
    return Parameter(key, kind, (low, high))


def sample_trials(space: Sequence[Parameter], trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` draws of every parameter, in order, from ``random.Random(seed)``: the same seed gives
    the same trials bit for bit (on any machine: Python's Mersenne Twister is specified)."""
    rng = random.Random(seed)
    return [{p.key: p.sample(rng) for p in space} for _ in range(trials)]


def config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (plain) config, mappings and their leaves alike: ``optim``, ``optim.lr``."""
    keys = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys += config_keys(value, dotted + ".")
    return keys


# --------------------------------------------------------------------------------------------------
# Optuna (optional: imported only by a sweep that asks for it)


def import_optuna() -> Any:
    """The ``optuna`` module, or a one-line error saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("sampler: tpe needs Optuna, which is not installed: pip install \"vlm-lab[optuna]\" "
                          "(or use sampler: random)") from None
    return optuna


def optuna_distributions(space: Sequence[Parameter]) -> dict[str, Any]:
    """The search space as Optuna distributions, for ``study.ask``."""
    distributions = import_optuna().distributions
    converted = {}
    for p in space:
        if p.kind == "choice":
            converted[p.key] = distributions.CategoricalDistribution(p.values)
        elif p.kind == "int_uniform":
            converted[p.key] = distributions.IntDistribution(p.values[0], p.values[1])
        else:
            converted[p.key] = distributions.FloatDistribution(float(p.values[0]), float(p.values[1]),
                                                               log=p.kind == "log_uniform")
    return converted


def optuna_storage(out: Path) -> str:
    """Where a sweep directory's study lives: SQLite, so the trial processes (each reporting to Optuna
    through the ``optuna_pruning`` callback) and the sweep share it, and a second ``vlm-lab sweep``
    continues it."""
    return f"sqlite:///{(Path(out) / 'optuna.db').resolve()}"


def open_study(out: Path, direction: str, seed: int) -> Any:
    """The sweep directory's Optuna study (created, or loaded to continue), sampling with TPE.

    No pruner here: each trial prunes itself in its own process (the ``optuna_pruning`` callback,
    which holds the pruner); the sweep only asks and tells."""
    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress
    return optuna.create_study(study_name=OPTUNA_STUDY, storage=optuna_storage(out), load_if_exists=True,
                               direction=direction, sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=optuna.pruners.NopPruner())


def load_study(out: Path) -> Any | None:
    """The study of a sweep directory, or None when it has none."""
    if not (Path(out) / "optuna.db").is_file():
        return None
    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=OPTUNA_STUDY, storage=optuna_storage(out))
