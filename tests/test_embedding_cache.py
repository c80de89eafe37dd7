"""The locked-tower embedding cache: same losses as without it, no images after filling, reuse on disk."""

from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

import vlm_lab
from vlm_lab import build
from vlm_lab.api import build_trainer
from vlm_lab.data import synthetic
from vlm_lab.embedding_cache import CacheSettings, LockedTowerCache, fill, open_cache
from vlm_lab.errors import ConfigError

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


class Record(L.Callback):
    def __init__(self):
        self.losses, self.batch_keys = [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.batch_keys |= set(batch)


def run(tmp_path, name, overrides, monkeypatch):
    """Fit the tiny config; return the recorder, the cache report, images drawn and vision forward calls."""
    cfg = vlm_lab.load_config(TINY, overrides=["trainer.max_epochs=2", "trainer.enable_checkpointing=false",
                                               *overrides])
    L.seed_everything(0)
    module = vlm_lab.build_module(cfg)
    drawn, forwards = [], []
    original = synthetic.SyntheticShapes.image
    monkeypatch.setattr(synthetic.SyntheticShapes, "image", lambda self, i: drawn.append(i) or original(self, i))
    module.vision.register_forward_hook(lambda *args: forwards.append(1))
    trainer = build_trainer(cfg, tmp_path / name)
    record = Record()
    trainer.callbacks.append(record)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    caches = [c for c in trainer.callbacks if isinstance(c, LockedTowerCache)]
    report = caches[0].report if caches else {}
    return record, report, len(drawn), len(forwards), vlm_lab.api.read_metrics(tmp_path / name)


@pytest.mark.slow
def test_cached_and_uncached_runs_give_identical_losses_and_the_cache_skips_images(tmp_path, monkeypatch):
    locked = ["model.vision_lock.lock=true"]
    plain, no_report, plain_drawn, plain_forwards, plain_metrics = run(
        tmp_path, "plain", [*locked, "embedding_cache.enabled=false"], monkeypatch)
    cached, report, cached_drawn, cached_forwards, cached_metrics = run(tmp_path, "cached", locked, monkeypatch)

    assert cached.losses == plain.losses and len(cached.losses) == 8  # 2 epochs of 4 batches, bit for bit
    assert cached_metrics["val/i2t_R@1"] == plain_metrics["val/i2t_R@1"]
    assert cached_metrics["val/loss"] == plain_metrics["val/loss"]
    assert "pixel_values" in plain.batch_keys and "vision_pooled" not in plain.batch_keys
    assert "vision_pooled" in cached.batch_keys and "pixel_values" not in cached.batch_keys
    assert no_report == {}
    assert report["train"]["encoded"] == 64 and report["val"]["encoded"] == 16
    # Without the cache every epoch draws every image (64 train x 2 epochs, 16 val x 3 passes incl. the
    # sanity check; the check's first batch only). With it, each image is drawn once, plus one probe.
    assert plain_drawn == 64 * 2 + 16 * 2 + 16
    assert cached_drawn == 64 + 16 + 2
    # The tower runs 8 training + 1 sanity + 2 validation batches without the cache; with it, one
    # filling batch per split (64 rows at a time) and one probe per split for the output shapes.
    assert plain_forwards == 8 + 1 + 2 and cached_forwards == 2 + 2


@pytest.mark.slow
def test_loader_workers_get_the_cache_from_the_first_epoch(tmp_path, monkeypatch):
    # Lightning forks the first epoch's loader workers before on_fit_start; the cache must be
    # attached before that, or epoch 0 silently runs the locked tower on every batch.
    cached, report, _, forwards, _ = run(tmp_path, "workers", ["model.vision_lock.lock=true", "data.num_workers=2",
                                                              "trainer.max_epochs=1"], monkeypatch)
    assert report["train"]["encoded"] == 64
    assert "vision_pooled" in cached.batch_keys and "pixel_values" not in cached.batch_keys
    assert forwards == 2 + 2  # only the fills and probes: no training batch ran the tower


@pytest.mark.slow
def test_disk_cache_is_reused_by_the_next_run_and_stores_tokens(tmp_path, monkeypatch):
    overrides = ["model.vision_lock.lock=true", "embedding_cache.storage=disk",
                 f"embedding_cache.dir={tmp_path / 'cache'}", "embedding_cache.tokens=true"]
    first, report, _, _, _ = run(tmp_path, "first", overrides, monkeypatch)
    assert report["train"]["encoded"] == 64
    assert "vision_tokens" in first.batch_keys
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 2  # train and val, each under its own key
    assert all(sorted(f.name for f in folder.iterdir()) == ["pooled.npy", "state.npy", "tokens.npy"]
               for folder in folders)

    second, report, drawn, _, _ = run(tmp_path, "second", overrides, monkeypatch)
    assert report["train"]["encoded"] == 0 and report["val"]["encoded"] == 0
    assert drawn == 2  # only the probes that read the output shapes
    assert second.losses == first.losses


def test_cached_rows_equal_the_towers_own_outputs():
    cfg = vlm_lab.load_config(TINY, overrides=["model.vision_lock.lock=true"])
    module = vlm_lab.build_module(cfg).eval()
    images = vlm_lab.build_datamodule(cfg, module).cacheable_images("val")
    pixels = torch.stack([images.image_row_pixels(row) for row in range(images.image_rows())])
    with torch.no_grad():
        expected = module.vision(pixels)
    cache = open_cache(images, module.vision, expected, CacheSettings(tokens=True))
    assert fill(cache, images, module.vision, torch.device("cpu"), batch_size=5, num_workers=0) == 16
    for row in (0, 7, 15):
        assert torch.allclose(cache.lookup(row)["vision_pooled"], expected.pooled[row], atol=1e-6)
        assert torch.allclose(cache.lookup(row)["vision_tokens"], expected.tokens[row], atol=1e-6)
    assert images.embeddings is None and images[3].keys() == {"pixel_values", "captions", "image_id"}
    images.embeddings = cache
    assert images[3].keys() == {"vision_pooled", "vision_tokens", "captions", "image_id"}


@pytest.mark.slow
def test_only_fully_locked_towers_are_cached(tmp_path, monkeypatch):
    _, report, _, _, _ = run(tmp_path, "unlocked", ["trainer.max_epochs=1"], monkeypatch)
    assert report == {}
    with pytest.raises(ConfigError, match=r"embedding_cache.storage='disc' is not one of 'memory', 'disk'"):
        vlm_lab.load_config(TINY, overrides=["embedding_cache.storage=disc"])


COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"the shared data folder is absent ({COCO_MINI})")
@pytest.mark.slow
def test_coco_captions_cached_run_matches_and_decodes_each_photo_once(tmp_path, monkeypatch):
    from vlm_lab.data import records

    coco = [f"data={{name: coco_captions, root: {COCO_MINI}, batch_size: 16}}", "model.vision_lock.lock=true"]
    decoded = []
    original = records.open_image
    monkeypatch.setattr(records, "open_image", lambda *a, **k: decoded.append(1) or original(*a, **k))
    plain, _, _, _, plain_metrics = run(tmp_path, "plain", [*coco, "embedding_cache.enabled=false"], monkeypatch)
    plain_decoded, decoded[:] = len(decoded), []
    cached, report, _, _, cached_metrics = run(tmp_path, "cached", coco, monkeypatch)
    assert cached.losses == plain.losses and len(cached.losses) == 2 * 5
    assert cached_metrics["val/t2i_R@5"] == plain_metrics["val/t2i_R@5"]
    assert report["train"]["filled"] == 80 and report["val"]["filled"] == 79
    assert plain_decoded == 2 * 80 + 2 * 79 + 2 * 16  # two epochs of both splits and two sanity batches
    assert len(decoded) == 80 + 79 + 2  # each photo once, plus a probe per split


