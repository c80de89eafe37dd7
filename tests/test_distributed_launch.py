"""Multi-process training through the real launchers, on CPU, with the unchanged tiny YAML.

Two 2-process fits run side by side: one under ``torchrun`` (the path to SLURM and multi-node
clusters) and one through Lightning's own launcher (``trainer.devices=2``, which re-runs the command
in a child process). Both must agree on one run directory, shard the data (2 steps instead of the
4 one process takes) and report the validation metrics that one process computes from the saved
checkpoint. The rest checks how the launchers' environment variables are read, without processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlm_lab
from vlm_lab import api
from vlm_lab.distributed import RUN_DIR_ENV, launch_run_id, launcher_layout, share_run_dir
from vlm_lab.errors import ConfigError

TINY_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
LAUNCHES = {
    # torchrun fixes the process layout; the YAML names no devices, strategy or nodes.
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "vlm_lab.cli", "fit", str(TINY_CONFIG)],
    # Lightning's subprocess launcher: the process started here becomes rank 0 and starts rank 1.
    "lightning": [sys.executable, "-m", "vlm_lab.cli", "fit", str(TINY_CONFIG),
                  "trainer.devices=2", "trainer.strategy=ddp"],
}
# What launchers set; the tests start from an environment without any (even when run under SLURM).
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE",
                      "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", RUN_DIR_ENV)


def _is_launcher_variable(name: str) -> bool:
    return name in LAUNCHER_VARIABLES or name.startswith("SLURM_")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run both launches at once (each in its own working directory); {name: its runs/tiny folder}."""
    env = {k: v for k, v in os.environ.items() if not _is_launcher_variable(k)}
    env["PYTHONPATH"] = os.pathsep.join([str(TINY_CONFIG.parents[2]), env.get("PYTHONPATH", "")])
    procs, folders = {}, {}
    for name, command in LAUNCHES.items():
        cwd = tmp_path_factory.mktemp(name)
        procs[name] = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        folders[name] = cwd / "runs" / "tiny"
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} launch failed:\n{output.decode()[-4000:]}"
        procs[name] = output.decode()
    return folders, procs


@pytest.mark.parametrize("launcher", list(LAUNCHES))
@pytest.mark.slow
def test_two_process_fit_is_consistent_with_one_process(launched, launcher, tmp_path):
    folders, outputs = launched
    run_dirs = list(folders[launcher].iterdir())
    # Both processes wrote into one run directory (a clock-named one per process would make two).
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert run_dir.name.startswith("torchrun-") if launcher == "torchrun" else run_dir.name[:8].isdigit()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 64 training images, 16 per process and step: 2 steps with 2 processes (one process takes 4).
    assert metrics["step"] == 2 and metrics["epoch"] == 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # The retrieval table is printed by rank 0 only.
    assert outputs[launcher].count("val/i2t_R@1 ") == 1

    # One process evaluating the saved weights on the whole validation split finds the same numbers:
    # the two ranks' features were gathered, de-duplicated and scored as one set.
    cfg = vlm_lab.load_config(TINY_CONFIG)
    single = vlm_lab.validate(cfg, ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"), run_dir=tmp_path)
    assert metrics["val/loss"] == pytest.approx(single["val/loss"], abs=1e-5)
    for key in [k for k in single if "R@" in k]:
        assert metrics[key] == pytest.approx(single[key], abs=1e-4), key


# --------------------------------------------------------------------------------------------------
# What the launchers tell a process (environment variables), read without starting any


@pytest.fixture
def clean_env(monkeypatch):
    for name in [n for n in os.environ if _is_launcher_variable(n)]:
        monkeypatch.delenv(name)
    return monkeypatch


def _torchrun(env, world=4, per_node=2, run_id="abc"):
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0", "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(per_node), "TORCHELASTIC_RUN_ID": run_id}.items():
        env.setenv(key, value)


def _slurm(env, tasks=8, nodes=2):
    for key, value in {"SLURM_NTASKS": str(tasks), "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "4242",
                       "SLURM_NTASKS_PER_NODE": str(tasks // nodes),
                       "SLURM_JOB_NAME": "train", "SLURM_PROCID": "3"}.items():
        env.setenv(key, value)


def test_no_launcher_means_one_process(clean_env):
    assert launcher_layout() is None and launch_run_id() is None


def test_torchrun_layout_and_run_id(clean_env):
    _torchrun(clean_env)
    assert launcher_layout() == (2, 2)  # 2 processes per node, 4 in all
    assert launch_run_id() == "torchrun-abc"


def test_torchrun_without_rendezvous_id_asks_for_a_run_dir(clean_env):
    _torchrun(clean_env, run_id="none")  # torchrun's value when neither --rdzv-id nor --standalone is given
    with pytest.raises(ConfigError, match="--run-dir"):
        launch_run_id()


def test_slurm_layout_and_run_id(clean_env):
    _slurm(clean_env)
    assert launcher_layout() == (4, 2)
    assert launch_run_id() == "slurm-4242"


def test_interactive_slurm_is_no_launcher(clean_env):
    _slurm(clean_env)
    clean_env.setenv("SLURM_JOB_NAME", "bash")  # salloc + a shell: Lightning's rule
    assert launcher_layout() is None and launch_run_id() is None


def test_trainer_takes_devices_and_nodes_from_the_launcher(clean_env, tiny_config, tmp_path):
    _slurm(clean_env, tasks=2, nodes=1)
    for key, value in {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}.items():
        clean_env.setenv(key, value)
    trainer = api.build_trainer(tiny_config, tmp_path)  # tiny.yaml names no devices and no nodes
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size, trainer.global_rank) == (2, 1, 2, 1)


def test_run_dir_shared_with_launched_children(clean_env, tiny_config, tmp_path):
    own = api._run_dir(tiny_config, None, resume=False)
    assert own.parent == Path("runs") / "tiny" and own.name[:8].isdigit()
    with share_run_dir(tmp_path / "chosen"):
        # What a child that Lightning starts inside trainer.fit sees.
        assert api._run_dir(tiny_config, None, resume=False) == tmp_path / "chosen"
        assert api._run_dir(tiny_config, tmp_path / "explicit", resume=False) == tmp_path / "explicit"
    assert RUN_DIR_ENV not in os.environ  # a later run in the same notebook picks its own


def test_run_dir_named_after_the_launch(clean_env, tiny_config):
    _slurm(clean_env)
    assert api._run_dir(tiny_config, None, resume=False) == Path("runs") / "tiny" / "slurm-4242"
