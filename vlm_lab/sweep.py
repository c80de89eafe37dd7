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
entry crossed with the grid). A ``runs`` entry is either a list of overrides or a mapping whose
``configs`` are config files layered after ``base`` (a variant kept in its own file, named after
the file's stem) and whose ``overrides`` apply after those. Each run is an ordinary ``vlm-lab fit`` in its own directory
``OUT/<name>`` (``config.yaml``, ``checkpoints/``, ``logs/``, ``metrics.json``, ``log.txt``), with a
``DONE`` marker once it succeeded or a ``FAILED`` file with the error and the tail of its log.
Running the same sweep again skips finished runs and resumes interrupted ones from their last
checkpoint. Runs are separate processes, so one crashing never takes the sweep down.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml
from omegaconf import DictConfig

from vlm_lab import shipped
from vlm_lab.api import load_config
from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.preemption import EXIT_PREEMPTED, forwarded_signals
from vlm_lab.progress import progress

SWEEP_KEYS = ("base", "overrides", "grid", "runs", "slurm")
RUN_KEYS = ("configs", "overrides")  # the keys of a ``runs`` entry written as a mapping
CONFIGS = "configs"  # the swept "value" of a run's own config files: their stems, e.g. scratch_both
DONE, FAILED, LOG = "DONE", "FAILED", "log.txt"
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
        cmd = [sys.executable, "-m", "vlm_lab.cli", "fit", *self.files, *self.overrides, "--run-dir", str(run_dir)]
        return cmd + ["--resume"] if resume else cmd


@dataclass
class Outcome:
    name: str
    status: Literal["done", "failed", "skipped", "planned", "preempted"]
    seconds: float = 0.0
    error: str = ""


# --------------------------------------------------------------------------------------------------
# Expanding


def expand(file: str | Path) -> list[Run]:
    """The runs a sweep file describes, in a stable order, each with a unique name."""
    spec = _read_sweep(Path(file))
    base = tuple(_resolve_config_file(entry, Path(file), "base") for entry in _as_list(spec.get("base"), "base"))
    fixed = [_check_override(o, "overrides") for o in _as_list(spec.get("overrides"), "overrides")]

    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{file}: 'grid' should map dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{file}: grid.{key} should be a non-empty list of values, got {values!r}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]

    explicit = spec.get("runs")
    entries: list[tuple[tuple[str, ...], list[str]]] = [((), [])]  # (the run's config files, its overrides)
    if explicit is not None:
        if not isinstance(explicit, list) or not explicit:
            raise ConfigError(f"{file}: 'runs' should be a non-empty list of override lists or "
                              f"{{configs: [...], overrides: [...]}} mappings")
        entries = [_run_entry(entry, Path(file)) for entry in explicit]

    runs: list[Run] = []
    for (configs, run_overrides), point in itertools.product(entries, points):
        swept = {CONFIGS: "+".join(Path(c).stem for c in configs)} if configs else {}
        swept.update(dict(o.split("=", 1) for o in run_overrides))
        swept.update(point)
        overrides = (*fixed, *run_overrides, *(f"{k}={_format_value(v)}" for k, v in point.items()))
        runs.append(Run(name="", base=base, overrides=overrides, configs=configs, swept=swept))
    names = _run_names([r.swept for r in runs])
    return [Run(name=n, base=r.base, overrides=r.overrides, configs=r.configs, swept=r.swept)
            for n, r in zip(names, runs)]


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
        spec = yaml.safe_load(path.read_text()) or {}
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
        launcher: Literal["local", "slurm"] = "local", slurm_cluster: str | None = None) -> list[Outcome]:
    """Run every unfinished run of a sweep into ``out``; write the report; return the outcomes.

    ``launcher="local"`` runs ``max_parallel`` processes at a time on this machine. ``"slurm"``
    submits each run as a job through submitit's ``AutoExecutor`` with the sweep file's ``slurm:``
    parameters (``slurm_cluster="local"`` uses submitit's local executor: the same code path,
    without a cluster).
    """
    if launcher not in ("local", "slurm"):
        raise ConfigError(f"launcher {launcher!r} is not one of 'local', 'slurm'")
    if max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {max_parallel}")
    runs = expand(file)
    out = Path(out)
    if dry_run:
        for r in runs:
            state = "done, skipped" if (out / r.name / DONE).is_file() else "to run"
            print(f"{r.name}  [{state}]\n  vlm-lab fit {' '.join(r.files + r.overrides)}")
        return [Outcome(r.name, "planned") for r in runs]

    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(Path(file).read_text())
    todo = [r for r in runs if not (out / r.name / DONE).is_file()]
    outcomes = {r.name: Outcome(r.name, "skipped") for r in runs if r not in todo}
    with progress(total=len(todo), desc=f"sweep ({len(runs) - len(todo)} done before)", unit="run") as bar:
        def finished(outcome: Outcome) -> None:  # runs done / left, and the latest one's result
            bar.set_postfix_str(f"{outcome.name}: {outcome.status}", refresh=False)
            bar.update(1)

        if launcher == "slurm":
            done = _run_with_submitit(todo, out, slurm_parameters(file), slurm_cluster, finished)
        else:
            with ThreadPoolExecutor(max_workers=max_parallel) as pool:
                futures = [pool.submit(run_one, r, out / r.name) for r in todo]
                done = []
                for future in as_completed(futures):
                    done.append(future.result())
                    finished(done[-1])
    outcomes.update({o.name: o for o in done})
    report(out)
    return [outcomes[r.name] for r in runs]


