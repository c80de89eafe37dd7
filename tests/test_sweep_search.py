"""Sweeps beyond the grid: sampled search spaces, repeats over seeds, one GPU group per concurrent run,
and Optuna's TPE with pruning. Runs here go through a recording ``runner`` (the public hook of
``vlm_lab.sweep.run``) that writes what a ``vlm-lab fit`` would, so they take no training; the one
real end-to-end Optuna sweep is marked slow."""

import json
import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlm_lab import registry, sweep
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")

SEARCH = """
base: [TINY]
search:
  optim.lr: {log_uniform: [1.0e-5, 1.0e-3]}
  optim.weight_decay: {uniform: [0.0, 0.2]}
  model.vision.layers: {int_uniform: [1, 3]}
  model.embed_dim: {choice: [8, 16]}
trials: 5
seed: 7
"""


def write_sweep(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text.replace("TINY", TINY))
    return path


def fake_metrics(run_: sweep.Run) -> dict[str, float]:
    """A deterministic stand-in for a training's result: best at lr = 1e-4, plus the seed."""
    values = dict(o.split("=", 1) for o in run_.overrides if not o.startswith("callbacks="))
    lr = float(values.get("optim.lr", 1e-4))
    return {"val/i2t_R@1": 50.0 - 10 * (math.log10(lr) + 4) ** 2 + float(values.get("seed", 0)), "epoch": 0}


class RecordingRunner:
    """Runs nothing: records each run's environment and which GPUs are busy at the same time, and writes
    the run directory a finished ``vlm-lab fit`` leaves (metrics.json, DONE)."""

    def __init__(self, parallel: int = 1):
        self.lock = threading.Lock()
        self.envs: dict[str, dict[str, str]] = {}
        self.busy: list[str] = []
        self.clashes: list[str] = []
        self.overlapped = False
        self.parallel = parallel
        self.barrier = threading.Barrier(parallel, timeout=30) if parallel > 1 else None

    def __call__(self, run_, run_dir, env):
        devices = env.get("CUDA_VISIBLE_DEVICES", "").split(",") if env else []
        with self.lock:
            self.envs[run_.name] = dict(env)
            self.clashes += [d for d in devices if d in self.busy]
            self.busy += devices
            first = len(self.envs) <= self.parallel
        if self.barrier is not None and first:  # the first run of every worker waits for the others: at once
            try:
                self.barrier.wait()
                self.overlapped = True
            except threading.BrokenBarrierError:
                pass
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(fake_metrics(run_)))
        (run_dir / "DONE").write_text(json.dumps({"seconds": 1.0, "overrides": list(run_.overrides)}))
        with self.lock:
            for d in devices:
                self.busy.remove(d)
        return sweep.Outcome(run_.name, "done", 1.0)


# --------------------------------------------------------------------------------------------------
# Sampled search spaces


def test_random_search_draws_the_same_trials_from_the_same_seed(tmp_path):
    runs = sweep.expand(write_sweep(tmp_path, SEARCH))
    assert [r.name for r in runs] == [f"trial={i}" for i in range(5)]
    again = sweep.expand(write_sweep(tmp_path, SEARCH, name="again.yaml"))
    assert [r.swept for r in again] == [r.swept for r in runs]  # bit for bit: floats compare exactly
    other = sweep.expand(write_sweep(tmp_path, SEARCH.replace("seed: 7", "seed: 8"), name="other.yaml"))
    assert [r.swept["optim.lr"] for r in other] != [r.swept["optim.lr"] for r in runs]
    for r in runs:
        lr, wd = r.swept["optim.lr"], r.swept["optim.weight_decay"]
        assert 1e-5 <= lr <= 1e-3 and 0.0 <= wd <= 0.2
        assert r.swept["model.vision.layers"] in (1, 2, 3) and r.swept["model.embed_dim"] in (8, 16)
        cfg = r.config()  # the overrides carry the sampled values exactly
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.model.vision.layers) == \
            (lr, wd, r.swept["model.vision.layers"])
    # log-uniform: the draws spread over the decades, not bunched near the top of the range
    lrs = [r.swept["optim.lr"] for r in sweep.expand(write_sweep(
        tmp_path, SEARCH.replace("trials: 5", "trials: 200"), name="many.yaml"))]
    assert sum(lr < 1e-4 for lr in lrs) > 60
    # bounds written without a dot (1e-5) are numbers too (vlm_lab/yaml_text.py): the same draws
    dotless = sweep.expand(write_sweep(tmp_path, SEARCH.replace("1.0e-5", "1e-5").replace("1.0e-3", "1e-3"),
                                       name="dotless.yaml"))
    assert [r.swept for r in dotless] == [r.swept for r in runs]


