"""Several sources in one training stream (data.train_sources), and resampling (data.resampled).

Tiny synthetic shards written here: one 8x8 JPEG shared by every sample, a caption, and a key whose
first digit names the source. A mixture's image ids are ``sample_key(source name, key)``, so that keys
repeated across sources stay apart; :func:`keys_by_id` turns them back into keys.
"""

import collections
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from datasets_on_disk import TINY_IMAGES, jpeg_bytes, write_shard
from vlm_lab.cli import main
from vlm_lab.data.cc3m import CC3MDataModule
from vlm_lab.data.shards import sample_key
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
PIXEL = jpeg_bytes((90, 120, 200), size=(8, 8))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def write_source(folder: Path, source: int, sizes: list[int]) -> str:
    """Shards ``00000.tar ...`` of ``sizes`` samples; keys ``{source}{shard:03d}{i:05d}``. Returns the pattern."""
    folder.mkdir(parents=True)
    for shard, size in enumerate(sizes):
        write_shard(folder / f"{shard:05d}.tar",
                    [{"__key__": f"{source}{shard:03d}{i:05d}", "jpg": PIXEL, "txt": f"source {source} sample {i}"}
                     for i in range(size)])
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def keys_of(source: int, sizes: list[int]) -> set[int]:
    return {int(f"{source}{shard:03d}{i:05d}") for shard, size in enumerate(sizes) for i in range(size)}


def keys_by_id(sources: dict[str, tuple[int, list[int]]]) -> dict[int, int]:
    """Image id -> the key (as a number) of every sample of :func:`write_source`'s sources, given as
    ``{name in the mixture: (source number, sizes)}``."""
    return {sample_key(name, str(key)): key for name, (source, sizes) in sources.items()
            for key in keys_of(source, sizes)}


def source_of(key: int) -> int:
    return int(str(key)[0])


def no_pixels(image):
    return torch.zeros(1)


def ids_only(samples):
    return {"image_ids": torch.tensor([s["image_id"] for s in samples])}


def read_epoch(dm, world_size, workers, epoch=0, batches=None, light=False):
    """The image ids every rank reads in one training epoch (or its first ``batches``), each rank
    through its own DataLoader. ``light``: no transform or tokenizer, for the long reads."""
    per_rank = []
    for rank in range(world_size):
        stream = dm.stream("train", rank, world_size)
        if light:
            stream.transform, stream.collate = no_pixels, ids_only
        stream.set_epoch(epoch)
        loader = itertools.islice(DataLoader(stream, batch_size=None, num_workers=workers), batches)
        per_rank.append([i for b in loader for i in b["image_ids"].tolist()])
    return per_rank


def test_resampled_mixture_follows_the_weights_within_one_point(tokenizer, tmp_path):
    sizes = {1: [40] * 6, 2: [50, 20, 35], 3: [30, 30]}  # 240, 105 and 60 samples: sizes unlike the weights
    weights = {1: 0.5, 2: 0.3, 3: 0.2}
    sources = [{"name": f"s{s}", "shards": write_source(tmp_path / f"s{s}", s, sizes[s]), "weight": weights[s]}
               for s in sizes]
    dm = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, resampled=True, train_samples=20000,
                        batch_size=50, num_workers=2, shuffle_buffer=50)
    # The stream's own choices, without pixels or tokens: 20,000 samples through 2 ranks x 2 workers.
    per_rank = read_epoch(dm, world_size=2, workers=2, light=True)
    key = keys_by_id({f"s{s}": (s, sizes[s]) for s in sizes})  # a KeyError below: an id of no sample
    per_rank = [[key[i] for i in ids] for ids in per_rank]
    assert [len(ids) for ids in per_rank] == [10000, 10000]
    assert len(dm.stream("train", 0, 2)) == len(dm.stream("train", 1, 2)) == 200
    counts = collections.Counter(source_of(i) for ids in per_rank for i in ids)
    for source, weight in weights.items():
        assert abs(counts[source] / 20000 - weight) < 0.01, counts
    seen = {i for ids in per_rank for i in ids}
    assert seen <= keys_of(1, sizes[1]) | keys_of(2, sizes[2]) | keys_of(3, sizes[3])
    assert len(seen & keys_of(3, sizes[3])) == 60  # with replacement, yet 4,000 draws reach all 60
    # Seeded by (seed, epoch, rank, worker): the same epoch again is the same, the next one differs.
    start = [[key[i] for i in ids] for ids in read_epoch(dm, world_size=2, workers=2, batches=6)]  # 3 batches each
    assert start == [ids[:300] for ids in per_rank]
    assert read_epoch(dm, world_size=2, workers=2, epoch=1, batches=6) != start


