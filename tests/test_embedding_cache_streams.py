"""The locked-tower embedding cache on shard streams: keyed by (source, sample key), filled once.

Counted: the locked tower's forward calls inside training steps, per epoch. With the cache, the
tower runs only to fill it (before the first epoch); every epoch after, over the shards in a new
order or resampled, serves stored outputs, and trains exactly as the uncached run does.
"""

import collections
import json
from pathlib import Path

import lightning as L
import pytest
import torch

import vlm_lab
from datasets_on_disk import TINY_IMAGES, jpeg_bytes, truncated_jpeg, write_shard
from vlm_lab.api import build_trainer
from vlm_lab.embedding_cache import CacheSettings, EmbeddingCache, LockedTowerCache, fill_keyed, open_cache
from vlm_lab.errors import ConfigError

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def write_source(folder: Path, source: int, sizes: list[int], spoilt: bool = False) -> str:
    """Shards of small coloured JPEGs; ``spoilt``: the first shard gets a truncated JPEG and an empty caption."""
    folder.mkdir(parents=True)
    for shard, size in enumerate(sizes):
        samples = [{"__key__": f"{source}{shard:03d}{i:05d}", "jpg": jpeg_bytes((37 * i % 256, 11 * shard, 90 * source),
                                                                                 size=(12, 10)),
                    "txt": f"source {source} shard {shard} picture {i}"} for i in range(size)]
        if spoilt and shard == 0:
            samples[3]["jpg"] = truncated_jpeg()
            samples[5]["txt"] = "  "
        write_shard(folder / f"{shard:05d}.tar", samples)
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


