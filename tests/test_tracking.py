"""Tracking from YAML: loggers and callbacks by name, what is logged by default, the EMA of the weights,
and a console without Lightning's advertising."""

import csv
import json
import logging
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
import yaml

import vlm_lab
from vlm_lab.callbacks import EMA, GradientNorm, Throughput, build_callbacks
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError
from vlm_lab.tracking import LIGHTNING_CONSOLE_LOGGER, _DropTips, mlflow_metric_name, quiet_lightning_tips

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    [log] = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    return list(csv.DictReader(open(log)))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B writes only under tmp_path and says nothing."""
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_fit_writes_every_logger_and_each_holds_the_loss(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    cfg = vlm_lab.load_config(TINY, overrides=[
        "trainer.log_every_n_steps=1", "optim.lr_scale.vision=0.5",
        "loggers=[{name: csv}, {name: tensorboard}, {name: wandb, mode: offline}, {name: mlflow}]",
        "callbacks=[{name: throughput, window: 2}]"])  # replaces the default throughput (window 20 > 4 steps)
    vlm_lab.fit(cfg, run_dir=run_dir)

    # CSV: the loss, and what is logged by default: lr per parameter group, gradient norm, samples/s.
    rows = csv_rows(run_dir)
    losses = column(rows, "train/loss")
    assert len(losses) == 4
    assert column(rows, "train/lr/decay_x0.5") == pytest.approx([0.5 * lr for lr in column(rows, "train/lr/decay_x1")])
    assert {"train/lr/no_decay_x1", "train/lr/no_decay_x0.5", "train/logit_scale"} <= set(rows[0])
    norms = column(rows, "train/grad_norm/total")
    assert len(norms) == 4 and all(n > 0 for n in norms)
    parts = [column(rows, f"train/grad_norm/{part}") for part in ("vision", "text", "vision_head", "text_head", "loss")]
    assert norms == pytest.approx([sum(p[i] ** 2 for p in parts) ** 0.5 for i in range(4)], rel=1e-5)
    assert len(column(rows, "train/samples_per_sec")) == 3 and min(column(rows, "train/samples_per_sec")) > 0
    # ... and the resolved config as hyperparameters (the whole of it, not only model and optim).
    hparams = yaml.safe_load(next((run_dir / "logs").glob("version_*/hparams.yaml")).read_text())
    assert hparams["data"]["name"] == "synthetic_shapes" and hparams["loggers"][1] == {"name": "tensorboard"}

    # TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = (run_dir / "tensorboard").glob("version_0")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx(losses)
    assert "val/i2t_R@1" in accumulator.Tags()["scalars"]

    # MLflow: a file store in the run directory, the config as parameters.
    [run] = [p for p in (run_dir / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    logged = [float(line.split()[1]) for line in (run / "metrics" / "train" / "loss").read_text().splitlines()]
    assert logged == pytest.approx(losses)
    assert (run / "metrics" / "val" / mlflow_metric_name("i2t_R@1")).is_file()
    assert (run / "params" / "data" / "name").read_text() == "synthetic_shapes"

    # W&B, offline: the run file holds every logged loss (its records are protobuf; a value's JSON text
    # follows its key) and the config.
    [wandb_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = wandb_file.read_bytes()
    for loss in losses:
        assert b"train/loss\x82\x01" + bytes([len(json.dumps(loss))]) + json.dumps(loss).encode() in data
    assert b"synthetic_shapes" in data


def test_wandb_runs_are_finished_so_the_next_fit_gets_its_own(tmp_path, offline_wandb):
    import wandb

    overrides = ["loggers=[{name: wandb, mode: offline}]", "trainer.enable_checkpointing=false",
                 "trainer.limit_val_batches=0"]
    vlm_lab.fit(vlm_lab.load_config(TINY, overrides=overrides), run_dir=tmp_path / "a")
    assert wandb.run is None
    vlm_lab.fit(vlm_lab.load_config(TINY, overrides=overrides), run_dir=tmp_path / "b")
    assert len(list((tmp_path / "a" / "wandb").glob("offline-run-*"))) == 1
    assert len(list((tmp_path / "b" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("override, message", [
    ("loggers=[{name: tensorbord}]", "loggers[0]: unknown logger 'tensorbord'. Did you mean 'tensorboard'? "
                                     "Valid: csv, mlflow, tensorboard, wandb"),
    ("callbacks=[{name: emma}]", "callbacks[0]: unknown callback 'emma'. Did you mean 'ema'? "
                                 "Valid: early_stopping, ema, grad_norm, lr_monitor, optuna_pruning, throughput"),
    ("callbacks=[{name: ema}, {name: ema, decai: 0.9}]",
     "callbacks[1]: callback 'ema' has no argument 'decai'. Did you mean 'decay'? "
     "Valid arguments: decay, every_n_steps, start_step"),
    ("loggers=[{name: wandb, mode: ofline}]", "loggers[0]: logger 'wandb': argument mode='ofline' is not one of "
                                              "'online', 'offline', 'disabled'"),
    ("loggers=[{name: csv, run_dir: elsewhere}]", "logger 'csv': argument 'run_dir' is set by vlm-lab"),
    ("callbacks=[{name: early_stopping}]", "callback 'early_stopping' is missing required argument(s) monitor"),
    ("callbacks=[{name: early_stopping, monitor: val/loss, mode: maximum}]",
     "argument mode='maximum' is not one of 'min', 'max'"),
    ("default_callbacks=[grad_nrom]", "default_callbacks[0]: unknown callback 'grad_nrom'. Did you mean 'grad_norm'?"),
    ("loggers={name: csv}", "loggers={'name': 'csv'} should be a list"),
    ("trainer.logger=tensorboard", "trainer.logger='tensorboard' should be true or false"),
    ("callbacks=[{name: ema, decay: 1.5}]", "callback ema: decay=1.5 should be in [0, 1)"),
])
def test_a_bad_logger_or_callback_is_one_line_with_the_choices(override, message, tmp_path, capsys):
    assert main(["fit", TINY, override, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_defaults_are_replaced_by_the_same_callback_and_left_out_without_loggers():
    built = build_callbacks([{"name": "throughput", "window": 5}], ["lr_monitor", "grad_norm", "throughput"], True)
    assert [type(c).__name__ for c in built] == ["LearningRateMonitor", "GradientNorm", "Throughput"]
    assert built[-1].window == 5
    assert build_callbacks([{"name": "ema"}], ["lr_monitor", "grad_norm"], logging=False)[0].decay == 0.999
    with pytest.raises(ConfigError, match="lr_monitor writes to the loggers, and this run has none"):
        build_callbacks([{"name": "lr_monitor"}], [], logging=False)


def test_trainer_logger_false_turns_every_logger_and_the_default_callbacks_off(tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=["trainer.logger=false", "loggers=[{name: tensorboard}]"])
    trainer = vlm_lab.build_trainer(cfg, tmp_path)
    assert trainer.loggers == []
    assert not any(isinstance(c, (GradientNorm, Throughput)) for c in trainer.callbacks)
    trainer = vlm_lab.build_trainer(vlm_lab.load_config(TINY, overrides=["loggers=[]"]), tmp_path)
    assert trainer.loggers == [] and not any(isinstance(c, GradientNorm) for c in trainer.callbacks)
    trainer = vlm_lab.build_trainer(vlm_lab.load_config(TINY), tmp_path)
    assert [type(logger).__name__ for logger in trainer.loggers] == ["CSVLogger"]
    assert sum(isinstance(c, (GradientNorm, Throughput)) for c in trainer.callbacks) == 2


class CountBatches(L.Callback):
    """A user's callback: counts training batches, starting from ``start``."""

    def __init__(self, start: int = 0) -> None:
        self.count = start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.count += 1


