"""Several sources in one training stream, and sampling with replacement (``resampled: true``).

A mixture lists its sources, each with its shards and, when resampled, a weight::

    data:
      name: cc3m
      train_sources:
        - {name: cc3m,  shards: "cc3m/{00000..00331}.tar",   weight: 0.3}
        - {name: cc12m, shards: "cc12m/{00000..01242}.tar",  weight: 0.7}
      resampled: true
      train_samples: 10000000     # samples per epoch, over all ranks

as open_clip's ``--train-data "a::b" --train-data-upsampling-factors`` with ``--dataset-resampled``
and big_vision's weighted mixtures do. Two modes (``vlm_lab/data/shards.py`` reads both):

- exact (``resampled: false``, the default): the sources' shards are read one after the other as one
  list, so an epoch sees every sample of every source exactly once across all ranks and workers;
  each source contributes its size. Weights would have no meaning there and are refused.
- resampled (``resampled: true``): every reader (rank x loader worker) draws each sample's source at
  random with the sources' weights (normalised: 0.3 and 0.7, or 3 and 7, are the same mixture;
  without weights, in proportion to the sources' sizes), and within a source reads shards drawn
  with replacement (in proportion to their sample counts when known), through its own shuffle
  buffer. ``train_samples`` fixes the epoch length. The proportions of an epoch are those of the
  weights up to sampling noise (about 0.3 percentage points over 20,000 samples).

Every random choice is seeded by (seed, epoch, rank, worker) (and the source), so an epoch is the
same however often it is read, and a resumed run's epoch is the one it lost.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from vlm_lab.errors import ConfigError, did_you_mean

SOURCE_KEYS = ("name", "shards", "weight")


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``data.train_sources``: its name (for messages and the embedding cache), its
    shards (a brace pattern or a list), and its weight (resampled streams only; None: unset)."""

    name: str
    shards: str | list[str]
    weight: float | None = None


def parse_sources(entries: Sequence[Mapping[str, Any]], field: str, resampled: bool) -> list[SourceSpec]:
    """``data.<field>`` as source specs, each mistake one ``ConfigError`` line naming the entry."""
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise ConfigError(f"data.{field} should be a non-empty list of sources such as "
                          f"{{name: cc3m, shards: 'cc3m/{{00000..00331}}.tar', weight: 0.5}}")
    specs = []
    for i, entry in enumerate(entries):
        where = f"data.{field}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} should be a mapping with {', '.join(SOURCE_KEYS)}, not {entry!r}")
        for key in entry:
            if key not in SOURCE_KEYS:
                raise ConfigError(f"{where} has no key {key!r}.{did_you_mean(key, SOURCE_KEYS)} "
                                  f"Valid keys: {', '.join(SOURCE_KEYS)}")
        if "shards" not in entry:
            raise ConfigError(f"{where} has no 'shards'; give a brace pattern or a list of shard paths")
        name = entry.get("name", f"{field}[{i}]")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name should be a non-empty string, not {name!r}")
        weight = entry.get("weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(f"{where}.weight should be a number > 0, not {weight!r}")
            if not resampled:
                raise ConfigError(f"{where}.weight: weights mix a resampled stream; set data.resampled=true "
                                  f"(without it an epoch reads every sample of every source once)")
        specs.append(SourceSpec(name, entry["shards"], None if weight is None else float(weight)))
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.{field}: the name {repeated[0]!r} is given to more than one source; names tell "
                          f"sources apart (in messages and the embedding cache)")
    given = [spec.weight is not None for spec in specs]
    if any(given) and not all(given):
        missing = given.index(False)
        raise ConfigError(f"data.{field}[{missing}] has no weight while others have one; weigh every source or none")
    return specs


def mixture_weights(weights: Sequence[float | None], sizes: Sequence[int | None]) -> list[float]:
    """The probability of each source: its weight normalised; without weights, its share of the
    samples (equal shares when a size is unknown)."""
    if all(w is not None for w in weights):
        chosen = [float(w) for w in weights]  # type: ignore[arg-type]
    elif all(s is not None for s in sizes) and sum(sizes) > 0:  # type: ignore[arg-type]
        chosen = [float(s) for s in sizes]  # type: ignore[arg-type]
    else:
        chosen = [1.0] * len(weights)
    total = sum(chosen)
    return [w / total for w in chosen]


def interleave(streams: Sequence[Iterator[Any]], probabilities: Sequence[float],
               rng: random.Random) -> Iterator[Any]:
    """Each item from a stream drawn at random with ``probabilities`` (the streams never end)."""
    cumulative = list(itertools.accumulate(probabilities))
    while True:
        index = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(streams) - 1)
        yield next(streams[index])


def weighted_draws(counts: Sequence[int] | None, size: int, rng: random.Random) -> Iterator[int]:
    """Shard indices drawn with replacement: in proportion to ``counts``, or uniformly without them."""
    if counts is None or sum(counts) == 0:
        while True:
            yield rng.randrange(size)
    cumulative = list(itertools.accumulate(counts))
    while True:
        yield bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