def run_one(run_: Run, run_dir: Path) -> Outcome:
    """One run as a subprocess, logging to ``run_dir/log.txt``; resumes when a checkpoint exists."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    resume = (run_dir / "checkpoints" / "last.ckpt").exists()  # a sharded checkpoint is a directory
    start = time.monotonic()
    with open(run_dir / LOG, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resuming' if resume else 'starting'} {run_.name}\n")
        log.flush()
        child = subprocess.Popen(run_.command(run_dir, resume), stdout=log, stderr=subprocess.STDOUT)
        with forwarded_signals(child):  # a SLURM job's preemption notice reaches the fit (vlm_lab/preemption.py)
            code = child.wait()
    seconds = time.monotonic() - start
    if code == 0:
        (run_dir / DONE).write_text(json.dumps({"seconds": seconds, "overrides": list(run_.overrides)}) + "\n")
        return Outcome(run_.name, "done", seconds)
    if code == EXIT_PREEMPTED:  # checkpointed and stopped by a signal; running the sweep again resumes it
        return Outcome(run_.name, "preempted", seconds)
    tail = "".join((run_dir / LOG).read_text(errors="replace").splitlines(keepends=True)[-LOG_TAIL_LINES:])
    error = next((line for line in reversed(tail.splitlines()) if "error" in line.lower()), f"exit code {code}")
    (run_dir / FAILED).write_text(f"exit code: {code}\nerror: {error}\n--- last lines of {LOG} ---\n{tail}")
    return Outcome(run_.name, "failed", seconds, error)


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
    sweep_file = out / "sweep.yaml"
    runs = expand(sweep_file) if sweep_file.is_file() else []
    rows = []
    for r in runs:
        run_dir = out / r.name
        status = "done" if (run_dir / DONE).is_file() else "failed" if (run_dir / FAILED).is_file() else \
            "incomplete" if run_dir.is_dir() else "not started"
        row: dict[str, Any] = {"run": r.name, "status": status, **{k: v for k, v in r.swept.items()}}
        if status == "done":
            row["seconds"] = _seconds(run_dir / DONE)
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            row.update(json.loads(metrics_file.read_text()))
        rows.append(row)
    return rows


def report(out: str | Path, metric: str | None = None) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and PNG plots into ``out``; return their paths."""
    out = Path(out)
    rows = collect(out)
    if not rows:
        raise ConfigError(f"{out} holds no sweep (no sweep.yaml); run `vlm-lab sweep FILE --out {out}` first")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c not in ("epoch", "step") and not c.startswith(("val/chance", "test/chance"))]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    swept = {k for r in expand(out / "sweep.yaml") for k in r.swept}
    lines += ["| " + " | ".join(_cell(row.get(c), c in swept) for c in shown) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return [out / "results.csv", out / "results.md", *_plots(out, rows, metric)]


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


def _plots(out: Path, rows: list[dict[str, Any]], metric: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "done"]
    metrics = [metric] if metric else sorted({k for r in done for k in r if k.endswith("R@1")}) or \
        sorted({k for r in done for k in r if k.startswith(("val/", "test/"))})[:1]
    swept_keys = list(dict.fromkeys(k for r in expand(out / "sweep.yaml") for k in r.swept))
    paths = []
    for key in swept_keys:
        values = sorted({str(r[key]) for r in done if key in r}, key=_sort_key)
        if not values or not metrics:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in metrics:
            points = [(values.index(str(r[key])), r[m]) for r in done if m in r and key in r]
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=m)
        ax.set_xticks(range(len(values)), values, rotation=30, ha="right")
        ax.set(xlabel=key, ylabel="metric", title=f"metric against {key}")
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
