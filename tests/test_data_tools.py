"""``vlm-lab data convert`` (COCO -> img2dataset shards) and ``vlm-lab data inspect``."""

import collections
import hashlib
import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from datasets_on_disk import CC12M_SHARD, COCO_MINI, FLICKR8K, TINY_IMAGES, needs_shared
from vlm_lab.cli import main
from vlm_lab.data.cc3m import CC3MDataModule
from vlm_lab.data.coco import read_coco_captions
from vlm_lab.data.convert import coco_to_shards
from vlm_lab.tokenizer import load_tokenizer

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
VAL_ANN = COCO_MINI / "annotations" / "captions_val2017.json"


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def coco_pairs():
    """(image bytes digest, caption) for every caption of the coco-mini val split."""
    return collections.Counter((digest(Path(r.path).read_bytes()), c)
                               for r in read_coco_captions(VAL_ANN, COCO_MINI / "val2017") for c in r.captions)


def shard_samples(out):
    return list(wds.tarfile_samples([{"url": str(p)} for p in sorted(Path(out).glob("*.tar"))]))


@needs_shared
def test_convert_round_trip_gives_back_the_same_pairs(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "convert", "--ann", str(VAL_ANN), "--images", str(COCO_MINI / "val2017"),
                 "--out", str(out), "--shard-size", "100"]) == 0
    assert "wrote 395 samples in 4 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        f"0000{i}{suffix}" for i in range(4) for suffix in (".tar", "_stats.json")]
    stats = [json.loads((out / f"0000{i}_stats.json").read_text()) for i in range(4)]
    assert [s["successes"] for s in stats] == [100, 100, 100, 95]
    samples = shard_samples(out)
    assert collections.Counter((digest(s["jpg"]), s["txt"].decode()) for s in samples) == coco_pairs()
    assert samples[0]["__key__"] == "0000000" and samples[-1]["__key__"] == "0000394"  # img2dataset keys


@needs_shared
def test_convert_per_image_keeps_every_caption_for_retrieval(tmp_path):
    out = tmp_path / "shards"
    report = coco_to_shards(VAL_ANN, COCO_MINI / "val2017", out, per="image", shard_size=40)
    assert report.samples == 79 and len(report.shards) == 2
    pairs = collections.Counter((digest(s["jpg"]), c) for s in shard_samples(out)
                                for c in json.loads(s["json"])["captions"])
    assert pairs == coco_pairs()
    # Streamed back by the cc3m module, each image comes once with its five captions.
    dm = CC3MDataModule(load_tokenizer(None), TINY_IMAGES, 32, val_shards=str(out / "{00000..00001}.tar"),
                        eval_batch_size=16)
    assert dm.split_summary("val") == {"images": 79, "captions": None, "shards": 2}
    batches = list(dm.val_dataloader())
    ids = [i for b in batches for i in b["image_ids"].tolist()]
    assert len(ids) == len(set(ids)) == 79
    assert sum(len(b["text_image_index"]) for b in batches) == 395


def test_convert_reports_missing_images_and_bad_arguments(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.jpg"}],
           "annotations": [{"image_id": 1, "caption": "a red square"}, {"image_id": 2, "caption": "lost"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    report = coco_to_shards(tmp_path / "ann.json", images, tmp_path / "out")
    assert report.samples == 1 and report.skipped == {"missing image": 1}
    (sample,) = shard_samples(tmp_path / "out")
    assert Image.open(io.BytesIO(sample["png"])).size == (8, 8)  # stored as it was
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert stats["count"] == 2 and stats["successes"] == 1 and stats["failed_to_download"] == 1
    assert main(["data", "convert", "--ann", str(tmp_path / "nope.json"), "--images", str(images),
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"vlm-lab: error: --ann: no captions file at {tmp_path / 'nope.json'}"


@needs_shared
def test_inspect_prints_counts_lengths_samples_and_saves_a_grid(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", TINY, "data.name=coco_captions",
                 f"data.val_ann={FLICKR8K / 'annotations' / 'captions_val.json'}",
                 f"data.val_images={FLICKR8K / 'images'}", "--split", "val", "--samples", "6", "--limit", "200",
                 "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "val: images: 1000, captions: 5000" in out
    assert "caption length over the first 200 images' 1000 captions:" in out
    assert "words:  mean" in out and "longer than max_length=32" in out
    assert out.count("\n  [") == 6  # six samples, each with its five captions
    assert Image.open(grid).size == (4 * 200, 2 * (200 + 4 * 14))


@needs_shared
def test_inspect_a_shard(tmp_path, capsys):
    assert main(["data", "inspect", TINY, "data.name=cc3m", f"data.train_shards={CC12M_SHARD}",
                 "--grid", str(tmp_path / "g.png"), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: images: 32, captions: unknown, shards: 1" in out
    assert "over all 32 captions" in out
    assert "- Red Square is a city square in Moscow, Russia." in out  # the first sample in the tar


def test_inspect_needs_a_caption_data_module(capsys):
    assert main(["data", "inspect", TINY]) == 2
    assert "works with image-caption data modules" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["coco", "flickr8k", "cc3m"])
def test_data_experiments_are_valid_configs(name):
    import vlm_lab

    cfg = vlm_lab.load_config(ROOT / "experiments" / f"{name}.yaml")
    assert cfg.data.name == ("cc3m" if name == "cc3m" else "coco_captions")


@needs_shared
def test_flickr8k_experiment_reads_the_shared_data(monkeypatch):
    import vlm_lab

    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root, like every experiment's
    cfg = vlm_lab.load_config("experiments/flickr8k.yaml", overrides=["data.num_workers=0", "data.batch_size=4"])
    dm = vlm_lab.build_datamodule(cfg, vlm_lab.build_module(cfg))
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and len(batch["input_ids"]) == 20
