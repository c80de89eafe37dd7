"""Dirty data and wrong schemas (docs/explanation/reliability.md).

Datasets with 5% broken samples in each layout (COCO captions JSON, a cc3m caption table, a
webdataset shard) train for an epoch through `vlm-lab fit`, and every broken sample planted is
skipped, counted in `train/bad_samples` / `val/bad_samples` and named by reason in the log. A file
whose JSON has the wrong shape stops the run at once with one line naming the file and the field.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from datasets_on_disk import TINY_IMAGES, jpeg_bytes, truncated_jpeg, write_shard
from vlm_lab.cli import main
from vlm_lab.data.cc3m import CC3MDataModule
from vlm_lab.data.coco import CocoCaptionsDataModule
from vlm_lab.tokenizer import load_tokenizer

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
NOT_UTF8 = b"a caf\xe9 in latin-1 \xff"
LONG = " ".join(["a very long caption"] * 2000)  # 8,000 words: kept, cut by the tokenizer


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i % 256, 91 * i % 256, 53 * i % 256)


def write_coco(folder: Path, count: int, broken: dict[int, str]) -> tuple[str, str]:
    """A COCO captions file over ``count`` images, one caption each, entries ``broken`` spoilt as named."""
    images = folder / "images"
    images.mkdir(parents=True)
    entries, annotations = [], []
    for i in range(count):
        name, image_id, caption, annotation_id = f"{i:05d}.jpg", i, f"picture number {i}", i
        kind = broken.get(i)
        if kind != "missing file":
            (images / name).write_bytes(truncated_jpeg() if kind == "truncated jpeg" else jpeg_bytes(colour(i)))
        caption = {"empty caption": "", "whitespace caption": " \t \n ", "long caption": LONG,
                   "non-utf8 caption": "@NOT_UTF8@"}.get(kind, caption)
        if kind == "duplicate image id":
            image_id = i - 1  # the earlier entry keeps the id and its captions
        if kind == "duplicate annotation id":
            annotation_id = i - 1  # a second caption of its own image with a repeated annotation id
        entries.append({"id": image_id, "file_name": name})
        if kind != "duplicate image id":
            annotations.append({"id": annotation_id, "image_id": image_id, "caption": caption})
    text = json.dumps({"images": entries, "annotations": annotations}).encode()
    ann = folder / "captions.json"
    ann.write_bytes(text.replace(b"@NOT_UTF8@", NOT_UTF8))
    return str(ann), str(images)


# 5% of 160 training and of 40 validation images. Of the 8 training ones, a very long caption and a
# repeated annotation id are kept; the other 6 are skipped.
COCO_TRAIN = {3: "truncated jpeg", 17: "missing file", 31: "empty caption", 45: "whitespace caption",
              59: "non-utf8 caption", 73: "duplicate image id", 87: "long caption", 101: "duplicate annotation id"}
COCO_TRAIN_SKIPPED = {"missing image": 1, "undecodable image": 1, "empty caption": 2, "undecodable caption": 1,
                      "duplicate id": 1}  # in the order the log names them
COCO_VAL = {5: "truncated jpeg", 22: "non-utf8 caption"}


def write_table(folder: Path, count: int, broken: dict[int, str]) -> str:
    """A ``filepath<TAB>caption`` table over ``count`` images, rows ``broken`` spoilt as named."""
    folder.mkdir(parents=True)
    rows = [b"filepath\tcaption"]
    for i in range(count):
        name, caption, kind = f"{i:05d}.jpg", f"table picture {i}".encode(), broken.get(i)
        if kind != "missing file":
            (folder / name).write_bytes(truncated_jpeg() if kind == "truncated jpeg" else jpeg_bytes(colour(i)))
        caption = {"empty caption": b"", "whitespace caption": b"   ", "long caption": LONG.encode(),
                   "non-utf8 caption": NOT_UTF8}.get(kind, caption)
        rows.append(name.encode() + b"\t" + caption)
    (folder / "pairs.tsv").write_bytes(b"\n".join(rows) + b"\n")
    return str(folder / "pairs.tsv")


TABLE_VAL = {2: "truncated jpeg", 9: "missing file", 13: "whitespace caption", 30: "non-utf8 caption",
             33: "long caption"}
TABLE_VAL_SKIPPED = 4


def write_dirty_shard(path: Path, count: int, broken: dict[int, str]) -> None:
    samples = []
    for i in range(count):
        sample = {"__key__": f"{i:09d}", "jpg": jpeg_bytes(colour(i)), "txt": f"shard picture {i}",
                  "json": json.dumps({"key": f"{i:09d}", "status": "success"})}
        kind = broken.get(i)
        if kind == "non-utf8 txt":
            sample["txt"] = NOT_UTF8
        elif kind == "missing txt":
            del sample["txt"]
        elif kind == "truncated jpg":
            sample["jpg"] = truncated_jpeg()
        elif kind == "long caption":
            sample["txt"] = LONG
        samples.append(sample)
    write_shard(path, samples)  # the stats file counts all of them, as img2dataset's does


SHARD_TRAIN = {4: "non-utf8 txt", 21: "missing txt", 38: "truncated jpg", 55: "non-utf8 txt", 70: "long caption"}
SHARD_TRAIN_SKIPPED = {"undecodable image": 1, "missing caption": 1, "undecodable caption": 2}  # log order


def logged(run_dir: Path, key: str) -> list[float]:
    rows = list(csv.DictReader(open(next((run_dir / "logs").glob("version_*/metrics.csv")))))
    return [float(r[key]) for r in rows if r.get(key)]


def fit_one_epoch(run_dir: Path, *overrides: str) -> None:
    code = main(["fit", TINY, "--run-dir", str(run_dir), "trainer.max_epochs=1", "data.batch_size=16",
                 "data.eval_batch_size=16", *overrides])
    assert code == 0


def skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "bad sample(s)" in r.getMessage()]


@pytest.mark.slow
def test_dirty_coco_dataset_trains_and_counts_every_broken_sample(tmp_path, caplog):
    train_ann, train_images = write_coco(tmp_path / "train", 160, COCO_TRAIN)
    val_ann, val_images = write_coco(tmp_path / "val", 40, COCO_VAL)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="vlm_lab.data.health"):
        fit_one_epoch(run, "data.name=coco_captions", f"data.train_ann={train_ann}", f"data.train_images={train_images}",
                      f"data.val_ann={val_ann}", f"data.val_images={val_images}")
    assert logged(run, "train/bad_samples") == [6.0]
    assert logged(run, "val/bad_samples") == [2.0]
    assert json.loads((run / "metrics.json").read_text())["val/bad_samples"] == 2
    reasons = ", ".join(f"{reason}: {n}" for reason, n in COCO_TRAIN_SKIPPED.items())
    assert f"train epoch 0: skipped 6 bad sample(s) ({reasons})" in skip_lines(caplog)
    assert "val epoch 0: skipped 2 bad sample(s) (undecodable image: 1, undecodable caption: 1)" in skip_lines(caplog)


def test_what_is_kept_of_dirty_coco_entries(tmp_path):
    ann, images = write_coco(tmp_path, 160, COCO_TRAIN)
    tokenizer = load_tokenizer(None)
    dm = CocoCaptionsDataModule(tokenizer, TINY_IMAGES, 32, val_ann=ann, val_images=images, batch_size=4)
    records = dm.records("val")
    assert len(records) == 160 and [r.duplicate for r in records].count(True) == 1
    assert records[101].captions == ("picture number 101",)  # a repeated annotation id is kept
    assert (records[73].image_id, records[73].duplicate, records[72].duplicate) == (72, True, False)
    batch = dm.collate("val")([dm.dataset("val")[87]])
    assert batch["captions"] == [LONG] and batch["input_ids"].shape == (1, 32)  # cut by the tokenizer


@pytest.mark.slow
def test_dirty_shard_and_table_train_and_count_every_broken_sample(tmp_path, caplog):
    # 5 of 80 (6%) in the shard, 5 of 80 in the table; one of each is a very long caption, which is kept.
    shards = tmp_path / "shards"
    shards.mkdir()
    write_dirty_shard(shards / "00000.tar", 80, SHARD_TRAIN)
    table = write_table(tmp_path / "table", 80, TABLE_VAL)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="vlm_lab.data.health"):
        fit_one_epoch(run, "data.name=cc3m", f"data.train_shards={shards / '00000.tar'}", f"data.val_table={table}",
                      "data.shuffle_buffer=8")
    assert logged(run, "train/bad_samples") == [4.0]
    assert logged(run, "val/bad_samples") == [float(TABLE_VAL_SKIPPED)]
    reasons = ", ".join(f"{reason}: {n}" for reason, n in SHARD_TRAIN_SKIPPED.items())
    assert f"train epoch 0: skipped 4 bad sample(s) ({reasons})" in skip_lines(caplog)
    assert "val epoch 0: skipped 4 bad sample(s) (missing image: 1, undecodable image: 1, empty caption: 1, " \
           "undecodable caption: 1)" in skip_lines(caplog)


# --------------------------------------------------------------------------------------------------
# Wrong JSON schema: one line naming the file and the field, exit status 2, no traceback.


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("vlm-lab: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("images, annotations, field", [
    ([{"id": 0, "file_name": "00000.jpg"}], [{"id": 1, "image_id": 0}, {"image_id": 0, "caption": "x"}, {}, {}],
     "annotations[0] has no 'caption' field"),
    ([{"id": 0, "file_name": "00000.jpg"}], [{"image_id": 0, "caption": "x"}, {"image_id": 0, "caption": None}],
     "annotations[1].caption should be a string, not null"),
    ([{"id": 0, "file_name": "00000.jpg"}, {"id": "7", "file_name": "x.jpg"}], [{"image_id": 0, "caption": "x"}],
     "images[1].id should be an integer, not \"7\""),
    ([{"id": 0, "file_name": "00000.jpg"}, ["x.jpg"]], [{"image_id": 0, "caption": "x"}],
     "images[1] should be an object with 'id', 'file_name'"),
    (None, [{"image_id": 0, "caption": "x"}], "has no 'images' field"),
])
def test_wrong_coco_schema_names_file_and_field(tmp_path, capsys, images, annotations, field):
    ann, folder = write_coco(tmp_path, 1, {})
    content = {"annotations": annotations} if images is None else {"images": images, "annotations": annotations}
    Path(ann).write_text(json.dumps(content))
    line = one_error_line(capsys, ["fit", TINY, "--run-dir", str(tmp_path / "run"), "data.name=coco_captions",
                                   f"data.train_ann={ann}", f"data.train_images={folder}"])
    assert ann in line and field in line


@pytest.mark.parametrize("stats, field", [
    ('{"count": 4}', "'successes' missing"),
    ('{"successes": "four"}', "'successes' should be a count (an integer >= 0), not \"four\""),
    ('{"successes": 4', "is not valid JSON"),
])
def test_wrong_stats_file_names_file_and_field(tmp_path, capsys, stats, field):
    write_dirty_shard(tmp_path / "00000.tar", 4, {})
    (tmp_path / "00000_stats.json").write_text(stats)
    shard = tmp_path / "00000.tar"
    line = one_error_line(capsys, ["fit", TINY, "--run-dir", str(tmp_path / "run"), "data.name=cc3m",
                                   f"data.train_shards={shard}", f"data.val_shards={shard}"])
    assert str(tmp_path / "00000_stats.json") in line and field in line


@pytest.mark.parametrize("workers", [0, 1])
def test_wrong_per_sample_json_names_shard_key_and_field(tmp_path, capsys, workers):
    samples = [{"__key__": f"{i:09d}", "jpg": jpeg_bytes(colour(i)), "txt": f"picture {i}",
                "json": json.dumps({"captions": [f"picture {i}"]})} for i in range(16)]
    samples[5]["json"] = json.dumps({"captions": "picture 5"})  # a string, not a list
    write_shard(tmp_path / "00000.tar", samples)
    shard = tmp_path / "00000.tar"
    line = one_error_line(capsys, ["fit", TINY, "--run-dir", str(tmp_path / "run"), "data.name=cc3m",
                                   f"data.train_shards={shard}", f"data.val_shards={shard}",
                                   f"data.num_workers={workers}", "data.batch_size=4"])
    # Read in a loader worker, the error reaches the command line as the same one line.
    assert line == (f"vlm-lab: error: {tmp_path / '00000.tar'}: 000000005.json field 'captions' should be a "
                    f"list of strings, not \"picture 5\"")


def test_a_member_repeated_in_a_shard_is_counted_and_the_first_kept(tmp_path):
    # A tar appended to twice can hold one sample's .txt twice in a row: webdataset refuses the second.
    members = []
    for i in range(4):
        members += [(f"{i:09d}.jpg", jpeg_bytes(colour(i))), (f"{i:09d}.txt", f"picture {i}".encode())]
    members.insert(4, ("000000001.txt", b"the same key and extension again"))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dm = CC3MDataModule(load_tokenizer(None), TINY_IMAGES, 32, val_shards=str(tmp_path / "00000.tar"), batch_size=4)
    batches = list(dm.val_dataloader())
    assert [i for b in batches for i in b["image_ids"].tolist()] == [0, 1, 2, 3]
    assert [c for b in batches for c in b["captions"]][1] == "picture 1"
    assert dm.bad_samples["val"].take() == {"unreadable shard data": 1}