class Recorder(L.Callback):
    """Training losses, batch keys, and the locked tower's forward calls inside training steps, by epoch."""

    def __init__(self, module):
        self.losses, self.keys, self.tower_calls = [], set(), collections.Counter()
        self.epoch = None
        module.vision.register_forward_hook(self._forward)

    def _forward(self, *args):
        if self.epoch is not None:
            self.tower_calls[self.epoch] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epoch = trainer.current_epoch
        self.keys |= set(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epoch = None
        self.losses.append(float(outputs["loss"]))


def fit(run_dir: Path, data: str, *overrides: str):
    """Two epochs of the tiny model with its vision tower locked; the recorder, cache report and metrics."""
    cfg = vlm_lab.load_config(TINY, overrides=[f"data={data}", "model.vision_lock.lock=true", "trainer.max_epochs=2",
                                               "trainer.enable_checkpointing=false", *overrides])
    L.seed_everything(0)
    module = vlm_lab.build_module(cfg)
    trainer = build_trainer(cfg, run_dir)
    recorder = Recorder(module)
    trainer.callbacks.append(recorder)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    caches = [c for c in trainer.callbacks if isinstance(c, LockedTowerCache)]
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return recorder, (caches[0].report if caches else {}), metrics


def bad_per_epoch(run_dir: Path) -> list[float]:
    import csv

    rows = list(csv.DictReader(open(next((run_dir / "logs").glob("version_*/metrics.csv")))))
    return [float(r["train/bad_samples"]) for r in rows if r.get("train/bad_samples")]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cached_stream_never_runs_the_locked_tower_and_trains_identically(tmp_path, workers):
    shards = write_source(tmp_path / "shards", 1, [24, 20], spoilt=True)
    data = f"{{name: cc3m, train_shards: '{shards}', val_shards: '{shards}', batch_size: 8, shuffle_buffer: 16, " \
           f"num_workers: {workers}}}"
    plain, no_report, plain_metrics = fit(tmp_path / "plain", data, "embedding_cache.enabled=false")
    cached, report, cached_metrics = fit(tmp_path / "cached", data)

    assert cached.losses == plain.losses and len(plain.losses) == 2 * 6  # bit for bit, 2 epochs of 6 batches
    assert cached_metrics == plain_metrics
    assert "pixel_values" in plain.keys and "vision_pooled" not in plain.keys
    assert "vision_pooled" in cached.keys and "pixel_values" not in cached.keys
    # Uncached, every training step runs the tower; cached, none does, in the first epoch or the second.
    assert plain.tower_calls == {0: 6, 1: 6}
    assert cached.tower_calls == {}
    assert report["train"]["encoded"] == 43 - 1 and report["train"]["unusable"] == 1  # 44 less the empty caption
    # The truncated JPEG and the empty caption are counted every epoch, with the cache as without.
    assert bad_per_epoch(tmp_path / "cached") == bad_per_epoch(tmp_path / "plain") == [2.0, 2.0]


def test_a_cached_resampled_mixture_never_runs_the_locked_tower(tmp_path):
    a = write_source(tmp_path / "a", 1, [16, 16])
    b = write_source(tmp_path / "b", 2, [16])
    data = (f"{{name: cc3m, train_sources: [{{name: a, shards: '{a}', weight: 0.6}}, {{name: b, shards: '{b}', "
            f"weight: 0.4}}], resampled: true, train_samples: 64, val_shards: '{b}', batch_size: 16}}")
    plain, _, plain_metrics = fit(tmp_path / "plain", data, "embedding_cache.enabled=false")
    cached, report, cached_metrics = fit(tmp_path / "cached", data)
    assert cached.losses == plain.losses and len(plain.losses) == 8
    assert cached_metrics == plain_metrics
    assert plain.tower_calls == {0: 4, 1: 4} and cached.tower_calls == {}
    assert report["train"]["encoded"] == 48  # every sample of both sources once, however often it is drawn


def test_a_disk_cache_of_a_stream_is_filled_once_and_reused(tmp_path):
    shards = write_source(tmp_path / "shards", 1, [16, 16])
    data = f"{{name: cc3m, train_shards: '{shards}', batch_size: 8}}"
    disk = ["embedding_cache.storage=disk", f"embedding_cache.dir={tmp_path / 'cache'}", "trainer.limit_val_batches=0"]
    first, report, _ = fit(tmp_path / "first", data, *disk)
    assert report["train"]["encoded"] == 32
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert sorted(f.name for f in folder.iterdir()) == ["complete", "keys.npy", "pooled.npy", "state.npy"]
    second, report, _ = fit(tmp_path / "second", data, *disk)
    assert report["train"]["encoded"] == 0 and second.tower_calls == {}
    assert second.losses == first.losses


def test_cached_rows_are_the_towers_outputs_and_repeated_keys_are_refused(tmp_path):
    from vlm_lab import build
    from vlm_lab.data.cc3m import CC3MDataModule
    from vlm_lab.data.shards import sample_key
    from vlm_lab.tokenizer import load_tokenizer

    shards = write_source(tmp_path / "s", 1, [5, 7])
    dm = CC3MDataModule(load_tokenizer(None), TINY_IMAGES, 32, train_shards=shards, batch_size=4)
    stream = dm.cacheable_images("train")
    tower = build("vision_tower", {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 16,
                                   "layers": 1, "heads": 2}).eval()
    keyed = list(stream.keyed_images())
    with torch.no_grad():
        expected = tower(torch.stack([pixels for _, pixels in keyed]))
        cache = open_cache(stream, tower, expected, CacheSettings())
        assert isinstance(cache, EmbeddingCache) and cache.keyed and cache.rows == 12
        assert fill_keyed(cache, stream, tower, torch.device("cpu"), batch_size=5, num_workers=2) == 12
    for index, shard, position in ((0, 0, 0), (6, 1, 1), (11, 1, 6)):  # whatever order the workers filled in
        key = sample_key("train_shards", f"1{shard:03d}{position:05d}")
        assert key == keyed[index][0]
        assert torch.allclose(cache.lookup_key(key)["vision_pooled"], expected.pooled[index], atol=1e-6)
    with pytest.raises(KeyError):
        cache.lookup_key(12345)

    twice = write_source(tmp_path / "twice", 1, [4])
    (tmp_path / "twice" / "00001.tar").write_bytes((tmp_path / "twice" / "00000.tar").read_bytes())
    (tmp_path / "twice" / "00001_stats.json").write_text('{"successes": 4}')
    dm = CC3MDataModule(load_tokenizer(None), TINY_IMAGES, 32, train_shards=twice.replace("00000}", "00001}"),
                        batch_size=4)
    stream = dm.cacheable_images("train")
    with torch.no_grad():
        cache = open_cache(stream, tower, expected, CacheSettings())
        with pytest.raises(ConfigError, match=r"^embedding cache: 4 image\(s\) repeat the sample key of another"):
            fill_keyed(cache, stream, tower, torch.device("cpu"), batch_size=5, num_workers=0)


def test_an_augmented_or_uncounted_stream_is_not_cached(tmp_path):
    from vlm_lab.data.cc3m import CC3MDataModule
    from vlm_lab.tokenizer import load_tokenizer

    shards = write_source(tmp_path / "s", 1, [4])
    augmented = CC3MDataModule(load_tokenizer(None), TINY_IMAGES, 32, train_shards=shards, augment=True)
    assert augmented.cacheable_images("train") is None and augmented.cacheable_images is not None
    remote = CC3MDataModule(load_tokenizer(None), TINY_IMAGES, 32,
                            train_shards=f"pipe:cat {tmp_path / 's' / '00000.tar'}", train_samples=4, batch_size=2)
    assert remote.cacheable_images("train") is None


def test_a_streamed_datasets_split_serves_cached_outputs(tmp_path):
    from datasets import Dataset, Features, Image, Value

    from vlm_lab import build
    from vlm_lab.data.hf_datasets import HFDatasetDataModule
    from vlm_lab.tokenizer import load_tokenizer

    folder = tmp_path / "parquet"
    folder.mkdir()
    features = Features({"image": Image(), "caption": Value("string")})
    for part in range(2):
        rows = [{"image": {"bytes": jpeg_bytes((40 * i, 20 * part, 60)), "path": None}, "caption": f"picture {i}"}
                for i in range(5)]
        Dataset.from_list(rows, features=features).to_parquet(str(folder / f"validation-{part:05d}-of-00002.parquet"))
    dm = HFDatasetDataModule(load_tokenizer(None), TINY_IMAGES, 32, path=str(folder), streaming=True,
                             eval_batch_size=4)
    stream = dm.cacheable_images("val")
    tower = build("vision_tower", {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 16,
                                   "layers": 1, "heads": 2}).eval()
    plain = list(dm.val_dataloader())
    with torch.no_grad():
        cache = open_cache(stream, tower, tower(plain[0]["pixel_values"]), CacheSettings())
        assert fill_keyed(cache, stream, tower, torch.device("cpu"), batch_size=3, num_workers=0) == 10
        dm.use_embedding_cache("val", cache)
        cached = list(dm.val_dataloader())
        for before, after in zip(plain, cached):
            assert torch.allclose(tower(before["pixel_values"]).pooled, after["vision_pooled"], atol=1e-6)
            assert torch.equal(before["image_ids"], after["image_ids"])
