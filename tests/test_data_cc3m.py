"""The cc3m data module: img2dataset shards streamed across ranks and workers, and caption tables."""

import collections
import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import vlm_lab
from datasets_on_disk import (CC12M_SHARD, TINY_IMAGES, good_samples, jpeg_bytes, needs_shared, truncated_jpeg,
                              write_shard)
from vlm_lab.data.cc3m import CC3MDataModule
from vlm_lab.data.shards import Portion, assign_shards
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
CC12M_KEYS = {1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 14, 15, 17, 18, 19, 20, 21, 22, 24, 25, 26, 27, 30, 31, 32, 33, 34,
              35, 36, 37, 38, 39}  # the 32 samples of the real shard (img2dataset keys, failed downloads missing)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def datamodule(tokenizer, **data):
    return CC3MDataModule(tokenizer, TINY_IMAGES, 32, **data)


def read_epoch(dm, split, world_size, epoch=0):
    """Every rank's batches of one epoch, each rank read through its own DataLoader."""
    per_rank = []
    for rank in range(world_size):
        stream = dm.stream(split, rank, world_size)
        stream.set_epoch(epoch)
        per_rank.append(list(DataLoader(stream, batch_size=None, num_workers=dm.num_workers)))
    return per_rank


def ids_of(batches):
    return [i for batch in batches for i in batch["image_ids"].tolist()]


@needs_shared
@pytest.mark.parametrize("split", ["train", "val"])
def test_real_shard_every_sample_once_with_two_workers_and_two_ranks(tokenizer, split):
    shard = str(CC12M_SHARD)
    dm = datamodule(tokenizer, train_shards=shard, val_shards=shard, batch_size=4, num_workers=2)
    assert dm.shard_counts(split) == [32]  # no stats file beside it: counted from the tar
    per_rank = read_epoch(dm, split, world_size=2)
    seen = ids_of(per_rank[0]) + ids_of(per_rank[1])
    assert sorted(seen) == sorted(CC12M_KEYS)  # each exactly once: no duplicates, no gaps
    assert len(per_rank[0]) == len(per_rank[1]) == len(dm.stream(split, 0, 2)) == 4
    batch = per_rank[0][0]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 4 and batch["text_image_index"].tolist() == [0, 1, 2, 3]


def test_shard_assignment_deals_whole_shards_and_splits_the_leftovers():
    slots = assign_shards(6, 4)
    assert slots == [
        [Portion(0), Portion(4, 2, 0)],
        [Portion(1), Portion(4, 2, 1)],
        [Portion(2), Portion(5, 2, 0)],
        [Portion(3), Portion(5, 2, 1)],
    ]
    assert assign_shards(8, 4) == [[Portion(k), Portion(k + 4)] for k in range(4)]  # every shard read once
    # One shard, four readers: each keeps every 4th sample.
    assert assign_shards(1, 4) == [[Portion(0, 4, r)] for r in range(4)]


def test_uneven_shards_have_no_gaps_and_equal_rank_lengths(tokenizer, tmp_path):
    sizes = [5, 7, 9, 6, 8, 4]
    for shard, size in enumerate(sizes):
        write_shard(tmp_path / f"{shard:05d}.tar", good_samples(shard, size))
    spec = str(tmp_path / "{00000..00005}.tar")
    every_key = {shard * 10000 + i for shard, size in enumerate(sizes) for i in range(size)}
    for split in ("train", "val"):
        dm = datamodule(tokenizer, train_shards=spec, val_shards=spec, batch_size=4, num_workers=2)
        per_rank = read_epoch(dm, split, world_size=2)
        seen = ids_of(per_rank[0]) + ids_of(per_rank[1])
        assert set(seen) == every_key  # no gaps
        # Shares are 9 and 11 (rank 0), 11 and 8 (rank 1): the shorter ones repeat samples up to 11 per
        # worker (12, whole batches, in training) so both ranks run the same number of batches.
        per_worker = 12 if split == "train" else 11
        assert len(seen) == 2 * 2 * per_worker
        assert len(per_rank[0]) == len(per_rank[1]) == len(dm.stream(split, 0, 2))
        if split == "train":
            assert all(len(b["image_ids"]) == 4 for rank in per_rank for b in rank)


@needs_shared
def test_each_epoch_reshuffles_deterministically(tokenizer):
    dm = datamodule(tokenizer, train_shards=str(CC12M_SHARD), batch_size=8, shuffle_buffer=16)
    first = ids_of(read_epoch(dm, "train", 1, epoch=0)[0])
    again = ids_of(read_epoch(dm, "train", 1, epoch=0)[0])
    second = ids_of(read_epoch(dm, "train", 1, epoch=1)[0])
    assert first == again and first != second
    assert sorted(first) == sorted(second) == sorted(CC12M_KEYS)
    other_seed = datamodule(tokenizer, train_shards=str(CC12M_SHARD), batch_size=8, shuffle_buffer=16, seed=1)
    assert ids_of(read_epoch(other_seed, "train", 1, epoch=0)[0]) != first


