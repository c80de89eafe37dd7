"""``checkpoint.monitor`` / ``checkpoint.mode``: a run keeps its best checkpoint by a validation metric.

``checkpoints/best.ckpt`` holds the epoch whose metric was best (checked against the per-epoch values
the CSV logger wrote), for max and min; a misspelt metric is one line at the end of the first
validation, naming the closest; the settings are checked when the config is read.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import vlm_lab
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def _validation_values(run_dir: Path, metric: str) -> dict[int, float]:
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        return {int(row["epoch"]): float(row[metric]) for row in csv.DictReader(f) if row.get(metric)}


@pytest.mark.parametrize("monitor, mode", [("val/i2t_R@1", "max"), ("val/loss", "min")])
def test_best_checkpoint_holds_the_best_epoch(tmp_path, monitor, mode):
    cfg = vlm_lab.load_config(TINY, overrides=[f"checkpoint.monitor={monitor}", f"checkpoint.mode={mode}",
                                                "trainer.max_epochs=4", "optim.lr=3e-3"])
    vlm_lab.fit(cfg, run_dir=tmp_path)
    values = _validation_values(tmp_path, monitor)
    assert sorted(values) == [0, 1, 2, 3] and len(set(values.values())) > 1  # the metric moved
    pick = max if mode == "max" else min
    best_epoch = [epoch for epoch, value in values.items() if value == pick(values.values())][0]  # the first best
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == best_epoch
    (state,) = [v for k, v in best["callbacks"].items() if f"'monitor': '{monitor}'" in k]
    assert float(state["best_model_score"]) == pytest.approx(values[best_epoch], rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("best*")) == ["best.ckpt"]  # one kept


def test_a_misspelt_metric_is_one_line_after_the_first_validation(tmp_path, capsys):
    assert main(["fit", str(TINY), "checkpoint.monitor=val/i2t_R@l", "checkpoint.mode=max",
                 "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "checkpoint.monitor='val/i2t_R@l' is not a metric this run logs; validation logs " in err
    assert "val/loss" in err and "Did you mean" in err and "'val/i2t_R@1'" in err


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint.monitor=val/i2t_R@1"], "checkpoint.monitor='val/i2t_R@1' needs checkpoint.mode: max"),
    (["checkpoint.mode=min"], "checkpoint.mode='min' is set but checkpoint.monitor is not"),
    (["checkpoint.monitor=val/loss", "checkpoint.mode=smallest"], "checkpoint.mode='smallest'"),
])
def test_settings_are_checked_when_read(overrides, message):
    with pytest.raises(ConfigError, match=message):
        vlm_lab.load_config(TINY, overrides=overrides)


def test_yaml_sets_it_and_without_it_no_best_checkpoint(tmp_path):
    (tmp_path / "best.yaml").write_text("checkpoint:\n  monitor: val/t2i_R@1\n  mode: max\n")
    assert vlm_lab.load_config(TINY, tmp_path / "best.yaml").checkpoint.monitor == "val/t2i_R@1"
    vlm_lab.fit(vlm_lab.load_config(TINY), run_dir=tmp_path / "plain")
    assert not list((tmp_path / "plain" / "checkpoints").glob("best*"))
