import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_lab.cli import main

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
VLM_LAB = str(Path(sys.executable).parent / "vlm-lab")  # the installed console script


@pytest.mark.parametrize("argv, message", [
    ([TINY, "model.vision.name=clip_vt"], "unknown vision_tower 'clip_vt'. Did you mean 'clip_vit'"),
    ([TINY, "optim.lrr=0.1"], "unknown config key 'optim.lrr'. Did you mean 'lr'"),
    ([TINY, "optim.lr=fast"], "optim.lr='fast' should be a number"),
    ([TINY, "model.text.pooling=cls"], "pooling='cls' is not one of 'eot', 'argmax'"),
    (["missing.yaml"], "config file not found: missing.yaml"),
    ([TINY, "model.tokenizer.path=/nowhere"], "no tokenizer directory at /nowhere"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, capsys, tmp_path):
    assert main(["fit", *argv, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_checkpoint_path(capsys, tmp_path):
    assert main(["test", TINY, "ckpt_path=/no/such.ckpt", "--run-dir", str(tmp_path)]) == 2
    assert "no checkpoint file at /no/such.ckpt" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="clip_vt"):
        main(["--debug", "fit", TINY, "model.vision.name=clip_vt"])


def test_list_and_describe(capsys):
    assert main(["list", "clip_*"]) == 0
    out = capsys.readouterr().out
    assert "vision_tower:" in out and "clip_vit_tiny" in out and "card -> clip_vit" in out
    assert "text_tower:" in out and "clip_text" in out and "siglip" not in out
    assert main(["list", "--kind", "loss"]) == 0
    assert {"clip", "align", "siglip"} <= set(capsys.readouterr().out.split())
    assert main(["describe", "siglip"]) == 0
    assert "signature:" in capsys.readouterr().out
    assert main(["describe", "sigclip"]) == 2


@pytest.mark.slow
def test_console_script_fit_then_test(tmp_path):
    """The installed `vlm-lab` end to end: fit prints the table, test reads the checkpoint."""
    fit = subprocess.run([VLM_LAB, "fit", TINY, "--run-dir", str(tmp_path), "seed=1"],
                         capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "val/i2t_R@1" in fit.stdout and "chance" in fit.stdout
    assert "Tip:" not in fit.stdout + fit.stderr  # Lightning's advertising is switched off (vlm_lab/tracking.py)
    assert json.loads((tmp_path / "metrics.json").read_text())["val/i2t_R@1"] >= 0
    assert "seed: 1" in (tmp_path / "config.yaml").read_text()

    test = subprocess.run([VLM_LAB, "test", TINY, f"ckpt_path={tmp_path}/checkpoints/last.ckpt",
                           "--run-dir", str(tmp_path / "test")], capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stderr[-2000:]
    assert "test/i2t_R@1" in test.stdout


@pytest.mark.slow
def test_console_script_bad_input_has_no_traceback(tmp_path):
    run = subprocess.run([VLM_LAB, "fit", TINY, "data.batchsize=4"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Did you mean 'batch_size'" in run.stderr


def test_run_logged_runs_the_command_in_cwd_with_its_output_in_the_log(tmp_path):
    """The helper experiments' scripts chain commands with: relative paths are ``cwd``'s, the one-line
    error lands in the log (made with its folder), and the exit status comes back."""
    from vlm_lab.cli import command_line, run_logged

    assert command_line("list")[:3] == [sys.executable, "-m", "vlm_lab.cli"]
    log = tmp_path / "logs" / "check.log"
    assert run_logged(["check", "tiny.yaml", "data.batchsize=4"], log, cwd=Path(TINY).parent) == 2
    (line,) = log.read_text().strip().splitlines()
    assert line.startswith("vlm-lab: error: datamodule 'synthetic_shapes' has no argument 'batchsize'. ")
