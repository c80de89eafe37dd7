"""What the locked-tower embedding cache saves: LiT epoch times with and without it, against the text tower alone.

    python benchmarks/lit_cache_epochs.py                        # the headline LiT config, 512 Flickr8k images
    python benchmarks/lit_cache_epochs.py --images 1024 --epochs 3 --config experiments/lit/flickr8k_lit.yaml

On the first ``--images`` training images of Flickr8k (``../shared/data/flickr8k``, written as a
smaller COCO-format captions file in a temporary folder), validation off, it times:

- ``uncached``: every epoch decodes, resizes and runs the locked vision tower, then trains the text side;
- ``cached``: filling the cache once (the locked tower over every image, in memory), then each epoch;
- ``text tower alone``: one epoch of the same batches through the text tower, head and loss (forward
  and backward), in a plain loop: the floor a cached epoch can reach.

Timings depend on what else runs on the machine: check ``uptime`` first. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.api import build_trainer  # noqa: E402
from vlm_lab.embedding_cache import LockedTowerCache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


class EpochTimer(L.Callback):
    """Wall-clock and CPU seconds of each training epoch (CPU: this process, which does all the work)."""

    def __init__(self) -> None:
        self.seconds: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))


def subset_captions(images: int, folder: Path) -> Path:
    data = json.loads((FLICKR / "annotations" / "captions_train.json").read_text())
    kept = data["images"][:images]
    ids = {image["id"] for image in kept}
    subset = {"images": kept, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    path = folder / "captions_subset.json"
    path.write_text(json.dumps(subset))
    return path


def fit(config: str, overrides: list[str], run_dir: Path, cache_callback: type = LockedTowerCache):
    """One timed fit: the module, data module, (wall, CPU) seconds per epoch, total wall seconds, and the
    report of the run's ``cache_callback`` (``LockedTowerCache``, or distillation's ``TeacherCache``)."""
    cfg = vlm_lab.load_config(config, overrides=overrides)
    L.seed_everything(cfg.seed, verbose=False)
    module = vlm_lab.build_module(cfg)
    datamodule = vlm_lab.build_datamodule(cfg, module)
    trainer = build_trainer(cfg, run_dir)
    timer = EpochTimer()
    trainer.callbacks.append(timer)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    total = time.perf_counter() - start
    cache = next((c for c in trainer.callbacks if isinstance(c, cache_callback)), None)
    return module, datamodule, timer.seconds, total, cache.report if cache else {}


def text_tower_epoch(module, datamodule) -> tuple[float, float]:
    """One epoch of the cached batches through text tower, heads and loss, forward and backward."""
    module.train()
    start = (time.perf_counter(), time.process_time())
    for batch in datamodule.train_dataloader():
        image_features = module.encode_batch_images(batch)
        loss = module.loss(image_features, module.encode_text(batch["input_ids"], batch["attention_mask"]),
                           **module.loss_image_ids(batch["image_ids"]))
        loss.backward()
        module.zero_grad(set_to_none=True)
    return time.perf_counter() - start[0], time.process_time() - start[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "lit" / "flickr8k_lit.yaml"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = [f"data.train_ann={subset_captions(args.images, tmp)}", f"trainer.max_epochs={args.epochs}",
                  "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.logger=false",
                  "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
                  "eval.every_n_epochs=0", "embedding_cache.storage=memory",
                  # One process does all the work, so its CPU time is the cost (other jobs on the
                  # machine inflate wall-clock time, much less CPU time).
                  "data.num_workers=0", "embedding_cache.num_workers=0",
                  # The settings benchmarks/README.md's figures were measured with (the recipe now uses 512-d,
                  # batch 256 and every caption): an epoch is one pass over the images.
                  "model.embed_dim=256", "data.batch_size=128", "data.train_sampling=image"]
        _, _, uncached, uncached_total, _ = fit(args.config, [*common, "embedding_cache.enabled=false"], tmp / "a")
        module, datamodule, cached, cached_total, report = fit(args.config, common, tmp / "b")
        text_only = text_tower_epoch(module, datamodule)

    def pairs(values):
        return ", ".join(f"{wall:.0f} ({cpu:.0f})" for wall, cpu in values)

    fill = report["train"]
    rows = [("uncached, each epoch", pairs(uncached), f"{uncached_total:.0f}"),
            ("cached: filling the cache (the locked tower over every image, once)",
             f"{fill['seconds']:.0f} ({fill['cpu_seconds']:.0f})", ""),
            ("cached: each epoch", pairs(cached), f"{cached_total:.0f}"),
            ("text tower alone (plain loop over the same batches, one epoch)", pairs([text_only]), "")]
    print(f"\n{args.images} Flickr8k training images, {args.epochs} epochs, "
          f"{vlm_lab.load_config(args.config).model.vision.name} locked; load average {os.getloadavg()[0]:.1f}\n")
    print("| what | seconds per epoch: wall (CPU) | fit total, wall (s) |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
