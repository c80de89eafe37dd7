"""Experiment sweeps from one YAML file: expand, run (locally or on SLURM), resume, report.

A sweep file::

    base: [experiments/quickstart.yaml]          # config files, merged left to right
    overrides: [trainer.max_epochs=2]            # fixed for every run
    grid:                                        # cartesian product of these values
      optim.lr: [1.0e-3, 3.0e-4]
      model.embed_dim: [64, 128]
    runs:                                        # optional: explicit runs
      - [model.loss.name=siglip]                 # an override set
      - {configs: [experiments/lit/scratch_both.yaml], overrides: [optim.lr=1e-3]}

gives one run per grid point (``runs`` alone gives one per entry; both together give every run
entry crossed with the grid). ``search:`` adds sampled keys (``vlm_lab/search.py``: ``trials``
draws from a ``seed``, crossed with the grid, or Optuna's TPE with ``sampler: tpe``), and
``repeats: 3`` (or ``seeds: [0, 1, 2]``) runs every configuration with each training seed. A ``runs`` entry is either a list of overrides or a mapping whose
``configs`` are config files layered after ``base`` (a variant kept in its own file, named after
the file's stem) and whose ``overrides`` apply after those. Each run is an ordinary ``vlm-lab fit`` in its own directory
``OUT/<name>`` (``config.yaml``, ``checkpoints/``, ``logs/``, ``metrics.json``, ``log.txt``), with a
``DONE`` marker once it succeeded, a ``FAILED`` file with the error and the tail of its log, or a
``PREEMPTED`` marker when a signal stopped it after a checkpoint (``vlm_lab/preemption.py``).
Running the same sweep again skips finished runs and resumes interrupted and preempted ones from their last
checkpoint. Runs are separate processes, so one crashing never takes the sweep down. On a machine with several
GPUs, concurrent local runs each get their own (``gpus``, ``devices_per_run``: ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from vlm_lab import search as search_spaces
from vlm_lab import shipped
from vlm_lab.api import load_config
from vlm_lab.cli import command_line
from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.preemption import EXIT_PREEMPTED, forwarded_signals
from vlm_lab.progress import progress
from vlm_lab.yaml_text import load_yaml

SWEEP_KEYS = ("base", "overrides", "grid", "runs",
              "search", "trials", "seed", "sampler", "metric", "direction", "pruner",  # search spaces
              "repeats", "seeds",  # the same configuration with several training seeds
              "gpus", "devices_per_run",  # local runs on several GPUs
              "slurm")
RUN_KEYS = ("configs", "overrides")  # the keys of a ``runs`` entry written as a mapping
CONFIGS = "configs"  # the swept "value" of a run's own config files: their stems, e.g. scratch_both
TRIAL, SEED = "trial", "seed"  # a sampled run's number in its name; a repeat's training seed (a config key)
DONE, FAILED, PREEMPTED, LOG = "DONE", "FAILED", "PREEMPTED", "log.txt"
LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its directory name, its config files (the sweep's ``base``, then the
    run's own ``configs``) and every override it applies after them."""

    name: str
    base: tuple[str, ...]
    overrides: tuple[str, ...]
    configs: tuple[str, ...] = ()
    swept: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def files(self) -> tuple[str, ...]:
        """Every config file of the run, in merge order."""
        return self.base + self.configs

    def config(self) -> DictConfig:
        """The run's resolved config, exactly what its ``vlm-lab fit`` will train (nothing runs)."""
        return load_config(*self.files, overrides=self.overrides)

    def command(self, run_dir: Path, resume: bool) -> list[str]:
        cmd = command_line("fit", *self.files, *self.overrides, "--run-dir", str(run_dir))
        return cmd + ["--resume"] if resume else cmd


@dataclass(frozen=True)
class Search:
    """What a sweep file says besides its runs: the sampled keys, how many trials from which seed and
    which sampler, the metric that judges them, and the repeats' training seeds."""

    space: tuple[search_spaces.Parameter, ...] = ()
    trials: int = 1
    seed: int = 0
    sampler: str = "random"
    metric: str | None = None
    direction: str = "maximize"
    pruner: str = "median"
    seeds: tuple[int, ...] = ()  # the repeats' training seeds (config key ``seed``); () runs each once


# A run's launcher: runs one run in its directory with these extra environment variables.
Runner = Callable[[Run, Path, Mapping[str, str]], "Outcome"]


@dataclass
class Outcome:
    """How a run ended: ``pruned`` is an Optuna trial its pruner stopped early (``sampler: tpe``)."""

    name: str
    status: Literal["done", "failed", "skipped", "planned", "pruned", "preempted"]
    seconds: float = 0.0
    error: str = ""


# --------------------------------------------------------------------------------------------------
# Expanding


