import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import vlm_lab
from vlm_lab import sweep
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
ROOT = Path(__file__).resolve().parents[1]
LIT = ROOT / "experiments" / "lit"
LIT_VARIANTS = ["locked_both_floor", "locked_image_scratch_text", "locked_image_pretrained_text",
                "tuned_image_scratch_text", "tuned_image_tuned_text", "scratch_both"]


def write_sweep(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text.replace("TINY", TINY))
    return path


def test_grid_is_a_cartesian_product_with_derived_names(tmp_path):
    file = write_sweep(tmp_path, """
base: [TINY]
overrides: [trainer.max_epochs=1]
grid:
  optim.lr: [0.001, 0.0003]
  model.embed_dim: [8, 16, 32]
""")
    runs = sweep.expand(file)
    assert len(runs) == 6
    assert runs[0].name == "lr=0.001,embed_dim=8" and runs[-1].name == "lr=0.0003,embed_dim=32"
    assert runs[0].overrides == ("trainer.max_epochs=1", "optim.lr=0.001", "model.embed_dim=8")
    assert runs[0].swept == {"optim.lr": 0.001, "model.embed_dim": 8}
    assert all(r.base == (str(Path(TINY).resolve()),) for r in runs)


def test_grid_values_written_without_a_dot_are_numbers(tmp_path):
    # 1e-3 is a number in a sweep file as in a config file (vlm_lab/yaml_text.py), so the run is named
    # and overridden exactly like one written 1.0e-3
    dotless = sweep.expand(write_sweep(tmp_path, "base: [TINY]\ngrid: {optim.lr: [1e-3, 3e-4]}\n", "a.yaml"))
    dotted = sweep.expand(write_sweep(tmp_path, "base: [TINY]\ngrid: {optim.lr: [1.0e-3, 3.0e-4]}\n", "b.yaml"))
    assert [r.swept for r in dotless] == [r.swept for r in dotted] == [{"optim.lr": 1e-3}, {"optim.lr": 3e-4}]
    assert [r.name for r in dotless] == [r.name for r in dotted] == ["lr=0.001", "lr=0.0003"]


def test_explicit_runs_cross_the_grid_and_names_stay_unique(tmp_path):
    file = write_sweep(tmp_path, """
base: [TINY]
runs:
  - [model.loss.name=clip]
  - [model.loss.name=siglip]
grid:
  model.vision.layers: [1, 2]
  model.text.layers: [1, 2]
""")
    runs = sweep.expand(file)
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    # "layers" alone would be ambiguous between the towers, so those two keep their full names
    assert runs[0].name == "name=clip,model.vision.layers=1,model.text.layers=1"


def test_runs_alone(tmp_path):
    file = write_sweep(tmp_path, "base: [TINY]\nruns:\n  - [seed=1]\n  - [seed=2, optim.lr=0.01]\n")
    assert [r.name for r in sweep.expand(file)] == ["seed=1", "seed=2,lr=0.01"]


def test_runs_layer_their_own_config_files_and_are_named_after_them(tmp_path):
    (tmp_path / "wide.yaml").write_text("model: {embed_dim: 32}\n")
    (tmp_path / "deep.yaml").write_text("model: {vision: {layers: 2}}\n")
    file = write_sweep(tmp_path, """
base: [TINY]
runs:
  - {configs: [wide.yaml]}
  - {configs: [wide.yaml, deep.yaml], overrides: [optim.lr=0.01]}
  - [optim.lr=0.02]
grid: {seed: [1, 2]}
""")
    runs = sweep.expand(file)
    assert [r.name for r in runs] == ["wide,seed=1", "wide,seed=2", "wide+deep,lr=0.01,seed=1",
                                      "wide+deep,lr=0.01,seed=2", "lr=0.02,seed=1", "lr=0.02,seed=2"]
    assert runs[2].configs == (str(tmp_path / "wide.yaml"), str(tmp_path / "deep.yaml"))
    assert runs[2].overrides == ("optim.lr=0.01", "seed=1") and runs[4].configs == ()
    assert runs[2].swept == {"configs": "wide+deep", "optim.lr": "0.01", "seed": 1}
    cfg = runs[2].config()  # base, then the run's files in order, then its overrides
    assert (cfg.model.embed_dim, cfg.model.vision.layers, cfg.optim.lr, cfg.seed) == (32, 2, 0.01, 1)
    assert runs[4].config().model.embed_dim == vlm_lab.load_config(TINY).model.embed_dim
    command = runs[2].command(tmp_path / "run", resume=False)
    assert command[command.index("fit") + 1:][:3] == [str(Path(TINY).resolve()), *runs[2].configs]


