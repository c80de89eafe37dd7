"""LiT epoch time, vlm-lab against open_clip: one epoch of Flickr8k train with the image tower locked.

    python benchmarks/vs_open_clip_lit_epoch.py                      # the full epoch: 6,091 images, 48 steps
    python benchmarks/vs_open_clip_lit_epoch.py --limit-batches 3    # a quick look during development
    python benchmarks/vs_open_clip_lit_epoch.py --device cuda --precision bf16-mixed   # on a GPU
    # the same epoch streamed from webdataset shards (the cc3m module), made outside the repository with
    vlm-lab data convert --ann ../shared/data/flickr8k/annotations/captions_train.json \
        --images ../shared/data/flickr8k/images --out /tmp/flickr8k_shards --per image --shard-size 1000
    python benchmarks/vs_open_clip_lit_epoch.py --shards /tmp/flickr8k_shards

The model is the LiT headline recipe (``experiments/lit/flickr8k_lit.yaml``) at the settings the
benchmarks/README.md's figures were measured with: EfficientNet-Lite0 at 224 px locked, MiniLM-L6 tuned, linear
projections into 256-d, CLIP loss, batch 128 with one random caption per image (the recipe now
uses 512-d, batch 256 and every caption; the towers, which are what is compared, are the same),
AdamW. Three epochs over the same batches of ``../shared/data/flickr8k`` (train), one after the other:

- ``vlm-lab``: ``vlm_lab.api.build_trainer`` + ``fit`` as ``vlm-lab fit`` runs it, with the locked-tower
  embedding cache warm (its disk files filled by an earlier run, or filled here before the epoch,
  outside the timing): the loader serves the stored pooled features, no image is decoded;
- ``open_clip``: ``open_clip.CustomTextCLIP`` with the same towers and weights (a ``TimmModel``
  ``tf_efficientnet_lite0`` image tower locked with ``lock_image_tower()``, an ``HFTextEncoder`` on
  the same local MiniLM folder; ``vs_open_clip_pairs.lit_pair``) in a plain loop as
  ``open_clip_train`` runs it (forward, ``open_clip.ClipLoss``, backward, AdamW with torch's
  defaults); every step decodes and resizes the images and runs the locked tower;
- ``text tower alone``: the limit of a cached step: text forward and backward, heads, loss and AdamW
  step on image features and tokens already in memory, in a plain loop (no data loading).

The two epochs read the same data module's loader (``data.num_workers`` workers, batch 128, the
same order); only vlm-lab's serves cached rows. With ``--shards DIR`` that data module is ``cc3m``
streaming the shards in ``DIR`` (one sample per image with all its captions, ``--per image``): the
cache is then the stream's, keyed by sample key, and its warm epoch reads the tars but decodes no
image. Data loading counts in both. The CPU seconds add the
loader workers' (``RUSAGE_CHILDREN``: the workers end with the epoch). Prints the table and the
ratios (targets: open_clip / vlm-lab >= 3, vlm-lab / text alone <= 1.15).

``--device cuda --precision bf16-mixed``: all three on a GPU under bf16 autocast, the clocks read
after ``torch.cuda.synchronize()`` (``benchmarks/gpu_check.sh`` runs it so). ``--override key=value``
(repeatable) changes the config of both systems, e.g. a smaller annotation file for a dry run;
``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.api import build_trainer  # noqa: E402
from vlm_lab.embedding_cache import LockedTowerCache  # noqa: E402
from vs_open_clip_pairs import (FLICKR, ROOT, lit_pair, machine, open_clip_loss, open_clip_train_mode,  # noqa: E402
                                vlm_lab_loss)

CONFIG = ROOT / "experiments" / "lit" / "flickr8k_lit.yaml"


DEVICE = torch.device("cpu")  # --device; every clock reading waits for it to finish its queued work
PRECISION = "32"  # --precision


def clocks() -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this process plus its finished children (the loader workers)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


class EpochClock(L.Callback):
    """Wall and CPU seconds of the training epoch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = clocks()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = since(self.start)