def expand(file: str | Path) -> list[Run]:
    """The runs a sweep file describes, in a stable order, each with a unique name.

    Every ``runs`` entry x every grid point x every sampled trial x every repeat seed. A trial's
    sampled values are the same at every grid point (so grid points compare on the same draws). A
    ``sampler: tpe`` sweep has no runs to list before it runs: Optuna picks each trial from the
    finished ones (``run`` drives it).
    """
    path = Path(file)
    spec = _read_sweep(path)
    base, fixed = _base_and_fixed(spec, path)
    search = read_search(path)
    if search.sampler == "tpe":
        raise ConfigError(f"{path}: a sampler: tpe sweep picks its trials while it runs; "
                          f"`vlm-lab sweep {path} --out DIR --dry-run` shows its search space")

    grid = spec.get("grid") or {}
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]

    explicit = spec.get("runs")
    entries: list[tuple[tuple[str, ...], list[str]]] = [((), [])]  # (the run's config files, its overrides)
    if explicit is not None:
        if not isinstance(explicit, list) or not explicit:
            raise ConfigError(f"{file}: 'runs' should be a non-empty list of override lists or "
                              f"{{configs: [...], overrides: [...]}} mappings")
        entries = [_run_entry(entry, path) for entry in explicit]
    if search.seeds and any(o.split("=", 1)[0] == SEED for _, overrides in entries for o in overrides):
        raise ConfigError(f"{path}: a 'runs' entry sets seed=, which repeats/seeds already sweep")

    draws: list[dict[str, Any] | None] = [None]
    if search.space:
        draws = search_spaces.sample_trials(search.space, search.trials, search.seed)  # type: ignore[assignment]
    seeds: list[int | None] = list(search.seeds) or [None]

    runs: list[Run] = []
    labels: list[dict[str, Any]] = []  # what names a run (sampled values are too long: their trial number)
    for (configs, run_overrides), point, (trial, draw), seed in itertools.product(entries, points, enumerate(draws),
                                                                                 seeds):
        label = {CONFIGS: "+".join(Path(c).stem for c in configs)} if configs else {}
        label.update(dict(o.split("=", 1) for o in run_overrides))
        label.update(point)
        swept = dict(label)
        overrides = [*fixed, *run_overrides, *(f"{k}={_format_value(v)}" for k, v in point.items())]
        if draw is not None:
            label[TRIAL] = trial
            swept.update(draw)
            overrides += [f"{k}={_format_value(v)}" for k, v in draw.items()]
        if seed is not None:
            label[SEED] = swept[SEED] = seed
            overrides.append(f"{SEED}={seed}")
        runs.append(Run(name="", base=base, overrides=tuple(overrides), configs=configs, swept=swept))
        labels.append(label)
    names = _run_names(labels)
    return [Run(name=n, base=r.base, overrides=r.overrides, configs=r.configs, swept=r.swept)
            for n, r in zip(names, runs)]