def test_lit_ablation_sweep_is_the_six_variants_on_the_headline_recipe_and_its_dev_split():
    runs = sweep.expand(ROOT / "experiments" / "sweeps" / "lit_ablation.yaml")
    assert [r.name for r in runs] == LIT_VARIANTS
    configs = {r.name: r.config() for r in runs}
    for name, cfg in configs.items():
        expected = vlm_lab.load_config(LIT / "flickr8k_lit.yaml", LIT / "dev_split.yaml", LIT / f"{name}.yaml")
        assert OmegaConf.to_container(cfg) == OmegaConf.to_container(expected), name
        assert cfg.name == name
    # the variants really differ where the ablation says they do
    locked = {name: (cfg.model.vision_lock.lock, cfg.model.text_lock.lock) for name, cfg in configs.items()}
    assert locked["locked_both_floor"] == (True, True) and locked["tuned_image_tuned_text"] == (False, False)
    assert configs["scratch_both"].model.text.name == "clip_text"


def test_lit_ablation_dry_run_from_the_command_line(capsys):
    file = ROOT / "experiments" / "sweeps" / "lit_ablation.yaml"
    assert main(["sweep", str(file), "--out", str(ROOT / "runs" / "no-such-sweep"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in LIT_VARIANTS:
        assert f"{name}  [to run]" in printed
        assert f"flickr8k_lit.yaml {LIT / 'dev_split.yaml'} {LIT / name}.yaml" in printed
    assert not (ROOT / "runs" / "no-such-sweep").exists()


def test_a_report_reads_run_directories_that_results_py_wrote(tmp_path, monkeypatch):
    # experiments/lit/results.py marks a finished variant with an empty DONE; the sweep shares its folders
    monkeypatch.chdir(ROOT)  # the copied sweep.yaml's paths resolve from the working directory
    out = tmp_path / "lit"
    (out / "scratch_both").mkdir(parents=True)
    (out / "sweep.yaml").write_text((ROOT / "experiments" / "sweeps" / "lit_ablation.yaml").read_text())
    (out / "scratch_both" / "DONE").write_text("")
    (out / "scratch_both" / "metrics.json").write_text('{"val/i2t_R@1": 12.5}')
    rows = {row["run"]: row for row in sweep.collect(out)}
    assert rows["scratch_both"]["status"] == "done" and rows["scratch_both"]["seconds"] is None
    assert rows["scratch_both"]["configs"] == "scratch_both" and rows["scratch_both"]["val/i2t_R@1"] == 12.5
    assert rows["locked_both_floor"]["status"] == "not started"
    sweep.report(out)
    assert "| scratch_both | done | scratch_both |  | 12.50 |" in (out / "results.md").read_text()


@pytest.mark.parametrize("text, message", [
    ("base: [TINY]\ngrd: {seed: [1]}\n", "unknown sweep key 'grd'. Did you mean 'grid'"),
    ("grid: {seed: [1]}\n", "'base' must list at least one config file"),
    ("base: [nowhere.yaml]\n", "base config 'nowhere.yaml' not found"),
    ("base: [TINY]\ngrid: {seed: 1}\n", "grid.seed should be a non-empty list"),
    ("base: [TINY]\nruns: [[seed]]\n", "should look like key=value"),
    ("base: [TINY]\nruns: [{config: [a.yaml]}]\n", "unknown key 'config' in a 'runs' entry. Did you mean 'configs'"),
    ("base: [TINY]\nruns: [{configs: [nowhere.yaml]}]\n", "runs config 'nowhere.yaml' not found"),
    ("base: [TINY]\nruns: [{}]\n", "names neither configs nor overrides"),
])
def test_bad_sweep_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        sweep.expand(write_sweep(tmp_path, text))


@pytest.mark.slow
def test_sweep_runs_records_failures_skips_finished_and_reports(tmp_path, capsys):
    (tmp_path / "seed_two.yaml").write_text("seed: 2\n")
    file = write_sweep(tmp_path, """
base: [TINY]
overrides: [data.train_size=32]
runs:
  - [seed=1]
  - {configs: [seed_two.yaml]}
  - [optim.lr=fast]
""")
    out = tmp_path / "out"
    assert main(["sweep", str(file), "--out", str(out), "--max-parallel", "2"]) == 1  # one failed run
    assert (out / "seed=1" / "DONE").is_file() and (out / "seed_two" / "DONE").is_file()
    assert "seed: 2" in (out / "seed_two" / "config.yaml").read_text()  # the run's own file was layered
    failed = (out / "lr=fast" / "FAILED").read_text()
    assert "exit code: 2" in failed and "optim.lr='fast' should be a number" in failed
    for name in ("seed=1", "seed_two"):
        assert (out / name / "config.yaml").is_file() and (out / name / "checkpoints" / "last.ckpt").is_file()
        assert "val/i2t_R@1" in json.loads((out / name / "metrics.json").read_text())

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert rows[0]["seed"] == "1" and float(rows[0]["val/i2t_R@1"]) >= 0
    assert "| run | status |" in (out / "results.md").read_text()
    assert (out / "plot_seed.png").stat().st_size > 1000 and (out / "training_curves.png").is_file()

    # Again: finished runs are skipped, the failed one is retried (and fails again).
    first_done = (out / "seed=1" / "DONE").read_text()
    capsys.readouterr()
    assert main(["sweep", str(file), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "skipped  seed=1" in printed and "failed  lr=fast" in printed
    assert (out / "seed=1" / "DONE").read_text() == first_done

    (out / "results.csv").unlink()
    assert main(["sweep-report", str(out)]) == 0
    assert (out / "results.csv").is_file()


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    file = write_sweep(tmp_path, "base: [TINY]\noverrides: [trainer.max_epochs=2]\nruns: [[seed=0]]\n")
    run_dir = tmp_path / "out" / "seed=0"
    vlm_lab.fit(vlm_lab.load_config(TINY), run_dir=run_dir)  # "killed" after its first epoch: no DONE
    assert not (run_dir / "DONE").exists()
    [outcome] = sweep.run(file, tmp_path / "out")
    assert outcome.status == "done"
    assert "resuming seed=0" in (run_dir / "log.txt").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["step"] == 8  # continued to 2 epochs of 4 steps


@pytest.mark.slow
def test_slurm_launcher_through_submitit_local_executor(tmp_path):
    file = write_sweep(tmp_path, "base: [TINY]\noverrides: [data.train_size=32]\nruns: [[seed=3]]\n"
                                 "slurm: {timeout_min: 10}\n")
    [outcome] = sweep.run(file, tmp_path / "out", launcher="slurm", slurm_cluster="local")
    assert outcome.status == "done", outcome.error
    assert (tmp_path / "out" / "seed=3" / "DONE").is_file()
    assert any((tmp_path / "out" / ".submitit").iterdir())  # went through submitit


def test_dry_run_lists_without_running(tmp_path, capsys):
    file = write_sweep(tmp_path, "base: [TINY]\ngrid: {seed: [1, 2]}\n")
    assert main(["sweep", str(file), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "seed=1  [to run]" in printed and "vlm-lab fit" in printed
    assert not (tmp_path / "out").exists()


def test_shipped_sweeps_expand():
    for file in Path(__file__).resolve().parents[1].glob("experiments/sweeps/*.yaml"):
        assert sweep.expand(file), file