def autocast() -> contextlib.AbstractContextManager:
    """For the plain loops, what Lightning's ``bf16-mixed`` does around vlm-lab's step."""
    if PRECISION == "bf16-mixed":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def on_device(batch: dict) -> dict:
    return {key: value.to(DEVICE, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def overrides(limit_batches: int | None, extra: list[str] = (), shards: Path | None = None) -> list[str]:
    if shards is None:
        data = ["data.batch_size=128", "data.train_sampling=image"]
    else:  # the recipe's loader settings, on the shards
        tars = sorted(shards.glob("*.tar"))
        if not tars:
            sys.exit(f"no .tar shards in {shards}; make them with vlm-lab data convert (see the docstring)")
        data = [f"data={{name: cc3m, train_shards: '{shards}/{{{tars[0].stem}..{tars[-1].stem}}}.tar', "
                f"batch_size: 128, num_workers: 2}}"]
    run = [f"trainer.accelerator={DEVICE.type}", "trainer.devices=1", f"trainer.precision={PRECISION}",
           "model.embed_dim=256", *data,
           "trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
           "trainer.logger=false", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", "eval.every_n_epochs=0"]
    if limit_batches is not None:
        run.append(f"trainer.limit_train_batches={limit_batches}")
    return run + list(extra)


def vlm_lab_epoch(cfg, module, run_dir: Path) -> tuple[tuple[float, float], int, dict, list[dict]]:
    """One fitted epoch with the cache; returns its clocks, steps, the cache's report and the batches
    (kept for the text-alone loop)."""
    datamodule = vlm_lab.build_datamodule(cfg, module)
    trainer = build_trainer(cfg, run_dir)
    clock = EpochClock()
    batches: list[dict] = []

    class KeepBatches(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            batches.append(batch)  # a reference: no copy, no time

    trainer.callbacks += [clock, KeepBatches()]
    L.seed_everything(cfg.seed, verbose=False)
    trainer.fit(module, datamodule=datamodule)
    cache = next(c for c in trainer.callbacks if isinstance(c, LockedTowerCache))
    return clock.seconds, len(batches), cache.report, batches


def open_clip_epoch(cfg, module, reference, limit_batches: int | None) -> tuple[tuple[float, float], int]:
    """One epoch of open_clip over the same data module's loader, without the cache."""
    datamodule = vlm_lab.build_datamodule(cfg, module)
    datamodule.setup("fit")
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    L.seed_everything(cfg.seed, verbose=False)
    reference.to(DEVICE)
    open_clip_train_mode(reference)
    steps = 0
    start = clocks()
    for batch in datamodule.train_dataloader():
        with autocast():
            loss = open_clip_loss(reference, on_device(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps == limit_batches:
            break
    return since(start), steps


def text_alone_epoch(module, batches: list[dict]) -> tuple[float, float]:
    """The cached batches, already in memory, through text tower, heads, loss and AdamW."""
    module.to(DEVICE)  # Lightning hands the module back on the CPU after fit
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5, fused=True)
    module.train()
    start = clocks()
    for batch in batches:
        with autocast():
            loss = vlm_lab_loss(module, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return since(start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-batches", type=int, default=None, help="steps per epoch (default: the whole epoch)")
    parser.add_argument("--skip-open-clip", action="store_true", help="only vlm-lab and the text tower alone")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32", choices=("32", "bf16-mixed"))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both systems (repeatable)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--shards", type=Path, help="stream Flickr8k train from these shards (vlm-lab data convert "
                                                    "--per image) with the cc3m module")
    args = parser.parse_args()
    global DEVICE, PRECISION
    DEVICE, PRECISION = torch.device(args.device), args.precision
    if not FLICKR.is_dir():
        sys.exit(f"Flickr8k is not at {FLICKR}")
    # The config's data paths are relative to the repository root; the cache key holds them as
    # written, so the LiT runs' disk cache is found from there.
    os.chdir(ROOT)
    shards = args.shards.resolve() if args.shards is not None else None
    cfg = vlm_lab.load_config(CONFIG, overrides=overrides(args.limit_batches, args.override, shards))
    module, reference = lit_pair(overrides(args.limit_batches, args.override, shards))
    print(f"\n{machine()}\nstart {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)

    with tempfile.TemporaryDirectory() as run_dir:
        ours, steps, report, batches = vlm_lab_epoch(cfg, module, Path(run_dir))
    fill = report.get("train", {})
    print(f"vlm-lab epoch: {ours[0]:.1f} s wall, {ours[1]:.1f} s CPU, {steps} steps; cache {fill}", flush=True)
    alone = text_alone_epoch(module, batches)
    print(f"text tower alone: {alone[0]:.1f} s wall, {alone[1]:.1f} s CPU", flush=True)
    theirs, their_steps = (None, steps) if args.skip_open_clip else open_clip_epoch(cfg, module, reference,
                                                                                      args.limit_batches)
    if theirs is not None:
        print(f"open_clip epoch: {theirs[0]:.1f} s wall, {theirs[1]:.1f} s CPU, {their_steps} steps", flush=True)
    if their_steps != steps:
        sys.exit(f"the epochs differ in length: {steps} and {their_steps} steps")

    images = sum(len(b["image_ids"]) for b in batches)
    source = f"shards in {shards} (cc3m)" if shards is not None else "images (coco_captions)"
    print(f"\none epoch of Flickr8k train from {source}: {steps} steps, {images} images, batch "
          f"{cfg.data.batch_size}, {cfg.data.num_workers} loader workers; end {time.strftime('%H:%M:%S')}\n")
    print("| | epoch: wall (CPU) | per step: wall (CPU) | vs vlm-lab, wall (CPU) |\n|---|---|---|---|")
    rows = [("vlm-lab, embedding cache warm", ours), ("open_clip, `lock_image_tower()`", theirs),
            ("text tower alone (the limit)", alone)]
    for name, seconds in rows:
        if seconds is None:
            continue
        print(f"| {name} | {seconds[0]:.0f} s ({seconds[1]:.0f} s) | {seconds[0] / steps:.2f} s ({seconds[1] / steps:.2f} s) "
              f"| {seconds[0] / ours[0]:.2f}x ({seconds[1] / ours[1]:.2f}x) |")
    if theirs is not None:
        print(f"\nvlm-lab is {theirs[0] / ours[0]:.2f}x faster than open_clip (CPU {theirs[1] / ours[1]:.2f}x); "
              f"target >= 3x")
    print(f"vlm-lab's step is {ours[0] / alone[0]:.2f}x the text tower alone's (CPU {ours[1] / alone[1]:.2f}x); "
          f"target <= 1.15x")
    if fill:
        print(f"the cache: {fill}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": args.device, "precision": args.precision, "steps": steps, "images": images, "cache": fill,
            "rows": {name: {"wall_s": seconds[0], "cpu_s": seconds[1]} for name, seconds in rows if seconds}},
            indent=2))


if __name__ == "__main__":
    main()