def test_a_resampled_mixture_without_weights_follows_the_sizes(tokenizer, tmp_path):
    sources = [{"shards": write_source(tmp_path / "a", 1, [30, 30, 30])},  # 90 samples
               {"shards": write_source(tmp_path / "b", 2, [30])}]          # 30 samples
    dm = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, resampled=True, train_samples=4000,
                        batch_size=40)
    (ids,) = read_epoch(dm, world_size=1, workers=0, light=True)
    key = keys_by_id({"train_sources[0]": (1, [30, 30, 30]), "train_sources[1]": (2, [30])})
    ids = [key[i] for i in ids]
    share = sum(source_of(i) == 1 for i in ids) / len(ids)
    assert abs(share - 0.75) < 0.02  # 3 sd at 4,000 samples


@pytest.mark.parametrize("sizes", [([12] * 4, [12] * 4), ([7, 13, 9, 4, 11], [6, 10, 8])])
def test_without_resampling_a_mixture_reads_every_sample_of_every_source(tokenizer, tmp_path, sizes):
    a, b = sizes
    sources = [{"name": "a", "shards": write_source(tmp_path / "a", 1, a)},
               {"name": "b", "shards": write_source(tmp_path / "b", 2, b)}]
    dm = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, batch_size=4, num_workers=2)
    per_rank = read_epoch(dm, world_size=2, workers=2)
    key = keys_by_id({"a": (1, a), "b": (2, b)})
    seen = collections.Counter(key[i] for ids in per_rank for i in ids)
    assert set(seen) == keys_of(1, a) | keys_of(2, b)  # no gaps
    assert len(per_rank[0]) == len(per_rank[1])  # equal lengths: no hang under DDP
    if a == [12] * 4:  # 8 shards of 12 over 4 readers: equal whole-batch shares, every sample exactly once
        assert set(seen.values()) == {1}


def test_keys_repeated_across_sources_are_different_images(tokenizer, tmp_path):
    # Two sources written with the same keys (as two img2dataset runs number their samples alike):
    # each sample's id is its own, so multi_positive never pairs a sample of one with one of the other.
    sources = [{"name": name, "shards": write_source(tmp_path / name, 1, [6, 6])} for name in ("a", "b")]
    dm = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, batch_size=4)
    (ids,) = read_epoch(dm, world_size=1, workers=0)
    assert len(ids) == len(set(ids)) == 24
    assert set(ids) == set(keys_by_id({"a": (1, [6, 6])})) | set(keys_by_id({"b": (1, [6, 6])}))
    # The same sample gets the same id wherever it is read: by two ranks with two workers, in inspection.
    spread = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, batch_size=2, num_workers=2)
    assert sorted(i for rank in read_epoch(spread, world_size=2, workers=2) for i in rank) == sorted(ids)
    assert {sample.image_id for sample in dm.raw_samples("train")} == set(ids)
    # One source alone keeps its keys as ids, as before mixtures existed.
    single = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_shards=sources[0]["shards"], batch_size=4)
    (alone,) = read_epoch(single, world_size=1, workers=0)
    assert set(alone) == keys_of(1, [6, 6])


def test_multi_positive_sees_no_false_positive_across_sources(tokenizer, tmp_path):
    from vlm_lab.losses import ClipLoss

    sources = [{"name": name, "shards": write_source(tmp_path / name, 1, [4])} for name in ("a", "b")]
    dm = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, batch_size=8)
    (batch,) = list(DataLoader(dm.stream("train", 0, 1), batch_size=None))
    ids = batch["image_ids"]
    assert len(set(ids.tolist())) == 8  # the same 4 keys in both sources, yet no two entries share an image
    gen = torch.Generator().manual_seed(0)
    images, texts = (torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1) for _ in range(2))
    plain = ClipLoss()(images, texts)
    # No image twice, so the multi-positive loss is the plain one; the bare keys would pair a with b.
    assert torch.equal(ClipLoss(multi_positive=True)(images, texts, image_ids=ids), plain)
    key = keys_by_id({"a": (1, [4]), "b": (1, [4])})
    keys = torch.tensor([key[i] for i in ids.tolist()])  # what the ids were before: each key twice
    assert len(set(keys.tolist())) == 4
    assert not torch.equal(ClipLoss(multi_positive=True)(images, texts, image_ids=keys), plain)