def read_search(file: str | Path) -> Search:
    """A sweep file's search settings (``search``, ``trials``, ``seed``, ``sampler``, ``metric``,
    ``direction``, ``pruner``, ``repeats``, ``seeds``), checked: each mistake is one ``ConfigError``."""
    path = Path(file)
    spec = _read_sweep(path)
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: 'grid' should map dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} should be a non-empty list of values, got {values!r}")

    sampler = _choice(spec, "sampler", "random", search_spaces.SAMPLERS, path)
    direction = _choice(spec, "direction", "maximize", search_spaces.DIRECTIONS, path)
    pruner = _choice(spec, "pruner", "median", search_spaces.PRUNERS, path)
    trials = _integer(spec, "trials", 1, path, minimum=1)
    seed = _integer(spec, "seed", 0, path, minimum=None)
    metric = spec.get("metric")
    if metric is not None and (not isinstance(metric, str) or "/" not in metric):
        raise ConfigError(f"{path}: metric should be a logged metric such as val/i2t_R@1 or val/loss, got {metric!r}")

    space: list[search_spaces.Parameter] = []
    if spec.get("search") is not None:
        base, fixed = _base_and_fixed(spec, path)
        config = OmegaConf.to_container(load_config(*base, overrides=fixed), resolve=True)
        space = search_spaces.parse_space(spec["search"], str(path), config)  # type: ignore[arg-type]
        for p in space:
            if p.key in grid:
                raise ConfigError(f"{path}: {p.key} is both in grid and in search; sweep it in one of them")
    elif "trials" in spec or sampler == "tpe":
        raise ConfigError(f"{path}: {'trials' if 'trials' in spec else 'sampler: tpe'} needs a 'search' mapping "
                          f"of config keys to distributions ({', '.join(search_spaces.DISTRIBUTIONS)})")

    if "repeats" in spec and "seeds" in spec:
        raise ConfigError(f"{path}: give repeats (seeds 0..N-1) or seeds (a list), not both")
    seeds: tuple[int, ...] = ()
    if "repeats" in spec:
        seeds = tuple(range(_integer(spec, "repeats", 1, path, minimum=1)))
    elif "seeds" in spec:
        listed = spec["seeds"]
        if not isinstance(listed, list) or not listed or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in listed) or len(set(listed)) < len(listed):
            raise ConfigError(f"{path}: seeds should be a non-empty list of distinct integers, got {listed!r}")
        seeds = tuple(listed)
    if seeds:
        swept_elsewhere = [f"{where}.seed" for where, keys in (("grid", grid), ("search", spec.get("search") or {}))
                           if SEED in keys]
        swept_elsewhere += ["overrides"] * any(str(o).startswith(f"{SEED}=") for o in _as_list(spec.get("overrides"),
                                                                                              "overrides"))
        if swept_elsewhere:
            raise ConfigError(f"{path}: repeats/seeds set the training seed, and so does {swept_elsewhere[0]}; "
                              f"keep one of them")

    if sampler == "tpe":
        if metric is None:
            raise ConfigError(f"{path}: sampler: tpe needs the metric it optimises, e.g. metric: val/i2t_R@1 "
                              f"(and direction: maximize or minimize)")
        for key in ("grid", "runs", "repeats", "seeds"):
            if spec.get(key) is not None:
                raise ConfigError(f"{path}: sampler: tpe searches 'search' alone, one run per trial; "
                                  f"'{key}' works with sampler: random")
    return Search(space=tuple(space), trials=trials, seed=seed, sampler=sampler, metric=metric,
                  direction=direction, pruner=pruner, seeds=seeds)


def _base_and_fixed(spec: dict[str, Any], path: Path) -> tuple[tuple[str, ...], list[str]]:
    """The sweep's base config files (resolved) and its fixed overrides."""
    base = tuple(_resolve_config_file(entry, path, "base") for entry in _as_list(spec.get("base"), "base"))
    return base, [_check_override(o, "overrides") for o in _as_list(spec.get("overrides"), "overrides")]


def _choice(spec: dict[str, Any], key: str, default: str, choices: Sequence[str], path: Path) -> str:
    value = spec.get(key, default)
    if value not in choices:
        raise ConfigError(f"{path}: {key} {value!r} is not one of {', '.join(choices)}.{did_you_mean(value, choices)}")
    return value


def _integer(spec: dict[str, Any], key: str, default: int, path: Path, minimum: int | None) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        least = f" of at least {minimum}" if minimum is not None else ""
        raise ConfigError(f"{path}: {key} should be an integer{least}, got {value!r}")
    return value


def _run_entry(entry: Any, sweep_file: Path) -> tuple[tuple[str, ...], list[str]]:
    """One ``runs`` entry: an override list, or ``{configs: [FILE, ...], overrides: [...]}``."""
    if not isinstance(entry, dict):
        return (), [_check_override(o, "runs") for o in _as_list(entry, "runs")]
    for key in entry:
        if key not in RUN_KEYS:
            raise ConfigError(f"{sweep_file}: unknown key {key!r} in a 'runs' entry.{did_you_mean(key, RUN_KEYS)} "
                              f"Valid keys: {', '.join(RUN_KEYS)}")
    configs = tuple(_resolve_config_file(c, sweep_file, "runs") for c in _as_list(entry.get(CONFIGS), "runs.configs"))
    overrides = [_check_override(o, "runs") for o in _as_list(entry.get("overrides"), "runs.overrides")]
    if not configs and not overrides:
        raise ConfigError(f"{sweep_file}: a 'runs' entry {entry!r} names neither configs nor overrides")
    return configs, overrides


def slurm_parameters(file: str | Path) -> dict[str, Any]:
    """The sweep file's ``slurm:`` section, handed to submitit's ``update_parameters``."""
    return dict(_read_sweep(Path(file)).get("slurm") or {})


def _read_sweep(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        spec = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} should hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{path}: unknown sweep key {key!r}.{did_you_mean(key, SWEEP_KEYS)} "
                              f"Valid keys: {', '.join(SWEEP_KEYS)}")
    if not spec.get("base"):
        raise ConfigError(f"{path}: 'base' must list at least one config file")
    return spec


