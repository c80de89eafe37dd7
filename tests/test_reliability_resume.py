"""A run killed with SIGKILL in the middle of an epoch and resumed with ``--resume`` ends where an
uninterrupted run with the same seed ends (vlm_lab/seeding.py; docs/explanation/resume.md).

Three ``vlm-lab fit`` runs on the tiny config: one uninterrupted, one killed in its second epoch
(after the first epoch's checkpoint exists), each a process of its own, and ``--resume`` in the killed
run's directory, in this process (``vlm_lab.cli.main``: the killed run's files are all it shares with
it, and a fresh process would import torch and Lightning again, most of a tiny fit's time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets_on_disk import TINY_IMAGES, jpeg_bytes, write_shard
from vlm_lab import cli, registry
from vlm_lab.tokenizer import load_tokenizer

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
OVERRIDES = ["trainer.max_epochs=2", "data.train_size=128", "optim.lr=0.002"]  # two epochs of 8 steps
STEPS_PER_EPOCH = 8
TIMEOUT = 900  # seconds; a few on an idle machine, minutes on one busy with other training runs

# The run to kill is `vlm-lab fit` whose training step, once it reaches step KILL_AT of the second
# epoch, says so in a file and waits: the kill then lands mid-epoch however fast the machine is.
KILL_AT = 3
PAUSING_FIT = """
import sys, time
from pathlib import Path
from vlm_lab.cli import main
from vlm_lab.module import VisionLanguageModule

step = VisionLanguageModule.training_step
marker = Path(sys.argv[1])

def training_step(self, batch, batch_idx):
    if self.current_epoch == 1 and batch_idx == {kill_at}:
        marker.write_text(str(self.global_step))
        time.sleep(3600)
    return step(self, batch, batch_idx)

VisionLanguageModule.training_step = training_step
sys.exit(main(sys.argv[2:]))
""".format(kill_at=KILL_AT)


def fit_arguments(run_dir: Path, *extra: str) -> list[str]:
    return ["fit", str(TINY), "--run-dir", str(run_dir), *extra, *OVERRIDES]


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def start_fit(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlm_lab.cli", *fit_arguments(run_dir, *extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())


def finish_fit(child: subprocess.Popen, run_dir: Path) -> dict[str, float]:
    _, err = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 0, err[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def fit_and_kill_mid_epoch(run_dir: Path, timeout: float = TIMEOUT) -> int:
    """Start a fit, SIGKILL it at step KILL_AT of its second epoch; return the global step it was at."""
    marker = run_dir.parent / f"{run_dir.name}.paused"
    child = subprocess.Popen([sys.executable, "-c", PAUSING_FIT, str(marker), *fit_arguments(run_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    try:
        deadline = time.monotonic() + timeout
        while not marker.is_file():
            if child.poll() is not None:
                raise AssertionError(f"the fit ended before it was killed:\n{child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the fit did not reach its second epoch in time")
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        return int(marker.read_text())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    uninterrupted_run = start_fit(tmp_path / "uninterrupted")  # side by side with the one to kill
    try:
        killed = tmp_path / "killed"
        step = fit_and_kill_mid_epoch(killed)
        assert step == STEPS_PER_EPOCH + KILL_AT  # three steps into the second epoch
        checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
        assert checkpoints == ["epoch000.ckpt", "last.ckpt"], checkpoints  # only the first epoch's

        assert cli.main(fit_arguments(killed, "--resume", "--debug")) == 0
        resumed = json.loads((killed / "metrics.json").read_text())
        uninterrupted = finish_fit(uninterrupted_run, tmp_path / "uninterrupted")
    finally:
        if uninterrupted_run.poll() is None:
            uninterrupted_run.kill()
            uninterrupted_run.wait()
    assert (resumed["epoch"], resumed["step"]) == (uninterrupted["epoch"], uninterrupted["step"]) == (1, 16)
    keys = sorted(k for k in uninterrupted if k.startswith("val/"))
    assert "val/loss" in keys and "val/i2t_R@1" in keys
    for key in keys:
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-4), key
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["epoch001.ckpt", "last.ckpt"]


# --------------------------------------------------------------------------------------------------
# Loader workers: an epoch's shuffle, random crops and caption draws depend on (seed, epoch) only, so
# a data module that starts at epoch 1 (a resumed run's) gives the batches one that ran epoch 0 first
# gives its epoch 1, with workers started afresh (map-style) or kept alive (shard streams).


def captioned_images(folder: Path, count: int = 16) -> tuple[str, str]:
    folder.mkdir()
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(count)]
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes((15 * i, 100, 200 - 9 * i), size=(48, 40)))
    annotations = [{"image_id": i, "caption": f"image {i} caption {c}"} for i in range(count) for c in range(4)]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(folder / "captions.json"), str(folder)


def caption_shard(folder: Path, count: int = 16) -> str:
    folder.mkdir()
    write_shard(folder / "00000.tar", [
        {"__key__": f"{i:09d}", "jpg": jpeg_bytes((15 * i, 100, 200 - 9 * i), size=(48, 40)), "txt": f"image {i}",
         "json": json.dumps({"captions": [f"image {i} caption {c}" for c in range(4)]})} for i in range(count)])
    return str(folder / "00000.tar")


def one_pass(loader) -> list[tuple]:
    return [(b["image_ids"].tolist(), b["captions"], b["pixel_values"]) for b in loader]


# The shorthand, and a config with every kind of random draw timm's create_transform makes: crop,
# flips, RandAugment (Python's random), colour jitter, random erasing (torch's generator).
AUGMENTATIONS = {"shorthand": True,
                 "timm": {"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "hflip": 0.5,
                          "re_prob": 0.5, "re_mode": "pixel", "scale": [0.5, 1.0], "interpolation": "random"}}


@pytest.mark.parametrize("augment", list(AUGMENTATIONS))
@pytest.mark.parametrize("layout", ["coco_captions", "cc3m"])
def test_loader_workers_draw_by_seed_and_epoch_only(tmp_path, layout, augment):
    if layout == "coco_captions":
        ann, images = captioned_images(tmp_path / "data")
        spec = {"name": layout, "train_ann": ann, "train_images": images}
    else:
        spec = {"name": layout, "train_shards": caption_shard(tmp_path / "data"), "shuffle_buffer": 4}
    tokenizer = load_tokenizer(None)

    def datamodule(seed=0):
        return registry.build("datamodule", {**spec, "batch_size": 4, "num_workers": 2, "augment": AUGMENTATIONS[augment],
                                                "seed": seed},
                              tokenizer=tokenizer, image_config=TINY_IMAGES, max_length=32)

    whole_run = datamodule().train_dataloader()
    first, second = one_pass(whole_run), one_pass(whole_run)  # epochs 0 and 1, the same workers or fresh ones
    resumed = datamodule()
    resumed.set_epoch(1)
    again = one_pass(resumed.train_dataloader())
    for (ids, captions, pixels), (ids_again, captions_again, pixels_again) in zip(second, again, strict=True):
        assert ids == ids_again and captions == captions_again
        assert torch.equal(pixels, pixels_again)
    assert [b[1] for b in first] != [b[1] for b in second]  # a new epoch draws anew
    other_seed = one_pass(datamodule(seed=1).train_dataloader())
    assert [b[1] for b in other_seed] != [b[1] for b in first]
