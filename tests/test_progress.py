"""Progress on the long steps outside Lightning's loop, through vlm_lab/progress.py: shown on rank 0 when
someone watches (a terminal, or VLM_LAB_PROGRESS=always), silent otherwise."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

import vlm_lab
from vlm_lab import sweep
from vlm_lab.data.convert import coco_to_shards
from vlm_lab.errors import ConfigError
from vlm_lab.eval.zeroshot import ZeroShotEvaluator
from vlm_lab.progress import progress, shown

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def watched(monkeypatch):
    """Progress bars on although the test captures standard error (not a terminal)."""
    monkeypatch.setenv("VLM_LAB_PROGRESS", "always")
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(variable, raising=False)


def test_shown_on_a_terminal_of_rank_zero_only(monkeypatch):
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "VLM_LAB_PROGRESS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not shown()  # a log file or a pipe
    with progress(range(3), desc="quiet") as bar:
        list(bar)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert shown()
    with progress(range(3), desc="loud", unit="img") as bar:
        list(bar)
    assert "loud: 100%" in terminal.getvalue() and "3/3 " in terminal.getvalue()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not shown()  # another rank of a multi-process run
    monkeypatch.setenv("VLM_LAB_PROGRESS", "always")
    assert not shown()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("VLM_LAB_PROGRESS", "never")
    assert not shown()
    monkeypatch.setenv("VLM_LAB_PROGRESS", "sometimes")
    with pytest.raises(ConfigError, match="VLM_LAB_PROGRESS='sometimes' is not one of 'auto', 'always', 'never'"):
        shown()


def test_filling_the_embedding_cache_shows_progress(tmp_path, capsys, watched):
    cfg = vlm_lab.load_config(TINY, overrides=["model.vision_lock.lock=true", "trainer.enable_checkpointing=false",
                                               "loggers=[]"])
    vlm_lab.fit(cfg, run_dir=tmp_path)
    err = capsys.readouterr().err
    assert "embedding cache (train): 100%" in err and "64/64" in err
    assert "embedding cache (val): 100%" in err and "16/16" in err


def test_without_a_watcher_the_fill_says_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLM_LAB_PROGRESS", raising=False)
    cfg = vlm_lab.load_config(TINY, overrides=["model.vision_lock.lock=true", "trainer.enable_checkpointing=false",
                                               "loggers=[]", "trainer.limit_val_batches=0"])
    vlm_lab.fit(cfg, run_dir=tmp_path)
    assert "embedding cache" not in capsys.readouterr().err


def test_data_convert_shows_progress(tmp_path, capsys, watched):
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.jpg")
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)],
        "annotations": [{"image_id": i, "caption": f"photo {i} take {k}"} for i in range(3) for k in range(2)]}))
    report = coco_to_shards(ann, tmp_path / "images", tmp_path / "shards", shard_size=4)
    assert report.samples == 6
    err = capsys.readouterr().err
    assert "convert: 100%" in err and "6/6" in err


def test_zero_shot_shows_progress(tmp_path, capsys, watched):
    from test_zeroshot import COLOURS, ColourModel

    for name, rgb in COLOURS.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), rgb).save(tmp_path / name / "0.png")
    metrics = ZeroShotEvaluator(root=str(tmp_path), templates="simple", batch_size=2).evaluate(ColourModel())
    assert metrics["top1"] == 100.0
    err = capsys.readouterr().err
    assert "zero-shot classes: 100%" in err and "3/3" in err
    assert "zero-shot images: 100%" in err and "2/2" in err  # 3 images in batches of 2


def test_a_sweep_shows_runs_done_and_left(tmp_path, capsys, watched, monkeypatch):
    (tmp_path / "sweep.yaml").write_text(f"base: [{TINY}]\ngrid: {{seed: [1, 2, 3]}}\n")
    (tmp_path / "out" / "seed=1").mkdir(parents=True)
    (tmp_path / "out" / "seed=1" / sweep.DONE).write_text("{}\n")  # finished before
    outcomes = sweep.run(tmp_path / "sweep.yaml", tmp_path / "out",
                         runner=lambda run, run_dir, env: sweep.Outcome(run.name, "done", 0.1))
    assert [o.status for o in outcomes] == ["skipped", "done", "done"]
    err = capsys.readouterr().err
    assert "sweep (1 done before): 100%" in err and "2/2" in err and "seed=" in err