def _resolve_config_file(entry: Any, sweep_file: Path, where: str) -> str:
    """A config path relative to the working directory, else to the sweep file's folder or one of
    its parents (so ``experiments/quickstart.yaml`` works from anywhere inside a checkout), else a
    packaged experiment's name (``quickstart``), kept as the name."""
    if not isinstance(entry, str):
        raise ConfigError(f"{sweep_file}: {where} entry {entry!r} should be a config file path")
    folders = [Path.cwd(), *sweep_file.resolve().parents]
    for folder in folders:
        if (folder / entry).is_file():
            return str((folder / entry).resolve())
    packaged = shipped.experiments()
    if entry in packaged:
        return entry
    raise ConfigError(f"{sweep_file}: {where} config {entry!r} not found in the working directory "
                      f"or beside the sweep file, nor a packaged experiment ({', '.join(packaged)})")


def _as_list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    if isinstance(value, list):
        return value
    raise ConfigError(f"'{where}' should be a list, got {value!r}")


def _check_override(item: Any, where: str) -> str:
    if not isinstance(item, str) or "=" not in item or item.startswith("="):
        raise ConfigError(f"'{where}' entry {item!r} should look like key=value, e.g. optim.lr=1e-3")
    return item


def _format_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # omegaconf's dotlist parser reads JSON-style lists and mappings
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _run_names(swept: list[dict[str, Any]]) -> list[str]:
    """Short, unique, filesystem-safe names from each run's swept values: ``lr=0.001,embed_dim=64``;
    a run's own config files appear as their stems (``scratch_both`` or ``scratch_both,lr=0.001``).

    A key is shortened to its last component (``optim.lr`` -> ``lr``) unless another swept key ends
    the same way (``model.vision.layers`` and ``model.text.layers`` keep their full names).
    """
    keys = list(dict.fromkeys(k for values in swept for k in values))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    label = {k: short if last.count(short) == 1 else k for k, short in zip(keys, last)}

    def part(key: str, value: Any) -> str:
        return str(value) if key == CONFIGS else f"{label[key]}={_format_value(value)}"

    names = [
        re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", ",".join(part(k, v) for k, v in values.items())) or "run"
        for values in swept
    ]
    if len(set(names)) < len(names):  # the same overrides twice: number them
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    return names


# --------------------------------------------------------------------------------------------------
# Running


def run(file: str | Path, out: str | Path, dry_run: bool = False, max_parallel: int = 1,
        launcher: Literal["local", "slurm"] = "local", slurm_cluster: str | None = None,
        gpus: str | Sequence[int] | None = None, devices_per_run: int | None = None,
        runner: Runner | None = None) -> list[Outcome]:
    """Run every unfinished run of a sweep into ``out``; write the report; return the outcomes.

    ``launcher="local"`` runs ``max_parallel`` processes at a time on this machine, each on its own
    ``devices_per_run`` GPUs out of ``gpus`` (``"auto"``: every visible GPU, none on a machine without;
    ``"none"``: no assignment; or ids such as ``"0,1,2,3"`` or ``[0, 1]``); both default to the sweep
    file's keys, then ``"auto"`` and the GPUs shared evenly between the ``max_parallel`` runs. ``"slurm"`` submits each run as a job through submitit's
    ``AutoExecutor`` with the sweep file's ``slurm:`` parameters (``slurm_cluster="local"`` uses
    submitit's local executor: the same code path, without a cluster). ``runner`` runs one local run
    (default :func:`run_one`, a ``vlm-lab fit`` process); another one can wrap it (a container, a
    different interpreter) and receives the run's environment (``CUDA_VISIBLE_DEVICES``).
    """
    if launcher not in ("local", "slurm"):
        raise ConfigError(f"launcher {launcher!r} is not one of 'local', 'slurm'")
    if max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {max_parallel}")
    spec = _read_sweep(Path(file))
    search = read_search(file)
    gpus = spec.get("gpus", "auto") if gpus is None else gpus
    devices_per_run = spec.get("devices_per_run") if devices_per_run is None else devices_per_run
    if launcher == "slurm":
        if search.sampler == "tpe":
            raise ConfigError("sampler: tpe runs its trials with the local launcher (Optuna asks for one trial "
                              "after another); use --launcher local")
        if gpus not in ("auto", "none", None) or "devices_per_run" in spec:
            raise ConfigError("gpus and devices_per_run are for --launcher local; on SLURM each job gets the GPUs "
                              "its slurm: section asks for (e.g. gpus_per_node)")
        slots: list[dict[str, str]] = [{}]
    else:
        slots = device_slots(gpus, devices_per_run, max_parallel)
    out = Path(out)
    if search.sampler == "tpe":
        return _run_optuna(Path(file), out, search, dry_run, slots, runner or run_one)
    runs = expand(file)
    if dry_run:
        for r in runs:
            state = "done, skipped" if (out / r.name / DONE).is_file() else "to run"
            print(f"{r.name}  [{state}]\n  vlm-lab fit {' '.join(r.files + r.overrides)}")
        return [Outcome(r.name, "planned") for r in runs]

    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(Path(file).read_text())
    todo = [r for r in runs if not (out / r.name / DONE).is_file()]
    outcomes = {r.name: Outcome(r.name, "skipped") for r in runs if r not in todo}
    with _counting(len(todo), f"sweep ({len(runs) - len(todo)} done before)", "run") as finished:
        if launcher == "slurm":
            done = _run_with_submitit(todo, out, slurm_parameters(file), slurm_cluster, finished)
        else:
            done = _run_locally(iter(todo), out, slots, runner or run_one, finished)
    outcomes.update({o.name: o for o in done})
    report(out)
    return [outcomes[r.name] for r in runs]