def write_bad_shard(path):
    """6 good samples and one of each kind of bad one."""
    samples = good_samples(0, 6) + [
        {"__key__": "000000100", "jpg": truncated_jpeg(), "txt": "a truncated jpeg"},
        {"__key__": "000000101", "jpg": b"not an image at all", "txt": "garbage bytes"},
        {"__key__": "000000102", "jpg": jpeg_bytes(), "json": "{}"},  # no .txt
        {"__key__": "000000103", "jpg": jpeg_bytes(), "txt": "   "},
        {"__key__": "000000104", "txt": "a caption without its image"},
    ]
    write_shard(path, samples)
    return {i for i in range(6)}


def test_bad_samples_are_skipped_and_counted(tokenizer, tmp_path):
    good = write_bad_shard(tmp_path / "00000.tar")
    dm = datamodule(tokenizer, val_shards=str(tmp_path / "00000.tar"), batch_size=4)
    seen = ids_of(read_epoch(dm, "val", 1)[0])
    assert set(seen) == good  # the stats say 11: the 5 bad ones are made up by repeats
    assert len(seen) == 11
    assert dm.bad_samples["val"].take() == {
        "undecodable image": 2, "missing caption": 1, "empty caption": 1, "missing image": 1,
    }


@pytest.mark.slow
def test_bad_sample_counts_are_logged_every_epoch(tmp_path):
    write_bad_shard(tmp_path / "00000.tar")
    shard = str(tmp_path / "00000.tar")
    cfg = vlm_lab.load_config(
        TINY, overrides=["data.name=cc3m", f"data.train_shards={shard}", f"data.val_shards={shard}",
                                   "data.batch_size=4", "trainer.max_epochs=2"])
    vlm_lab.fit(cfg, run_dir=tmp_path / "run")
    rows = list(csv.DictReader(open(next((tmp_path / "run" / "logs").glob("version_*/metrics.csv")))))
    train = [float(r["train/bad_samples"]) for r in rows if r.get("train/bad_samples")]
    val = [float(r["val/bad_samples"]) for r in rows if r.get("val/bad_samples")]
    assert train == [5.0, 5.0] and val == [5.0, 5.0]


class RecordOrder(L.Callback):
    def __init__(self):
        self.ids = collections.defaultdict(list)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids[trainer.current_epoch] += batch["image_ids"].tolist()


@needs_shared
@pytest.mark.slow
def test_resumed_run_continues_the_epoch_order(tokenizer, tmp_path):
    shard = str(CC12M_SHARD)
    data = dict(train_shards=shard, val_shards=shard, batch_size=8, shuffle_buffer=16)
    # limit_train_batches: an epoch Lightning cuts short still counts as done.
    overrides = ["data.name=cc3m", *(f"data.{k}={v}" for k, v in data.items()), "trainer.limit_val_batches=1",
                 "trainer.limit_train_batches=3"]

    def run(max_epochs, resume):
        cfg = vlm_lab.load_config(TINY, overrides=overrides + [f"trainer.max_epochs={max_epochs}"])
        module = vlm_lab.build_module(cfg)
        trainer = vlm_lab.build_trainer(cfg, tmp_path)
        recorder = RecordOrder()
        trainer.callbacks.append(recorder)
        ckpt = str(tmp_path / "checkpoints" / "last.ckpt") if resume else None
        trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module), ckpt_path=ckpt)
        return recorder.ids

    first = run(1, resume=False)
    resumed = run(2, resume=True)
    assert list(first) == [0] and list(resumed) == [1]  # the resumed run trained the second epoch only...
    expected = {epoch: ids_of(read_epoch(datamodule(tokenizer, **data), "train", 1, epoch)[0])[:24] for epoch in (0, 1)}
    assert first[0] == expected[0]
    assert resumed[1] == expected[1] != expected[0]  # ...in the second epoch's order, not the first's again


@needs_shared
def test_samples_per_epoch_overrides_the_counts(tokenizer):
    dm = datamodule(tokenizer, train_shards=str(CC12M_SHARD), train_samples=48, batch_size=8)
    (batches,) = read_epoch(dm, "train", 1)
    assert len(batches) == len(dm.stream("train", 0, 1)) == 6  # 48 samples: the 32 and 16 again
    counts = collections.Counter(ids_of(batches))
    assert set(counts) == CC12M_KEYS and sum(counts.values()) == 48