def test_search_crosses_the_grid_with_the_same_draws_at_every_point(tmp_path):
    file = write_sweep(tmp_path, SEARCH.replace("trials: 5", "trials: 3") + "grid: {model.text.layers: [1, 2]}\n")
    runs = sweep.expand(file)
    assert [r.name for r in runs] == ["layers=1,trial=0", "layers=1,trial=1", "layers=1,trial=2",
                                      "layers=2,trial=0", "layers=2,trial=1", "layers=2,trial=2"]
    assert runs[0].swept["optim.lr"] == runs[3].swept["optim.lr"] != runs[1].swept["optim.lr"]
    assert runs[4].config().model.text.layers == 2


def test_a_spec_argument_absent_from_the_config_can_be_searched(tmp_path):
    # model.vision lists only the arguments tiny.yaml changes; its tower checks names when a run starts
    file = write_sweep(tmp_path, "base: [TINY]\nsearch: {model.vision.mlp_ratio: {choice: [2, 4]}}\ntrials: 2\n")
    assert len(sweep.expand(file)) == 2


@pytest.mark.parametrize("text, message", [
    ("search: {optim.lr: {loguniform: [1.0e-5, 1.0e-3]}}",
     r"search.optim.lr: unknown distribution 'loguniform'. Did you mean 'log_uniform'.*Valid distributions: "
     r"uniform, log_uniform, int_uniform, choice"),
    ("search: {optim.lr: {uniform: [0.1, 0.1]}}", r"search.optim.lr: uniform needs low < high, got \[0.1, 0.1\]"),
    ("search: {optim.lr: {log_uniform: [0.0, 0.1]}}", r"search.optim.lr: log_uniform needs positive bounds"),
    ("search: {optim.lr: {uniform: [0.1]}}", r"uniform should be \[low, high\], two numbers"),
    ("search: {optim.lr: {uniform: ['1e-5', 1e-3]}}", r"two numbers, got \['1e-5', 0.001\]"),  # quoted: text
    ("search: {model.vision.layers: {int_uniform: [1, 2.5]}}", r"int_uniform should be \[low, high\], two integers"),
    ("search: {optim.lr: {choice: []}}", "choice should be a non-empty list"),
    ("search: {optim.lrr: {uniform: [0.1, 0.2]}}", r"search.optim.lrr: 'optim.lrr' is not a key of the sweep's "
                                                   r"config. Did you mean 'optim.lr'"),
    ("search: {optim.lr: [0.1, 0.2]}", r"search.optim.lr should be one distribution"),
    ("search: {optim.lr: {uniform: [0.1, 0.2]}}\ntrials: 0", "trials should be an integer of at least 1, got 0"),
    ("trials: 3", "trials needs a 'search' mapping"),
    ("search: {optim.lr: {uniform: [0.1, 0.2]}}\nsampler: bayes", "sampler 'bayes' is not one of random, tpe"),
    ("search: {optim.lr: {uniform: [0.1, 0.2]}}\ngrid: {optim.lr: [0.1]}", "optim.lr is both in grid and in search"),
    ("search: {optim.lr: {uniform: [0.1, 0.2]}}\nsampler: tpe", "sampler: tpe needs the metric it optimises"),
    ("search: {optim.lr: {uniform: [0.1, 0.2]}}\nsampler: tpe\nmetric: val/i2t_R@1\nrepeats: 2",
     "sampler: tpe searches 'search' alone.*'repeats' works with sampler: random"),
    ("search: {optim.lr: {uniform: [0.1, 0.2]}}\nmetric: val/i2t_R@1\ndirection: up",
     "direction 'up' is not one of maximize, minimize"),
    ("repeats: 0", "repeats should be an integer of at least 1"),
    ("repeats: 2\nseeds: [0, 1]", "give repeats .* or seeds .*, not both"),
    ("seeds: [1, 1]", "seeds should be a non-empty list of distinct integers"),
    ("repeats: 2\ngrid: {seed: [1, 2]}", "repeats/seeds set the training seed, and so does grid.seed"),
    ("repeats: 2\noverrides: [seed=3]", "repeats/seeds set the training seed, and so does overrides"),
    ("repeats: 2\nruns: [[seed=3]]", "a 'runs' entry sets seed=, which repeats/seeds already sweep"),
    ("gpus: [0]\nsearch: {optim.lr: {uniform: [0.1, 0.2]}}\nsampler: tpe\nmetric: val/i2t_R@1\ngrid: {seed: [1]}",
     "sampler: tpe searches 'search' alone.*'grid' works with sampler: random"),
])
def test_bad_search_specs_are_one_line_naming_the_place(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        sweep.expand(write_sweep(tmp_path, "base: [TINY]\n" + text + "\n"))
    assert "\n" not in str(error.value) and str(tmp_path / "sweep.yaml") in str(error.value)


def test_random_search_with_repeats_dry_run_from_the_command_line(tmp_path, capsys):
    file = write_sweep(tmp_path, SEARCH + "repeats: 2\n")
    assert main(["sweep", str(file), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    first = sweep.expand(file)[0]
    assert "trial=0,seed=0  [to run]" in printed and "trial=4,seed=1  [to run]" in printed
    assert f"optim.lr={first.swept['optim.lr']!r}" in printed
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Repeats over seeds


def test_repeats_report_mean_and_standard_deviation_per_configuration(tmp_path):
    file = write_sweep(tmp_path, "base: [TINY]\ngrid: {optim.lr: [1.0e-4, 1.0e-3]}\nrepeats: 3\n")
    runs = sweep.expand(file)
    assert [r.name for r in runs][:3] == ["lr=0.0001,seed=0", "lr=0.0001,seed=1", "lr=0.0001,seed=2"]
    assert runs[1].overrides[-1] == "seed=1" and runs[1].config().seed == 1
    assert [r.name for r in sweep.expand(write_sweep(tmp_path, "base: [TINY]\nseeds: [3, 5]\n", "s.yaml"))] == \
        ["seed=3", "seed=5"]

    outcomes = sweep.run(file, tmp_path / "out", runner=RecordingRunner())  # from Python
    assert [o.status for o in outcomes] == ["done"] * 6
    text = (tmp_path / "out" / "results.md").read_text()
    # lr=1e-4: 50 + seed (50, 51, 52) -> 51.00 ± 1.00; lr=1e-3: 40 + seed -> 41.00 ± 1.00
    assert "| optim.lr | n | seconds | val/i2t_R@1 |" in text
    assert "| 0.0001 | 3 | 1.00 ± 0.00 | 51.00 ± 1.00 |" in text and "| 0.001 | 3 | 1.00 ± 0.00 | 41.00 ± 1.00 |" in text
    assert "| lr=0.0001,seed=2 | done | 0.0001 | 2 | 1.00 | 52.00 |" in text  # and every run below
    assert (tmp_path / "out" / "plot_optim.lr.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "plot_seed.png").exists()  # the seed is what the error bars average over


def test_a_configuration_with_one_finished_run_shows_no_spread(tmp_path):
    file = write_sweep(tmp_path, "base: [TINY]\ngrid: {optim.lr: [0.001, 0.01]}\nrepeats: 2\n")
    out = tmp_path / "out"
    (out / "lr=0.001,seed=0").mkdir(parents=True)
    (out / "sweep.yaml").write_text(file.read_text())
    (out / "lr=0.001,seed=0" / "DONE").write_text("")
    (out / "lr=0.001,seed=0" / "metrics.json").write_text('{"val/i2t_R@1": 12.5}')
    sweep.report(out)
    text = (out / "results.md").read_text()
    assert "| 0.001 | 1 |  | 12.50 |" in text and "| 0.01 | 0 |  |  |" in text


# --------------------------------------------------------------------------------------------------
# One GPU group per concurrent run


def test_device_slots_are_disjoint_groups():
    assert sweep.device_slots("0,1,2,3", 2, 2) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert sweep.device_slots([4, 6], 1, 1) == [{"CUDA_VISIBLE_DEVICES": "4"}]
    with pytest.raises(ConfigError, match=r"gpus: 2 is ambiguous; list GPU ids \(\[2\] or \"2\" for GPU 2"):
        sweep.device_slots(2, None, 1)
    assert sweep.device_slots("none", 1, 3) == [{}, {}, {}]
    # by default the GPUs are shared evenly: one run keeps them all, as a plain `vlm-lab fit` would
    assert sweep.device_slots("0,1,2,3", None, 1) == [{"CUDA_VISIBLE_DEVICES": "0,1,2,3"}]
    assert sweep.device_slots("0,1,2,3,4", None, 2) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    with pytest.raises(ConfigError, match=r"--max-parallel 3 needs 3 groups of 2 GPU\(s\), and GPUs 0,1,2,3 make 2"):
        sweep.device_slots("0,1,2,3", 2, 3)
    for bad in ("0,0", "cuda:0", True, [0, None]):
        with pytest.raises(ConfigError, match="gpus should be auto, none or distinct GPU ids"):
            sweep.device_slots(bad, 1, 1)
    with pytest.raises(ConfigError, match="devices_per_run should be an integer of at least 1"):
        sweep.device_slots("0", 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_auto_on_a_machine_without_gpus_assigns_nothing():
    assert sweep.device_slots("auto", 1, 2) == [{}, {}]


def test_concurrent_local_runs_never_share_a_gpu(tmp_path):
    file = write_sweep(tmp_path, "base: [TINY]\ngrid: {optim.lr: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4, 5.0e-4, 6.0e-4]}\n"
                                 "gpus: [0, 1, 2, 3]\n")  # from YAML
    runner = RecordingRunner(parallel=4)
    outcomes = sweep.run(file, tmp_path / "out", max_parallel=4, runner=runner)
    assert [o.status for o in outcomes] == ["done"] * 6
    assert runner.overlapped and runner.clashes == []
    assert {env["CUDA_VISIBLE_DEVICES"] for env in runner.envs.values()} <= {"0", "1", "2", "3"}
    # the argument wins over the file: two runs of two GPUs each
    runner = RecordingRunner(parallel=2)
    sweep.run(file, tmp_path / "out2", max_parallel=2, gpus="4,5,6,7", devices_per_run=2, runner=runner)
    assert {env["CUDA_VISIBLE_DEVICES"] for env in runner.envs.values()} == {"4,5", "6,7"} and runner.clashes == []


def test_too_many_parallel_runs_for_the_gpus_from_the_command_line(tmp_path, capsys):
    file = write_sweep(tmp_path, "base: [TINY]\ngrid: {seed: [1, 2, 3]}\n")
    assert main(["sweep", str(file), "--out", str(tmp_path / "out"), "--gpus", "0,1", "--max-parallel", "3"]) == 2
    assert "vlm-lab: error: --max-parallel 3 needs 3 groups of 1 GPU(s), and GPUs 0,1 make 2" in capsys.readouterr().err


@dataclass(frozen=True)
class PrintDevices(sweep.Run):
    """A run whose process prints the GPUs it was given, instead of training."""

    def command(self, run_dir, resume):
        return [sys.executable, "-c", "import os; print('devices:', os.environ['CUDA_VISIBLE_DEVICES'])"]


def test_run_one_hands_the_environment_to_the_run_process(tmp_path):
    outcome = sweep.run_one(PrintDevices("r", (TINY,), ()), tmp_path / "r", {"CUDA_VISIBLE_DEVICES": "3"})
    assert outcome.status == "done"
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "starting r CUDA_VISIBLE_DEVICES=3" in log and "devices: 3" in log


# --------------------------------------------------------------------------------------------------
# Optuna


TPE = SEARCH.replace("trials: 5", "trials: 6\nsampler: tpe\nmetric: val/i2t_R@1\ndirection: maximize")


def test_tpe_asks_tells_continues_and_reports(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    file = write_sweep(tmp_path, TPE)
    out = tmp_path / "out"
    assert main(["sweep", str(file), "--out", str(out), "--dry-run"]) == 0
    assert "Optuna TPE (seed 7) over optim.lr ~ log_uniform[1e-05, 0.001]" in capsys.readouterr().out
    assert not out.exists()

    seen = []

    def runner(run_, run_dir, env):
        cfg = run_.config()  # the pruning callback travels as a config override the run's fit builds
        [pruning] = [c for c in cfg.callbacks if c.name == "optuna_pruning"]
        assert (pruning.trial, pruning.monitor, pruning.storage) == (int(run_.name.split("=")[1]), "val/i2t_R@1",
                                                                    f"sqlite:///{(out / 'optuna.db').resolve()}")
        registry.build("callback", dict(pruning))  # builds: finds its trial in the study
        seen.append(run_.name)
        return RecordingRunner()(run_, run_dir, env)

    study = None
    outcomes = sweep.run(file, out, runner=runner)
    assert [o.status for o in outcomes] == ["done"] * 6 and seen == [f"trial={i}" for i in range(6)]
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'optuna.db'}")
    values = {t.number: t.value for t in study.trials}
    assert values[0] == fake_metrics(sweep.Run("", (), tuple(f"{k}={v!r}" for k, v in study.trials[0].params.items())))[
        "val/i2t_R@1"]
    rows = {row["run"]: row for row in sweep.collect(out)}
    assert rows["trial=3"]["status"] == "done" and rows["trial=3"]["optim.lr"] == study.trials[3].params["optim.lr"]
    assert "| trial=5 | done |" in (out / "results.md").read_text()

    # Again, with room for two more trials: the six are kept, an interrupted one resumes, one is new.
    study.ask()  # trial 6: as if a sweep was killed while it ran
    file.write_text(file.read_text().replace("trials: 6", "trials: 8"))
    seen.clear()
    outcomes = sweep.run(file, out, runner=runner)
    assert seen == ["trial=6", "trial=7"] and [o.status for o in outcomes] == ["skipped"] * 6 + ["done", "done"]
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 8


def test_tpe_records_pruned_and_failed_trials(tmp_path):
    optuna = pytest.importorskip("optuna")
    from vlm_lab.callbacks import optuna_trial

    file = write_sweep(tmp_path, TPE.replace("trials: 6", "trials: 3"))
    out = tmp_path / "out"

    def runner(run_, run_dir, env):
        number = int(run_.name.split("=")[1])
        if number == 1:  # what the pruning callback does in the run's process
            optuna_trial(f"sqlite:///{out / 'optuna.db'}", "sweep", number).set_user_attr("pruned_at_epoch", 0)
        if number == 2:
            return sweep.Outcome(run_.name, "failed", 1.0, "ConfigError: boom")
        return RecordingRunner()(run_, run_dir, env)

    outcomes = sweep.run(file, out, runner=runner)
    assert [o.status for o in outcomes] == ["done", "pruned", "failed"]
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert [row["status"] for row in sweep.collect(out)] == ["done", "pruned", "failed"]


def test_the_pruning_callback_stops_a_trial_worse_than_the_median(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for value in (50.0, 60.0):  # two finished trials (the pruner's n_startup_trials)
        trial = study.ask()
        trial.report(value, step=0)
        study.tell(trial, value)
    metric = "val/i2t_R@1"
    for number, score, pruned in ((2, 10.0, True), (3, 70.0, False)):
        study.ask()
        callback = registry.build("callback", {"name": "optuna_pruning", "storage": storage, "study": "s",
                                               "trial": number, "monitor": metric})
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={metric: torch.tensor(score)},
                                  should_stop=False)
        callback.on_validation_end(trainer, SimpleNamespace(current_epoch=0))
        frozen = study.trials[number]
        assert trainer.should_stop is pruned and ("pruned_at_epoch" in frozen.user_attrs) is pruned
        assert frozen.intermediate_values == {0: score}


def test_tpe_without_optuna_installed_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ConfigError, match=r'sampler: tpe needs Optuna, which is not installed: pip install '
                                          r'"vlm-lab\[optuna\]"'):
        sweep.run(write_sweep(tmp_path, TPE), tmp_path / "out", runner=RecordingRunner())


@pytest.mark.slow
def test_tpe_sweep_trains_its_trials_with_the_pruning_callback(tmp_path):
    optuna = pytest.importorskip("optuna")
    file = write_sweep(tmp_path, "base: [TINY]\noverrides: [data.train_size=32, trainer.max_epochs=2]\n"
                                 "search: {optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}}\ntrials: 3\nseed: 0\n"
                                 "sampler: tpe\nmetric: val/i2t_R@1\n")
    assert main(["sweep", str(file), "--out", str(tmp_path / "out")]) == 0  # no trial failed
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    for trial in study.trials:  # the callback reported every validation of the run's process, up to a pruning
        assert set(trial.intermediate_values) == set(range(trial.user_attrs.get("pruned_at_epoch", 1) + 1))
        assert trial.state.name == ("PRUNED" if "pruned_at_epoch" in trial.user_attrs else "COMPLETE")
    assert (tmp_path / "out" / "plot_optim.lr.png").is_file()


def test_a_pruned_fit_stops_cleanly_after_its_validation(tmp_path):
    optuna = pytest.importorskip("optuna")
    import vlm_lab

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for _ in range(2):  # two trials no run can beat: R@1 is at most 100
        trial = study.ask()
        trial.report(100.0, step=0)
        study.tell(trial, 100.0)
    study.ask()
    pruning = {"name": "optuna_pruning", "storage": storage, "study": "s", "trial": 2, "monitor": "val/i2t_R@1"}
    cfg = vlm_lab.load_config(TINY, overrides=["trainer.max_epochs=3", "data.train_size=32",
                                                f"callbacks={json.dumps([pruning])}"])
    metrics = vlm_lab.fit(cfg, run_dir=tmp_path / "run")
    assert metrics["epoch"] == 0 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    frozen = study.trials[2]
    assert frozen.user_attrs == {"pruned_at_epoch": 0} and list(frozen.intermediate_values) == [0]