def device_slots(gpus: str | Sequence[int] | None, devices_per_run: int | None,
                 max_parallel: int) -> list[dict[str, str]]:
    """The environment of each of ``max_parallel`` concurrent local runs: ``CUDA_VISIBLE_DEVICES`` set
    to a disjoint group of ``devices_per_run`` GPUs (so concurrent runs never share one), or nothing
    on a machine without GPUs or with ``gpus="none"``.

    ``gpus="auto"`` takes every GPU torch sees; where ``CUDA_VISIBLE_DEVICES`` is already set, its
    entries are the ids handed on (a sweep started inside a job's allocation stays inside it).
    ``devices_per_run=None`` shares the GPUs evenly: one run at a time keeps all of them (as a
    ``vlm-lab fit`` would), four runs on four GPUs get one each.
    """
    if devices_per_run is not None and (not isinstance(devices_per_run, int) or isinstance(devices_per_run, bool)
                                        or devices_per_run < 1):
        raise ConfigError(f"devices_per_run should be an integer of at least 1, got {devices_per_run!r}")
    ids = _gpu_ids(gpus)
    if not ids:
        return [{} for _ in range(max_parallel)]
    per_run = devices_per_run or max(len(ids) // max_parallel, 1)
    groups = [ids[i:i + per_run] for i in range(0, len(ids) - per_run + 1, per_run)]
    if len(groups) < max_parallel:
        raise ConfigError(f"--max-parallel {max_parallel} needs {max_parallel} groups of {per_run} GPU(s), "
                          f"and GPUs {','.join(ids)} make {len(groups)}: lower --max-parallel or --devices-per-run, "
                          f"or pass --gpus none to let runs share devices")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(group)} for group in groups[:max_parallel]]


def _gpu_ids(gpus: str | Sequence[int] | None) -> list[str]:
    if gpus is None or gpus == "none":
        return []
    if gpus == "auto":
        import torch

        count = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
        return ids[:count]
    if isinstance(gpus, int) and not isinstance(gpus, bool):  # a count or an id? say which way to write each
        raise ConfigError(f"gpus: {gpus} is ambiguous; list GPU ids ([{gpus}] or \"{gpus}\" for GPU {gpus}, "
                          f"[0, 1] for two), and give the GPUs of each run with devices_per_run")
    listed = gpus.split(",") if isinstance(gpus, str) else list(gpus) if isinstance(gpus, (list, tuple)) else [gpus]
    ids = [str(v).strip() for v in listed if not isinstance(v, bool)]
    if not ids or len(ids) < len(listed) or not all(v.isdigit() for v in ids) or len(set(ids)) < len(ids):
        raise ConfigError(f"gpus should be auto, none or distinct GPU ids such as 0,1,2,3; got {gpus!r}")
    return ids


def _run_locally(runs: Iterator[Run], out: Path, slots: Sequence[Mapping[str, str]], runner: Runner,
                 finished: Callable[[Outcome], None], told: Callable[[Run, Outcome], Outcome] | None = None,
                 ) -> list[Outcome]:
    """Run ``runs`` with one worker per slot (``len(slots)`` at a time); each worker keeps its slot's
    environment (its GPUs) for every run it takes, so concurrent runs never share a device.

    ``runs`` may be lazy (Optuna asks for a trial only when a worker is free); ``told`` sees each
    outcome first and may change it (Optuna's verdict: pruned)."""
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def take() -> Run | None:
        with lock:
            return next(runs, None)

    def work(env: Mapping[str, str]) -> None:
        while (run_ := take()) is not None:
            outcome = runner(run_, out / run_.name, env)
            with lock:
                outcome = told(run_, outcome) if told else outcome
                outcomes.append(outcome)
                finished(outcome)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        for future in [pool.submit(work, env) for env in slots]:
            future.result()  # a bug in a worker surfaces here
    return outcomes


