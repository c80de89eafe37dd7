"""A run killed in the middle of an epoch resumes from its latest step checkpoint exactly.

For each data module: ``vlm-lab fit`` with step checkpoints, SIGKILLed one step after a step
checkpoint in its second epoch (``tests/kill_at_step.py``), then ``--resume``: the final weights
equal the uninterrupted run's (<= 1e-6) and so does ``metrics.json``. Also: the step-checkpoint
settings, keep-N, a kill during a checkpoint write, and the loaders' own skip (no training).
See docs/explanation/resume.md.

Importing torch and Lightning is most of a tiny fit's time, so the one-process cases resume in this
process (``vlm_lab.cli.main``: the killed run's files are all it shares with it) and the cases that
differ only in how loader workers hand batches over (``data.worker_slots``) share one uninterrupted
run (``uninterrupted`` fixture), which must then be the same run whatever the hand-over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from datasets_on_disk import TINY_IMAGES, jpeg_bytes, write_shard
from vlm_lab import cli, registry
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer

HERE = Path(__file__).parent
TINY = HERE / "configs" / "tiny.yaml"
KILL_AT_STEP = HERE / "kill_at_step.py"
TIMEOUT = 900  # seconds; a fit takes a few on an idle machine, minutes on one busy with other training

# Two epochs of 8 steps; a step checkpoint every 3 steps; the kill comes when step 14 starts, so step
# 13 (the fifth of epoch 1) is lost and the resumed run starts from the checkpoint of step 12.
STEPS = ["trainer.max_epochs=2", "optim.lr=0.002", "checkpoint.every_n_steps=3", "checkpoint.keep=2"]
KILL = "callbacks=[{name: kill_at_step, step: 13}]"


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def start(run_dir: Path, overrides: list[str], *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``vlm-lab fit`` (through the helper that knows kill_at_step) as a child process."""
    return subprocess.Popen([sys.executable, str(KILL_AT_STEP), "fit", str(TINY), "--run-dir", str(run_dir),
                             *STEPS, *overrides, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env or child_env())


def finish(child: subprocess.Popen, expected: int = 0) -> str:
    """Wait for ``child`` and check its exit status (``-signal.SIGKILL``: killed so); returns its stderr."""
    _, err = child.communicate(timeout=TIMEOUT)
    assert child.returncode == expected, err[-3000:]
    return err


@contextmanager
def reaped() -> Iterator[list[subprocess.Popen]]:
    """A list for the test's child processes: those still running when the block ends (a failed check) are killed."""
    children: list[subprocess.Popen] = []
    try:
        yield children
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = final_weights(resumed), final_weights(uninterrupted)
    assert a.keys() == b.keys()
    worst = max((x.double() - b[k].double()).abs().max().item() for k, x in a.items() if x.is_floating_point())
    assert worst <= 1e-6, worst
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics == json.loads((uninterrupted / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["step"]) == (1, 16)


class UninterruptedRuns:
    """``vlm-lab fit`` runs that nothing interrupts, one per list of overrides, each started by the first
    test that needs it (running beside that test's killed run) and compared with by every later one.
    A context manager: runs still going at its end (a test failed before it waited) are killed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[tuple[str, ...], tuple[Path, subprocess.Popen]] = {}

    def __enter__(self) -> UninterruptedRuns:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for _, child in self.runs.values():
            if child.poll() is None:
                child.kill()
                child.wait()

    def start(self, overrides: list[str]) -> None:
        if tuple(overrides) not in self.runs:
            run_dir = self.root / f"run{len(self.runs)}"
            self.runs[tuple(overrides)] = run_dir, start(run_dir, overrides)

    def finished(self, overrides: list[str]) -> Path:
        """The run directory of the run of ``overrides`` (started before), once it has ended well."""
        run_dir, child = self.runs[tuple(overrides)]
        if child.returncode is None:
            finish(child)
        assert child.returncode == 0, f"the uninterrupted run in {run_dir} failed: see the test that started it"
        return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Iterator[UninterruptedRuns]:
    """The shared uninterrupted runs of one test module (tests/test_preemption.py imports it for its own)."""
    with UninterruptedRuns(tmp_path_factory.mktemp("uninterrupted")) as runs:
        yield runs


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    """A folder for the data on disk that cases sharing an uninterrupted run read (the same files)."""
    return tmp_path_factory.mktemp("data")


def resume_here(run_dir: Path, overrides: list[str]) -> None:
    """``vlm-lab fit --resume`` in this process (a fresh one would import torch and Lightning again)."""
    assert cli.main(["fit", str(TINY), "--run-dir", str(run_dir), *STEPS, *overrides, "--resume", "--debug"]) == 0


def kill_and_resume(tmp_path: Path, overrides: list[str], uninterrupted: UninterruptedRuns | None = None,
                    reference: list[str] | None = None) -> None:
    """The uninterrupted run beside the killed one; then the resume; then the comparison.

    With ``uninterrupted``, the uninterrupted run is the one of ``reference`` (default: ``overrides``)
    there, shared with other tests, and the resume runs in this process; else both are processes of
    their own (a run on several processes: Lightning's launcher starts the others from the command).
    """
    killed_dir = tmp_path / "killed"
    with reaped() as children:
        if uninterrupted is None:
            children.append(start(tmp_path / "uninterrupted", overrides))
        else:
            uninterrupted.start(reference or overrides)
        killed = start(killed_dir, overrides, KILL)
        children.append(killed)
        finish(killed, -signal.SIGKILL)
        checkpoints = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
        assert checkpoints == ["epoch000.ckpt", "last.ckpt", "step0000009.ckpt", "step0000012.ckpt"], checkpoints
        if uninterrupted is None:
            children.append(start(killed_dir, overrides, "--resume"))
            finish(children[-1])
            finish(children[0])
            reference_dir = tmp_path / "uninterrupted"
        else:
            resume_here(killed_dir, overrides)
            reference_dir = uninterrupted.finished(reference or overrides)
    assert_same_run(killed_dir, reference_dir)


# --------------------------------------------------------------------------------------------------
# Data on disk: 64 small JPEGs with 4 captions each, as COCO annotations, a caption table and shards.
# COCO files and shards already in the folder are kept: cases that share a run read the same files.


def coco_files(folder: Path, count: int = 64) -> tuple[str, str]:
    if not (folder / "captions.json").is_file():  # written last
        folder.mkdir(parents=True, exist_ok=True)
        images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(count)]
        for i in range(count):
            (folder / f"{i}.jpg").write_bytes(jpeg_bytes((4 * i, 100, 250 - 3 * i), size=(48, 40)))
        annotations = [{"image_id": i, "caption": f"image {i} caption {c}"} for i in range(count) for c in range(4)]
        (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(folder / "captions.json"), str(folder)


def table_file(folder: Path, count: int = 64) -> str:
    coco_files(folder, count)
    (folder / "captions.tsv").write_text("".join(f"{i}.jpg\timage {i} caption\n" for i in range(count)))
    return str(folder / "captions.tsv")


def shard_files(folder: Path, shards: int = 2, count: int = 64) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    per = count // shards
    for s in range(shards):
        if (folder / f"{s:05d}.tar").is_file():
            continue
        write_shard(folder / f"{s:05d}.tar", [
            {"__key__": f"{i:09d}", "jpg": jpeg_bytes((4 * i, 100, 250 - 3 * i), size=(48, 40)), "txt": f"image {i}",
             "json": json.dumps({"captions": [f"image {i} caption {c}" for c in range(4)]})}
            for i in range(s * per, (s + 1) * per)])
    return str(folder / ("{00000..%05d}.tar" % (shards - 1)))


def hf_files(folder: Path, shards: int, count: int = 64) -> str:
    """A ``datasets`` dataset of the same pictures, captions as a list: a ``save_to_disk`` folder with a
    train and a validation split (map-style reads it without preparing a cache), and the train split
    again as ``shards`` Parquet files (a stream's shards) beside it. Returns the folder."""
    from datasets import Dataset, DatasetDict, Features, Image, List, Value

    features = Features({"image": Image(), "caption": List(Value("string"))})
    rows = [{"image": {"bytes": jpeg_bytes((4 * i, 100, 250 - 3 * i), size=(48, 40)), "path": f"{i}.jpg"},
             "caption": [f"image {i} caption {c}" for c in range(4)]} for i in range(count)]
    train, validation = Dataset.from_list(rows, features=features), Dataset.from_list(rows[:16], features=features)
    DatasetDict({"train": train, "validation": validation}).save_to_disk(str(folder / "saved"))
    (folder / "parquet").mkdir()
    per = count // shards
    for s in range(shards):
        file = folder / "parquet" / f"train-{s:05d}-of-{shards:05d}.parquet"
        train.select(range(s * per, (s + 1) * per)).to_parquet(str(file))
    validation.to_parquet(str(folder / "parquet" / "validation-00000-of-00001.parquet"))
    return str(folder)


def data_overrides(tmp_path: Path, layout: str, workers: int, slots: int, processes: int = 1) -> list[str]:
    """Overrides for 8 training steps per epoch, batches of 8, on ``processes`` gloo processes."""
    common = [f"data.num_workers={workers}", "data.batch_size=8"]
    if processes > 1:  # Lightning's own launcher: this process becomes rank 0 and starts the others
        common += [f"trainer.devices={processes}", "trainer.strategy=ddp"]
    if layout == "synthetic_shapes":
        return [f"data.train_size={64 * processes}", *common]
    common += [f"data.worker_slots={slots}", "data.augment=true"]
    if layout == "coco_captions":
        ann, images = coco_files(tmp_path / "data", 64 * processes)
        return ["data.name=coco_captions", f"data.train_ann={ann}", f"data.train_images={images}",
                f"data.val_ann={ann}", f"data.val_images={images}", *common]
    if layout == "cc3m_table":
        table = table_file(tmp_path / "data")
        return ["data.name=cc3m", f"data.train_table={table}", f"data.val_table={table}", *common]
    if layout in ("hf_dataset", "hf_dataset_streaming"):  # streaming: one Parquet file per reader
        folder = hf_files(tmp_path / "data", shards=processes * max(workers, 1), count=64 * processes)
        if layout == "hf_dataset":
            return ["data.name=hf_dataset", f"data.path={folder}/saved", "data.test_split=null", *common]
        return ["data.name=hf_dataset", f"data.path={folder}/parquet", "data.test_split=null", "data.streaming=true",
                "data.shuffle_buffer=8", *common]
    if layout == "resampled_mixture":  # two weighted sources, drawn with replacement: 64 samples an epoch per rank
        first = shard_files(tmp_path / "first", shards=2, count=32)
        second = shard_files(tmp_path / "second", shards=2, count=32)
        sources = (f"[{{name: first, shards: '{first}', weight: 0.3}}, "
                   f"{{name: second, shards: '{second}', weight: 0.7}}]")
        return ["data.name=cc3m", f"data.train_sources={sources}", "data.resampled=true",
                f"data.train_samples={64 * processes}", f"data.val_shards={first}", "data.shuffle_buffer=8", *common]
    # Shards spread over ranks x workers: two per reader with 2 processes x 2 workers.
    shards = shard_files(tmp_path / "data", shards=2 * processes * processes, count=64 * processes)
    return ["data.name=cc3m", f"data.train_shards={shards}", f"data.val_shards={shards}", "data.shuffle_buffer=8",
            *common]


# How loader workers hand batches over (data.worker_slots: shared-memory slots, or 0: PyTorch's way) changes
# nothing in a run: the cases that differ only there resume to the uninterrupted run of slots 4.
REFERENCE_SLOTS = 4


# Synthetic shapes without loader workers: the CoCa case below (the same data and CLIP loss, and a caption
# head) and tests/test_preemption.py (a SLURM requeue) resume that run.
@pytest.mark.slow
@pytest.mark.parametrize("layout, workers, slots", [
    ("synthetic_shapes", 2, 0),
    ("coco_captions", 0, 0),
    ("coco_captions", 2, 4),  # loader workers hand pixels over in shared-memory slots
    ("coco_captions", 2, 0),  # ... or as PyTorch does
    ("cc3m_table", 2, 4),
    ("cc3m_shards", 0, 0),
    ("cc3m_shards", 2, 4),
    ("cc3m_shards", 2, 0),
    ("hf_dataset", 2, 4),
    ("hf_dataset_streaming", 2, 4),
    ("resampled_mixture", 2, 4),
])
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, shared_data, uninterrupted, layout, workers, slots):
    data = shared_data / f"{layout}-{workers}-workers"
    overrides = data_overrides(data, layout, workers, slots)
    shared = workers > 0 and slots != REFERENCE_SLOTS
    reference = data_overrides(data, layout, workers, REFERENCE_SLOTS) if shared else None
    kill_and_resume(tmp_path, overrides, uninterrupted, reference)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact_with_coca_decoder_dropout(tmp_path, uninterrupted):
    # The decoder's dropout masks come from torch's stream, reseeded before every step (vlm_lab/seeding.py).
    coca = ["model.caption_weight=1.0", "model.caption_head.layers=1", "model.caption_head.heads=2",
            "model.caption_head.image_queries=4", "model.caption_head.dropout=0.2"]
    kill_and_resume(tmp_path, data_overrides(tmp_path, "synthetic_shapes", 0, 0) + coca, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["cc3m_shards", "coco_captions", "resampled_mixture"])
def test_sigkill_mid_epoch_then_resume_is_exact_on_two_processes(tmp_path, layout):
    # Two gloo processes x two loader workers; map-style data goes through Lightning's DistributedSampler.
    kill_and_resume(tmp_path, data_overrides(tmp_path, layout, 2, 4, processes=2))


# --------------------------------------------------------------------------------------------------
# The loaders' skip, without training: a pass resumed after k batches gives the uninterrupted pass's
# batches from k on, with the same pixels (crops) and captions.


def batches(loader) -> list[tuple]:
    return [(b["image_ids"].tolist(), b["captions"], b["pixel_values"]) for b in loader]


@pytest.mark.parametrize("layout, workers", [("coco_captions", 0), ("coco_captions", 2), ("cc3m_shards", 0),
                                             ("cc3m_shards", 2), ("cc3m_shards", 3)])
@pytest.mark.parametrize("done", [1, 3, 5])
def test_a_resumed_pass_gives_the_rest_of_the_uninterrupted_one(tmp_path, layout, workers, done):
    if layout == "coco_captions":
        ann, images = coco_files(tmp_path / "data", 40)
        spec = {"name": layout, "train_ann": ann, "train_images": images}
    else:  # three shards: with 2 or 3 workers the readers' batch counts differ
        spec = {"name": "cc3m", "train_shards": shard_files(tmp_path / "data", shards=3, count=42), "shuffle_buffer": 4}
    tokenizer = load_tokenizer(None)

    def datamodule():
        return registry.build("datamodule", {**spec, "batch_size": 4, "num_workers": workers, "augment": True},
                              tokenizer=tokenizer, image_config=TINY_IMAGES, max_length=32)

    whole = batches(datamodule().train_dataloader())
    resumed = datamodule()
    resumed.load_state_dict({"next_epoch": 0, "batches_done": done})
    rest = batches(resumed.train_dataloader())
    assert len(rest) == len(whole) - done
    for (ids, captions, pixels), (ids_again, captions_again, pixels_again) in zip(whole[done:], rest, strict=True):
        assert ids == ids_again and captions == captions_again
        assert torch.equal(pixels, pixels_again)


# ``every_n_minutes`` without waiting: 1e-9 minutes is 0 s at timedelta's resolution (a microsecond), an
# interval every step outlasts however fast the machine, so the time trigger fires after every step.
EVERY_STEP_BY_TIME = "checkpoint.every_n_minutes=1e-9"


@pytest.mark.slow
@pytest.mark.parametrize("every_n_steps, kept", [
    (0, ["step0000015-timed.ckpt", "step0000016-timed.ckpt"]),
    # Both triggers: each keeps its own newest 2, under its own names, though both fired at step 15.
    (3, ["step0000012.ckpt", "step0000015-timed.ckpt", "step0000015.ckpt", "step0000016-timed.ckpt"]),
])
def test_every_n_minutes_writes_step_checkpoints(tmp_path, every_n_steps, kept):
    import vlm_lab

    cfg = vlm_lab.load_config(TINY, overrides=[*STEPS, *data_overrides(tmp_path, "synthetic_shapes", 0, 0),
                                               f"checkpoint.every_n_steps={every_n_steps}", EVERY_STEP_BY_TIME])
    vlm_lab.fit(cfg, run_dir=tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(["epoch001.ckpt", "last.ckpt", *kept])
    for name in kept:  # each file holds the step its name says
        step = int(name[4:11])
        assert torch.load(checkpoints / name, map_location="cpu", weights_only=False)["global_step"] == step


def test_checkpoint_settings_are_checked():
    import vlm_lab

    for override, message in (("checkpoint.every_n_steps=-1", "every_n_steps=-1"), ("checkpoint.keep=0", "keep=0"),
                              ("checkpoint.every_n_step=5", "every_n_steps")):
        with pytest.raises(ConfigError, match=message):
            vlm_lab.load_config(TINY, overrides=[override])
