"""What distillation's teacher cache saves: epoch times of a distilled student with and without it.

    python benchmarks/teacher_cache_epochs.py                      # 512 synthetic shapes, 2 epochs
    python benchmarks/teacher_cache_epochs.py --images 2048 --epochs 3 --teacher-width 384

The student is the quickstart CLIP (``experiments/quickstart.yaml``: ``clip_vit_tiny`` and
``clip_text_tiny``, 64 px); the teacher a wider CLIP of the same shape (``--teacher-width``, 6 layers
per tower, random weights: its opinions do not change the cost), saved as a vlm-lab checkpoint in a
temporary folder. On ``--images`` synthetic shapes, validation off, it times two fits in one process:

- ``model.distill.cache: false``: the teacher runs on every training batch (images and captions);
- ``model.distill.cache: true``: filling the teacher cache once when the fit is set up (the teacher
  over every image and every caption, in memory), then each epoch with no teacher forward pass.

Timings depend on what else runs on the machine: check ``uptime`` first; the CPU column (this
process, which does all the work with ``num_workers: 0``) is less affected. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.distillation import TeacherCache  # noqa: E402

from lit_cache_epochs import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


def save_teacher(width: int, path: Path) -> None:
    """A random CLIP twice the quickstart's width (by default), as a vlm-lab checkpoint."""
    towers = f"layers: 6, width: {width}, heads: {width // 64}"
    cfg = vlm_lab.load_config(QUICKSTART, overrides=[f"model.vision={{name: clip_vit, image_size: 64, patch_size: 8, "
                                                     f"{towers}}}",
                                                     f"model.text={{name: clip_text, context_length: 32, {towers}}}",
                                                     f"model.embed_dim={width}"])
    torch.manual_seed(1)
    teacher = vlm_lab.build_module(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(teacher)
    trainer.save_checkpoint(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--teacher-width", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_teacher(args.teacher_width, tmp / "teacher.ckpt")
        common = [f"model.distill.teacher={tmp / 'teacher.ckpt'}", f"data.train_size={args.images}",
                  f"trainer.max_epochs={args.epochs}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                  "trainer.logger=false", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
                  "trainer.accelerator=cpu", "eval.every_n_epochs=0", "data.num_workers=0",
                  "embedding_cache.storage=memory", "embedding_cache.num_workers=0"]
        _, _, uncached, uncached_total, _ = fit(QUICKSTART, [*common, "model.distill.cache=false"], tmp / "a",
                                                TeacherCache)
        _, _, cached, cached_total, report = fit(QUICKSTART, [*common, "model.distill.cache=true"], tmp / "b",
                                                 TeacherCache)

    def pairs(values):
        return ", ".join(f"{wall:.1f} ({cpu:.1f})" for wall, cpu in values)

    fill = report["train"]
    mean = [sum(wall for wall, _ in runs) / len(runs) for runs in (uncached, cached)]
    rows = [("`cache: false`, each epoch", pairs(uncached), f"{uncached_total:.1f}"),
            (f"`cache: true`: filling ({fill['images']} images, {fill['captions']} captions, once)",
             f"{fill['seconds']:.1f} ({fill['cpu_seconds']:.1f})", ""),
            ("`cache: true`, each epoch", pairs(cached), f"{cached_total:.1f}")]
    print(f"\n{args.images} synthetic shapes, {args.epochs} epochs, batch 128, quickstart student, teacher width "
          f"{args.teacher_width} (6+6 layers); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| what | seconds per epoch: wall (CPU) | fit total, wall (s) |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nepoch time, cached vs uncached (wall, mean over epochs): {mean[0] / mean[1]:.2f}x faster")


if __name__ == "__main__":
    main()
