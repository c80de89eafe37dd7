"""Failure modes: non-finite losses, import paths, and configs mutated at random."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlm_lab
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def fast_run(tmp_path, *overrides):
    cfg = vlm_lab.load_config(TINY, overrides=["trainer.max_steps=2", "trainer.limit_val_batches=0", *overrides])
    module = vlm_lab.build_module(cfg)
    module.loss.forward = lambda image, text: (image.sum() + text.sum()) * float("nan")
    trainer = vlm_lab.build_trainer(cfg, tmp_path)
    return module, trainer, vlm_lab.build_datamodule(cfg, module)


def test_nonfinite_loss_stops_the_run_with_a_clear_message(tmp_path):
    module, trainer, data = fast_run(tmp_path)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 0 .*optim.nonfinite_loss=skip"):
        trainer.fit(module, datamodule=data)


@pytest.mark.slow
def test_nonfinite_loss_can_skip_the_step(tmp_path):
    module, trainer, data = fast_run(tmp_path, "optim.nonfinite_loss=skip")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=data)
    assert module.skipped_nonfinite_steps == 2
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # no update happened


def test_nonfinite_setting_is_checked():
    with pytest.raises(ConfigError, match=r"optim.nonfinite_loss='skp' is not one of 'error', 'skip'.*'skip'"):
        vlm_lab.load_config(TINY, overrides=["optim.nonfinite_loss=skp"])


def test_import_paths_need_an_explicit_opt_in(clean_registry):
    override = ["model.vision_head.name=vlm_lab.heads:MLPHead"]
    with pytest.raises(ConfigError, match="looks like an import path.*--allow-import-paths"):
        vlm_lab.load_config(TINY, overrides=override)
    cfg = vlm_lab.load_config(TINY, overrides=override, allow_import_paths=True)
    module = vlm_lab.build_module(cfg)
    assert type(module.vision_head).__name__ == "MLPHead"


def test_check_command(capsys):
    assert main(["check", str(TINY)]) == 0
    assert "config OK: tiny builds a" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Property test: whatever a config file is mutated into, `vlm-lab check` either accepts it or fails
# with one clean line, never a traceback, never a hang.

BASE = yaml.safe_load(TINY.read_text())
BAD_VALUES = [None, "abc", "", -1, 0, 1.5, True, [], {}, [1, "x"], {"name": "clip_vit"}, {"x": 1}, "1e-3"]


def leaf_paths(node, prefix=()):
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from leaf_paths(value, prefix + (key,))


PATHS = list(leaf_paths(BASE))


@st.composite
def mutated_configs(draw):
    config = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = config
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        action = draw(st.sampled_from(["delete", "typo", "value"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "typo":
            key = path[-1]
            cut = draw(st.integers(0, len(key) - 1))
            parent[key[:cut] + key[cut + 1:] + draw(st.sampled_from(["", "s", "_"]))] = parent.pop(key)
        else:
            parent[path[-1]] = draw(st.sampled_from(BAD_VALUES))
    return config


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=mutated_configs())
@pytest.mark.slow
def test_mutated_configs_fail_cleanly(config, tmp_path, capsys):
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["check", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:
        assert err.strip() == "" or "error" not in err
    else:
        assert code in (1, 2)
        lines = [line for line in err.splitlines() if line.startswith("vlm-lab: error:")]
        assert len(lines) == 1, err