def run_one(run_: Run, run_dir: Path, env: Mapping[str, str] | None = None) -> Outcome:
    """One run as a subprocess, logging to ``run_dir/log.txt``; resumes when a checkpoint exists.

    ``env`` adds to the process's environment (the sweep's ``CUDA_VISIBLE_DEVICES``); the log's
    header line records it."""
    env = dict(env or {})
    run_dir.mkdir(parents=True, exist_ok=True)
    for marker in (FAILED, PREEMPTED):  # from an earlier try of this run
        (run_dir / marker).unlink(missing_ok=True)
    resume = (run_dir / "checkpoints" / "last.ckpt").exists()  # a sharded checkpoint is a directory
    start = time.monotonic()
    with open(run_dir / LOG, "a") as log:
        where = "".join(f" {k}={v}" for k, v in sorted(env.items()))
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resuming' if resume else 'starting'} {run_.name}"
                  f"{where}\n")
        log.flush()
        child = subprocess.Popen(run_.command(run_dir, resume), stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **env})
        with forwarded_signals(child):  # a SLURM job's preemption notice reaches the fit (vlm_lab/preemption.py)
            code = child.wait()
    seconds = time.monotonic() - start
    if code == 0:
        (run_dir / DONE).write_text(json.dumps({"seconds": seconds, "overrides": list(run_.overrides)}) + "\n")
        return Outcome(run_.name, "done", seconds)
    if code == EXIT_PREEMPTED:  # checkpointed and stopped by a signal; running the sweep again resumes it
        (run_dir / PREEMPTED).write_text(f"exit code: {code}\n")  # the report tells it from a crash
        return Outcome(run_.name, "preempted", seconds)
    tail = "".join((run_dir / LOG).read_text(errors="replace").splitlines(keepends=True)[-LOG_TAIL_LINES:])
    error = next((line for line in reversed(tail.splitlines()) if "error" in line.lower()), f"exit code {code}")
    (run_dir / FAILED).write_text(f"exit code: {code}\nerror: {error}\n--- last lines of {LOG} ---\n{tail}")
    return Outcome(run_.name, "failed", seconds, error)


def _run_optuna(file: Path, out: Path, search: Search, dry_run: bool, slots: Sequence[Mapping[str, str]],
                runner: Runner) -> list[Outcome]:
    """A ``sampler: tpe`` sweep: ask Optuna for a trial whenever a worker is free, run it as
    ``OUT/trial=<number>`` with the ``optuna_pruning`` callback reporting ``metric`` after every
    validation, tell Optuna its result (or that it was pruned or failed). The study lives in
    ``OUT/optuna.db``: running the sweep again continues it up to ``trials`` (trials an interrupted
    sweep left running are resumed from their checkpoints; finished, pruned and failed ones count)."""
    from vlm_lab.callbacks import optuna_trial

    optuna = search_spaces.import_optuna()
    if dry_run:
        known = search_spaces.load_study(out)
        before = len(known.get_trials(deepcopy=False)) if known is not None else 0
        print(f"Optuna TPE (seed {search.seed}) over {', '.join(f'{p.key} ~ {p.kind}{list(p.values)}' for p in search.space)}"
              f"; {search.direction} {search.metric}, pruner {search.pruner}; {before} of {search.trials} trials "
              f"in {out / 'optuna.db'}")
        return [Outcome(f"{TRIAL}={n}", "planned") for n in range(before, search.trials)]

    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(file.read_text())
    study = search_spaces.open_study(out, search.direction, search.seed)
    distributions = search_spaces.optuna_distributions(search.space)
    base, fixed = _base_and_fixed(_read_sweep(file), file)
    callbacks = OmegaConf.to_container(load_config(*base, overrides=fixed).callbacks, resolve=True)
    storage = search_spaces.optuna_storage(out)
    existing = study.get_trials(deepcopy=False)
    interrupted = [optuna_trial(storage, search_spaces.OPTUNA_STUDY, t.number) for t in existing
                   if t.state == optuna.trial.TrialState.RUNNING]
    left = max(search.trials - len(existing), 0)
    trials: dict[str, Any] = {}  # run name -> its optuna Trial

    def trial_run(trial: Any) -> Run:
        overrides = [*fixed, *(f"{k}={_format_value(v)}" for k, v in trial.params.items())]
        if search.pruner != "none":
            pruning = {"name": "optuna_pruning", "storage": storage, "study": search_spaces.OPTUNA_STUDY,
                       "trial": trial.number, "monitor": search.metric}
            overrides.append(f"callbacks={json.dumps([*callbacks, pruning])}")  # type: ignore[misc]
        run_ = Run(name=f"{TRIAL}={trial.number}", base=base, overrides=tuple(overrides), swept=dict(trial.params))
        trials[run_.name] = trial
        return run_

    def asked() -> Iterator[Run]:  # lazily: TPE learns from every trial told before the next is asked
        for trial in interrupted:
            yield trial_run(trial)
        for _ in range(left):
            yield trial_run(study.ask(distributions))

    def tell(run_: Run, outcome: Outcome) -> Outcome:
        trial = trials[run_.name]
        metrics = json.loads((out / run_.name / "metrics.json").read_text()) \
            if (out / run_.name / "metrics.json").is_file() else {}
        # The run's process wrote to the trial: read it back from the storage (a Trial object caches).
        [frozen] = [t for t in study.get_trials(deepcopy=False) if t.number == trial.number]
        if outcome.status == "done" and "pruned_at_epoch" in frozen.user_attrs:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            outcome.status = "pruned"
        elif outcome.status == "done" and search.metric in metrics:
            study.tell(trial, metrics[search.metric])
        else:
            if outcome.status == "done":
                outcome.status = "failed"
                outcome.error = f"metric {search.metric} is not in metrics.json (it has {', '.join(sorted(metrics))})"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return outcome

    before = [Outcome(f"{TRIAL}={t.number}", "skipped") for t in existing
              if t.state != optuna.trial.TrialState.RUNNING]
    with _counting(len(interrupted) + left, f"optuna sweep ({len(before)} trials before)", "trial") as finished:
        outcomes = _run_locally(asked(), out, slots, runner, finished, told=tell)
    report(out)
    return before + sorted(outcomes, key=lambda o: int(o.name.split("=")[1]))