def test_caption_table_layout(tokenizer, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes((40 * i, 0, 0)))
    rows = ["filepath\tcaption"] + [f"{i}.jpg\tred square number {i}, with a comma" for i in range(5)]
    rows += ["missing.jpg\ta file that is not there", "4.jpg\t"]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text('filepath,caption\n0.jpg,"a caption, quoted"\n1.jpg,another\n')
    dm = datamodule(tokenizer, train_table=str(tmp_path / "train.tsv"), train_images=str(images),
                    val_table=str(tmp_path / "val.csv"), val_images=str(images), batch_size=7)
    train = dm.dataset("train")
    assert len(train) == 7
    assert train[2]["captions"] == ["red square number 2, with a comma"]
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["image_ids"]) == 7  # bad rows replaced, the batch keeps its size
    assert dm.bad_samples["train"].take() == {"missing image": 1, "empty caption": 1}
    val = next(iter(dm.val_dataloader()))
    assert val["image_ids"].tolist() == [0, 1]
    assert dm.split_summary("val") == {"images": 2, "captions": 2, "shards": None}


def test_bad_configs_say_what_is_wrong(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="shard list is empty"):
        datamodule(tokenizer, train_shards=[])
    with pytest.raises(ConfigError, match=r"1 of 2 shard file\(s\) do not exist, e\.g\. .*00001\.tar"):
        write_shard(tmp_path / "00000.tar", good_samples(0, 2))
        datamodule(tokenizer, train_shards=str(tmp_path / "{00000..00001}.tar"))
    with pytest.raises(ConfigError, match="data.train_images is the folder of data.train_table, which is not set"):
        datamodule(tokenizer, train_shards=str(tmp_path / "00000.tar"), train_images=str(tmp_path))
    with pytest.raises(ConfigError, match="both set"):
        datamodule(tokenizer, train_shards=str(tmp_path / "00000.tar"), train_table="x.tsv")
    with pytest.raises(ConfigError, match="needs data.train_shards, data.train_sources or data.train_table"):
        datamodule(tokenizer)
    remote = datamodule(tokenizer, train_shards=f"pipe:cat {tmp_path / '00000.tar'}")
    with pytest.raises(ConfigError, match="set data.train_samples"):
        remote.dataset("train")
    with pytest.raises(ConfigError, match="no val split"):
        remote.val_dataloader()
    too_few = datamodule(tokenizer, train_shards=str(tmp_path / "00000.tar"), train_samples=3, batch_size=4)
    with pytest.raises(ConfigError, match="3 sample.* leave rank 0 of 1 nothing to read; it needs at least batch_size=4"):
        too_few.train_dataloader()


def test_a_truncated_shard_is_read_up_to_the_damage(tokenizer, tmp_path):
    write_shard(tmp_path / "00000.tar", good_samples(0, 6))
    write_shard(tmp_path / "00001.tar", good_samples(1, 4))
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])  # cut inside the fourth sample or so
    dm = datamodule(tokenizer, val_shards=str(tmp_path / "{00000..00001}.tar"), batch_size=5)
    seen = set(ids_of(read_epoch(dm, "val", 1)[0]))
    assert {10000, 10001, 10002, 10003} <= seen and {0, 1} <= seen and not seen & {4, 5}
    assert dm.bad_samples["val"].take().get("unreadable shard data", 0) >= 1


def test_the_command_line_prints_a_bad_shard_list_as_one_line(capsys):
    from vlm_lab.cli import main

    assert main(["fit", TINY, "data.name=cc3m", "data.train_shards=[]"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vlm-lab: error: data.train_shards: the shard list is empty; give paths such as 'shards/{00000..00009}.tar'"]


def test_remote_shards_stream_with_a_configured_length(tokenizer, tmp_path):
    write_shard(tmp_path / "00000.tar", good_samples(0, 6), stats=False)
    dm = datamodule(tokenizer, train_shards=f"pipe:cat {tmp_path / '00000.tar'}", train_samples=6, batch_size=3)
    (batches,) = read_epoch(dm, "train", 1)
    assert sorted(ids_of(batches)) == list(range(6))
    assert isinstance(batches[0]["pixel_values"], torch.Tensor)


def test_table_rows_naming_one_file_are_one_image(tokenizer, tmp_path):
    # A Flickr-style table: five rows per image. They share the image's id (multi_positive pairs them),
    # training still sees every row once per epoch, and validation scores each image with its captions.
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes((60 * i, 0, 0)))
    rows = [f"{i}.jpg\timage {i} caption {c}" for c in range(5) for i in range(3)]  # files interleaved
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    dm = datamodule(tokenizer, train_table=str(tmp_path / "t.tsv"), val_table=str(tmp_path / "t.tsv"), batch_size=15)
    train = dm.dataset("train")
    assert len(train) == 15
    pairs = [(train[k]["image_id"], train[k]["captions"][0]) for k in range(15)]
    assert sorted(pairs) == sorted((i, f"image {i} caption {c}") for c in range(5) for i in range(3))
    val = next(iter(dm.val_dataloader()))
    assert val["image_ids"].tolist() == [0, 1, 2]
    assert val["text_image_index"].tolist() == [i for i in range(3) for _ in range(5)]
    assert dm.dataset("val")[0]["captions"] == [f"image 0 caption {c}" for c in range(5)]
    assert dm.split_summary("val") == {"images": 3, "captions": 15, "shards": None}