def test_an_unusable_image_is_skipped_and_counted_in_every_cached_epoch(tmp_path):
    from vlm_lab.data.health import BadSampleCounter
    from vlm_lab.data.records import CaptionedImages, Record
    from vlm_lab.data.transforms import build_transform
    from vlm_lab.towers.base import ImageConfig

    for name in ("a", "c"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / f"{name}.png")
    rows = [Record(str(tmp_path / f"{n}.png"), (f"photo {n}",), i) for i, n in enumerate("abc")]  # b.png is missing
    config = ImageConfig(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = CaptionedImages(rows, build_transform(config), BadSampleCounter("val"))
    tower = build("vision_tower", {"name": "clip_vit", "image_size": 8, "patch_size": 4, "width": 16,
                                   "layers": 1, "heads": 2}).eval()
    with torch.no_grad():
        cache = open_cache(dataset, tower, tower(dataset.image_row_pixels(0)[None]), CacheSettings())
        assert fill(cache, dataset, tower, torch.device("cpu"), batch_size=2, num_workers=0) == 2
    assert cache.counts() == {"filled": 2, "unusable": 1, "missing": 0}
    dataset.embeddings = cache
    for _ in range(2):  # two epochs: the missing image is counted each time, and replaced by the next
        sample = dataset[1]
        assert sample["image_id"] == 2 and "vision_pooled" in sample
    assert dataset.bad.take() == {"missing image": 2}