@contextmanager
def _counting(total: int, desc: str, unit: str) -> Iterator[Callable[[Outcome], None]]:
    """A progress bar of the runs done and left; the function it yields counts one finished run and
    shows its result."""
    with progress(total=total, desc=desc, unit=unit) as bar:
        def finished(outcome: Outcome) -> None:
            bar.set_postfix_str(f"{outcome.name}: {outcome.status}", refresh=False)
            bar.update(1)

        yield finished


def _run_with_submitit(runs: Sequence[Run], out: Path, parameters: dict[str, Any], cluster: str | None,
                       finished: Callable[[Outcome], None]) -> list[Outcome]:
    import submitit

    executor = submitit.AutoExecutor(folder=str(out / ".submitit"), cluster=cluster)
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"slurm: {str(e).splitlines()[0]}") from None
    jobs = [executor.submit(run_one, r, out / r.name) for r in runs]
    outcomes = []
    for r, job in zip(runs, jobs):
        try:
            outcomes.append(job.result())
        except Exception as e:  # the job itself died (node failure, timeout): record, go on
            outcomes.append(Outcome(r.name, "failed", error=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
        finished(outcomes[-1])
    return outcomes


# --------------------------------------------------------------------------------------------------
# Reporting


def collect(out: str | Path) -> list[dict[str, Any]]:
    """One row per run directory under ``out``: name, status, swept values, metrics, seconds."""
    out = Path(out)
    rows = []
    for r, optuna_status in _swept_runs(out):
        run_dir = out / r.name
        status = "done" if (run_dir / DONE).is_file() else "failed" if (run_dir / FAILED).is_file() else \
            "preempted" if (run_dir / PREEMPTED).is_file() else "incomplete" if run_dir.is_dir() else "not started"
        row: dict[str, Any] = {"run": r.name, "status": optuna_status or status, **{k: v for k, v in r.swept.items()}}
        if status == "done":
            row["seconds"] = _seconds(run_dir / DONE)
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            row.update(json.loads(metrics_file.read_text()))
        rows.append(row)
    return rows


def _swept_runs(out: Path) -> list[tuple[Run, str | None]]:
    """The runs of the sweep in ``out`` (from its copy of the sweep file), each with Optuna's verdict
    for a ``sampler: tpe`` trial (done, pruned, failed, incomplete; None for the other samplers)."""
    sweep_file = out / "sweep.yaml"
    if not sweep_file.is_file():
        return []
    if read_search(sweep_file).sampler != "tpe":
        return [(r, None) for r in expand(sweep_file)]
    study = search_spaces.load_study(out)
    states = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "incomplete"}
    return [(Run(name=f"{TRIAL}={t.number}", base=(), overrides=(), swept=dict(t.params)),
             states.get(t.state.name, t.state.name.lower()))
            for t in (study.get_trials(deepcopy=False) if study is not None else [])]


def report(out: str | Path, metric: str | None = None) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and PNG plots into ``out``; return their paths.

    With repeats (``repeats``/``seeds``), ``results.md`` starts with one row per configuration: the
    number of finished runs ``n`` and every metric's mean ± standard deviation over them; the plots
    show the means with standard deviations as error bars. ``metric`` (default: the sweep file's
    ``metric``, else every R@1) is what the plots show.
    """
    out = Path(out)
    rows = collect(out)
    if not rows:
        raise ConfigError(f"{out} holds no sweep (no sweep.yaml) or no trial yet; "
                          f"run `vlm-lab sweep FILE --out {out}` first")
    search = read_search(out / "sweep.yaml")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c not in ("epoch", "step") and not c.startswith(("val/chance", "test/chance"))]
    swept = list(dict.fromkeys(k for r, _ in _swept_runs(out) for k in r.swept))
    lines = []
    if search.seeds:
        configuration = [k for k in swept if k != SEED]
        measured = [c for c in shown if c not in swept and c not in ("run", "status")]
        lines += [f"Mean ± standard deviation over the seeds {', '.join(map(str, search.seeds))} "
                  f"(n: the finished runs of each configuration).", "",
                  "| " + " | ".join([*configuration, "n", *measured]) + " |",
                  "|" + "---|" * (len(configuration) + 1 + len(measured))]
        for values, group in _by_configuration(rows, configuration):
            cells = [_format_value(v) for v in values] + [str(len(group))]
            cells += [_mean_std([r[c] for r in group if isinstance(r.get(c), (int, float))]) for c in measured]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Every run:", ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c), c in swept) for c in shown) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return [out / "results.csv", out / "results.md", *_plots(out, rows, metric or search.metric, swept, search)]


def _by_configuration(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[tuple[tuple[Any, ...], list[dict]]]:
    """The finished runs grouped by their values of ``keys`` (a configuration), in first-seen order;
    a configuration with no finished run keeps an empty group (n = 0)."""
    groups: dict[tuple[str, ...], tuple[tuple[Any, ...], list[dict]]] = {}
    for row in rows:
        values = tuple(row.get(k) for k in keys)
        _, group = groups.setdefault(tuple(map(str, values)), (values, []))
        if row["status"] == "done":
            group.append(row)
    return list(groups.values())


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:  # one run has no spread to show
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _seconds(done_marker: Path) -> float | None:
    """The run's duration from its DONE marker; None for a marker written by another tool (an
    empty one from ``experiments/lit/results.py``, whose run directories a sweep can share)."""
    try:
        return round(float(json.loads(done_marker.read_text())["seconds"]), 1)
    except (ValueError, KeyError, TypeError):
        return None


def _cell(value: Any, swept: bool) -> str:
    if value is None:
        return ""
    # a swept value as given (a learning rate of 0.0003 is not "0.00"); metrics to two decimals
    return f"{value:.2f}" if isinstance(value, float) and not swept else _format_value(value)


def _plots(out: Path, rows: list[dict[str, Any]], metric: str | None, swept_keys: Sequence[str],
           search: Search) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "done"]
    metrics = [metric] if metric else sorted({k for r in done for k in r if k.endswith("R@1")}) or \
        sorted({k for r in done for k in r if k.startswith(("val/", "test/"))})[:1]
    # With repeats, each configuration is one point: the mean over its seeds, the standard deviation as an
    # error bar; without, each run is one.
    plotted = [k for k in swept_keys if k != SEED] if search.seeds else list(swept_keys)
    grouped_by = plotted if search.seeds else ["run"]
    sampled = {p.key: p.kind for p in search.space}
    paths = []
    for key in plotted:
        values = sorted({str(r[key]) for r in done if key in r}, key=_sort_key)
        if not values or not metrics:
            continue
        numeric = key in sampled and sampled[key] != "choice"  # a sampled range: a real axis, not categories
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in metrics:
            points = []
            for _, group in _by_configuration(done, grouped_by):
                scores = [r[m] for r in group if m in r and key in r]
                if scores:
                    x = group[0][key]
                    points.append((float(x) if numeric else values.index(str(x)), statistics.mean(scores),
                                   statistics.stdev(scores) if len(scores) > 1 else 0.0))
            ax.errorbar([p[0] for p in points], [p[1] for p in points],
                        yerr=[p[2] for p in points] if search.seeds else None, fmt="o", capsize=3, label=m)
        if numeric:
            ax.set_xscale("log" if sampled[key] == "log_uniform" else "linear")
        else:
            ax.set_xticks(range(len(values)), values, rotation=30, ha="right")
        ax.set(xlabel=key, ylabel="metric" + (" (mean ± std over seeds)" if search.seeds else ""),
               title=f"metric against {key}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"plot_{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps, losses = _training_curve(out / r["run"])
        if steps:
            ax.plot(steps, losses, label=r["run"])
    ax.set(xlabel="step", ylabel="train/loss", title="training curves")
    if ax.lines:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)
    return [*paths, out / "training_curves.png"]


def _training_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for log in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(log) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    steps.append(int(row["step"]))
                    losses.append(float(row["train/loss"]))
    return steps, losses


def _sort_key(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