def test_users_register_their_own_callback(clean_registry, tmp_path, capsys):
    vlm_lab.register_callback("count_batches", CountBatches)
    assert "count_batches" in vlm_lab.list_callbacks()
    cfg = vlm_lab.load_config(TINY, overrides=["callbacks=[{name: count_batches, start: 10}]",
                                               "trainer.limit_val_batches=0", "trainer.enable_checkpointing=false"])
    module = vlm_lab.build_module(cfg)
    trainer = vlm_lab.build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    [counter] = [c for c in trainer.callbacks if isinstance(c, CountBatches)]
    assert counter.count == 14
    with pytest.raises(ConfigError, match="has no argument 'begin'.* Valid arguments: start"):
        vlm_lab.load_config(TINY, overrides=["callbacks=[{name: count_batches, begin: 1}]"])
    assert main(["list", "--kind", "callback"]) == 0
    assert {"count_batches", "ema", "throughput"} <= set(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------------
# The EMA of the weights, first on a module small enough to follow by hand


class Line(L.LightningModule):
    """y = w x + b by SGD on fixed data; records the weights each validation step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(12, 2, generator=generator)
        return torch.utils.data.DataLoader(list(zip(x, x @ torch.tensor([[2.0], [-1.0]]) + 0.5)), batch_size=4)

    val_dataloader = train_dataloader


class RecordWeights(L.Callback):
    def __init__(self) -> None:
        self.after_step: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module):
        self.after_step.append(pl_module.layer.weight.detach().clone())  # the weights before any step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(pl_module.layer.weight.detach().clone())


def fit_line(tmp_path, max_epochs, ema, resume=False, val=True):
    torch.manual_seed(0)
    module, record = Line(), RecordWeights()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[record, ema, checkpoints], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1 if val else 0, accelerator="cpu")
    trainer.fit(module, ckpt_path=str(tmp_path / "last.ckpt") if resume else None)
    return module, record, torch.load(tmp_path / "last.ckpt", weights_only=True)


def test_ema_follows_its_formula_validates_on_the_average_and_saves_it(tmp_path):
    module, record, checkpoint = fit_line(tmp_path, max_epochs=2, ema=EMA(decay=0.6, every_n_steps=2, start_step=1))
    weights = record.after_step  # w0, then after steps 1..6
    expected = weights[0]
    averages = []
    for step in range(1, 7):
        if step <= 1:
            expected = weights[step]  # follows the weights until start_step
        elif (step - 1) % 2 == 0:
            expected = 0.6 * expected + 0.4 * weights[step]
        averages.append(expected)
    # Validation after each epoch (steps 3 and 6) ran on the average, and training went on from the raw weights.
    assert torch.allclose(module.seen_in_validation[0], averages[2])
    assert torch.allclose(module.seen_in_validation[1], averages[5])
    assert not torch.allclose(averages[2], weights[3])
    # The checkpoint's weights are the average, the raw ones beside them; the module ends on the average.
    assert torch.allclose(checkpoint["state_dict"]["layer.weight"], averages[5])
    assert torch.equal(checkpoint["current_model_state"]["layer.weight"], weights[6])
    assert torch.allclose(module.layer.weight, averages[5])
    assert checkpoint["callbacks"]["EMA"] == {"decay": 0.6, "updates": 2}


def test_resuming_keeps_the_average_and_the_raw_weights(tmp_path):
    _, _, straight = fit_line(tmp_path / "straight", max_epochs=3, ema=EMA(decay=0.7))
    _, _, first = fit_line(tmp_path / "resumed", max_epochs=1, ema=EMA(decay=0.7))
    _, record, resumed = fit_line(tmp_path / "resumed", max_epochs=3, ema=EMA(decay=0.7), resume=True)
    # Training went on from the raw weights, not from the average the checkpoint's state_dict holds.
    assert torch.equal(record.after_step[0], first["current_model_state"]["layer.weight"])
    assert not torch.allclose(first["state_dict"]["layer.weight"], first["current_model_state"]["layer.weight"])
    for key in ("state_dict", "current_model_state"):
        for name, tensor in straight[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    assert resumed["callbacks"]["EMA"]["updates"] == straight["callbacks"]["EMA"]["updates"] == 9


def test_ema_in_a_vlm_lab_fit_is_what_validation_test_and_export_see(tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=["callbacks=[{name: ema, decay: 0.5}]", "loggers=[]"])
    fitted = vlm_lab.fit(cfg, run_dir=tmp_path / "fit")
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert set(averaged) == set(raw)
    assert not torch.equal(averaged["text_head.proj.weight"], raw["text_head.proj.weight"])

    # `vlm-lab validate ckpt_path=...` loads the averaged weights: the same metrics as the fit's validation.
    validated = vlm_lab.validate(cfg, ckpt_path=str(ckpt), run_dir=tmp_path / "val")
    assert validated["val/loss"] == pytest.approx(fitted["val/loss"], abs=1e-6)
    # The raw weights give another loss, so the fit really validated the average.
    checkpoint["state_dict"] = raw
    torch.save(checkpoint, tmp_path / "raw.ckpt")
    assert vlm_lab.validate(cfg, ckpt_path=str(tmp_path / "raw.ckpt"), run_dir=tmp_path / "raw")["val/loss"] \
        != pytest.approx(fitted["val/loss"], abs=1e-6)

    from vlm_lab.interop.exporting import load_module

    exported = load_module(ckpt).state_dict()  # what `vlm-lab export` writes
    assert torch.equal(exported["text_head.proj.weight"], averaged["text_head.proj.weight"])


# --------------------------------------------------------------------------------------------------
# The console


def test_lightning_tips_are_dropped_and_its_other_lines_kept():
    console = logging.getLogger(LIGHTNING_CONSOLE_LOGGER)
    for f in [f for f in console.filters if isinstance(f, _DropTips)]:
        console.removeFilter(f)
    lines: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: lines.append(record.getMessage())
    console.addHandler(collect)
    try:
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
        assert any(line.startswith("💡 Tip:") for line in lines)  # Lightning still advertises: the filter has work
        lines.clear()
        quiet_lightning_tips()
        quiet_lightning_tips()
        assert sum(isinstance(f, _DropTips) for f in console.filters) == 1
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
        assert not any("Tip:" in line or "litlogger" in line for line in lines)
        assert any(line.startswith("GPU available") for line in lines)
    finally:
        console.removeHandler(collect)


def test_mlflow_metric_names_drop_what_mlflow_refuses():
    assert mlflow_metric_name("val/i2t_R@1") == "val/i2t_R1"
    assert mlflow_metric_name("train/lr/decay_x0.1") == "train/lr/decay_x0.1"