def test_a_source_whose_shards_are_all_missing_is_one_line_naming_it(tmp_path, capsys):
    good = write_source(tmp_path / "good", 1, [8, 8])
    missing = str(tmp_path / "laion" / "{00000..00002}.tar")
    sources = f"[{{name: cc3m, shards: '{good}'}}, {{name: laion, shards: '{missing}'}}]"
    assert main(["fit", TINY, "data.name=cc3m", f"data.train_sources={sources}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vlm-lab: error: data.train_sources[1] (laion): 3 of 3 shard file(s) do not exist, "
        f"e.g. {tmp_path / 'laion' / '00000.tar'}"]


def spoil(folder: Path) -> None:
    """Shard 00001 cut in the middle of its samples, shard 00002 not a tar at all."""
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[: len(data) // 2])
    (folder / "00002.tar").write_bytes(b"<html>403 Forbidden</html>" * 40)


@pytest.mark.parametrize("resampled", [False, True])
def test_a_source_with_corrupt_shards_skips_and_counts_them(tokenizer, tmp_path, resampled):
    sources = [{"name": "a", "shards": write_source(tmp_path / "a", 1, [20, 20])},
               {"name": "b", "shards": write_source(tmp_path / "b", 2, [20, 20, 20])}]
    spoil(tmp_path / "b")
    if resampled:
        for source, weight in zip(sources, (0.5, 0.5)):
            source["weight"] = weight
    dm = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, resampled=resampled,
                        train_samples=400 if resampled else None, batch_size=10)
    (ids,) = read_epoch(dm, world_size=1, workers=0)
    key = keys_by_id({"a": (1, [20, 20]), "b": (2, [20, 20, 20])})
    ids = [key[i] for i in ids]
    read_of_b = {i for i in ids if source_of(i) == 2}
    assert {i // 100000 % 1000 for i in read_of_b} <= {0, 1}  # nothing from the garbage shard...
    assert keys_of(2, [20]) <= read_of_b  # ...all of the good one, and the cut one's first samples
    assert len(read_of_b & keys_of(2, [0, 20])) < 20
    bad = dm.bad_samples["train"].take()
    assert set(bad) == {"unreadable shard data"}
    if resampled:  # every draw of a damaged shard counts what it lost; the weights still hold
        assert bad["unreadable shard data"] > 28
        assert abs(sum(source_of(i) == 2 for i in ids) / len(ids) - 0.5) < 0.08
    else:  # what the stats promised and the shards did not hold: the cut one's lost half, the garbage's 20
        assert bad["unreadable shard data"] == 20 - len(read_of_b & keys_of(2, [0, 20])) + 20


def test_a_resampled_source_with_no_readable_shard_is_one_line(tokenizer, tmp_path):
    sources = [{"name": "a", "shards": write_source(tmp_path / "a", 1, [20]), "weight": 1},
               {"name": "broken", "shards": write_source(tmp_path / "b", 2, [20, 20, 20]), "weight": 1}]
    for shard in range(3):
        (tmp_path / "b" / f"{shard:05d}.tar").write_bytes(b"not a tar")
    dm = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_sources=sources, resampled=True, train_samples=200,
                        batch_size=10)
    with pytest.raises(ConfigError, match=r"^train: source broken: none of its 3 shard\(s\) holds a readable sample$"):
        read_epoch(dm, world_size=1, workers=0)


@pytest.mark.parametrize("data, message", [
    (dict(train_sources=[{"shards": "S", "weight": 0.5}]), r"data.train_sources\[0\].weight: weights mix a resampled "
                                                          r"stream; set data.resampled=true"),
    (dict(train_sources=[{"shards": "S", "weight": 1}, {"shards": "S"}], resampled=True, train_samples=8),
     r"data.train_sources\[1\] has no weight while others have one"),
    (dict(train_sources=[{"shards": "S", "weigth": 1}]), r"data.train_sources\[0\] has no key 'weigth'. Did you mean "
                                                         r"'weight'\? Valid keys: name, shards, weight"),
    (dict(train_sources=[{"shards": "S", "weight": -1}], resampled=True, train_samples=8),
     r"weight should be a number > 0, not -1"),
    (dict(train_sources=[{"name": "x", "shards": "S"}, {"name": "x", "shards": "S"}]), "more than one source"),
    (dict(train_sources=[]), "non-empty list of sources"),
    (dict(train_sources=[{"shards": "S"}], train_shards="S"), "data.train_sources and data.train_shards are both set"),
    (dict(train_sources=[{"shards": "S"}], resampled=True), "needs the epoch length: set data.train_samples"),
    (dict(val_shards="S", resampled=True, train_samples=8), "set data.train_shards or data.train_sources"),
])
def test_mixture_mistakes_are_one_line(tokenizer, tmp_path, data, message):
    shards = write_source(tmp_path / "s", 1, [4])
    data = json.loads(json.dumps(data).replace('"S"', json.dumps(shards)))
    with pytest.raises(ConfigError, match=message) as error:
        CC3MDataModule(tokenizer, TINY_IMAGES, 32, **data)
    assert "\n" not in str(error.value)


def test_a_resampled_mixture_trains_from_yaml(tmp_path):
    a = write_source(tmp_path / "a", 1, [16, 16])
    b = write_source(tmp_path / "b", 2, [16])
    config = tmp_path / "mixture.yaml"
    config.write_text(f"""
data:
  name: cc3m
  train_sources:
    - {{name: a, shards: "{a}", weight: 0.7}}
    - {{name: b, shards: "{b}", weight: 0.3}}
  resampled: true
  train_samples: 64
  val_shards: "{b}"
  batch_size: 16
""")
    assert main(["fit", TINY, str(config), "--run-dir", str(tmp_path / "run"), "trainer.max_epochs=2"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["step"] == 8 and metrics["val/bad_samples"] == 0
