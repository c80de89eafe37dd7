"""FLIP patch dropout: training step time of a ViT-B/16-sized vision tower at patch_dropout 0.5 vs 0.

    python benchmarks/patch_dropout.py                      # batch 4, 1 warm-up + 4 measured steps each
    python benchmarks/patch_dropout.py --batch-size 8 --steps 6 --clip
    python benchmarks/patch_dropout.py --threads 1                    # steadier CPU seconds on a shared machine

Rows (each a training step: forward, a loss, backward, the fused AdamW step ``configure_optimizers``
builds), in fp32 on the CPU, from the same initial weights:

- the ``clip_vit_b16`` card (224 px, patch 16, width 768, 12 layers, QuickGELU) alone, its pooled
  output into a squared-norm loss: what patch dropout changes;
- with ``--clip``: the whole CLIP step (``VisionLanguageModule.losses``: that tower, the
  ``clip_text_base`` text tower, heads, the CLIP loss), where the text side dilutes the gain.

The settings take turns step by step (0, 0.5, 0, 0.5, ...), so a change in machine load hits both
alike. Prints the median wall and CPU seconds per step and the ratio 0 / 0.5.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab import registry  # noqa: E402
from vs_open_clip_pairs import add_threads_option, machine, median, use_threads  # noqa: E402


class Step:
    """One training step of a model on a fixed batch, timed (wall and this process's CPU seconds)."""

    def __init__(self, model: torch.nn.Module, loss, parameters) -> None:
        self.model, self.loss = model, loss
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True)
        self.seconds: list[tuple[float, float]] = []

    def __call__(self) -> None:
        start = (time.perf_counter(), time.process_time())
        self.model.train()
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.seconds.append((time.perf_counter() - start[0], time.process_time() - start[1]))


def tower_step(prob: float, pixels: torch.Tensor) -> Step:
    torch.manual_seed(0)
    tower = registry.build("vision_tower", {"name": "clip_vit_b16", "patch_dropout": prob})
    return Step(tower, lambda: tower(pixels).pooled.pow(2).mean(), tower.parameters())


def clip_step(prob: float, batch: dict[str, torch.Tensor]) -> Step:
    cfg = vlm_lab.load_config(overrides=["model.vision.name=clip_vit_b16", f"model.vision.patch_dropout={prob}",
                                         "model.text.name=clip_text_base", "model.embed_dim=512"])
    torch.manual_seed(0)
    module = vlm_lab.build_module(cfg)
    return Step(module, lambda: module.losses(batch)["loss"], module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="steps of each setting left out of the figures")
    parser.add_argument("--steps", type=int, default=4, help="measured steps of each setting")
    parser.add_argument("--clip", action="store_true", help="also time the whole CLIP step")
    add_threads_option(parser)
    args = parser.parse_args()
    use_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, 224, 224, generator=generator)
    rows = {f"vision tower, patch_dropout {p}": tower_step(p, pixels) for p in (0.0, 0.5)}
    if args.clip:
        length = 32
        batch = {"pixel_values": pixels, "input_ids": torch.randint(1000, 20000, (args.batch_size, length), generator=generator),
                 "attention_mask": torch.ones(args.batch_size, length, dtype=torch.long),
                 "image_ids": torch.arange(args.batch_size)}
        rows.update({f"CLIP (+ clip_text_base), patch_dropout {p}": clip_step(p, batch) for p in (0.0, 0.5)})
    for _ in range(args.warmup + args.steps):
        for step in rows.values():
            step()

    print(f"\n{machine()}\nbatch {args.batch_size} at 224 px, fp32, {args.steps} measured steps each after "
          f"{args.warmup} warm-up, taking turns\n")
    print("| | step time (median) | CPU s per step | speed-up at 0.5 (wall / CPU) |\n|---|---|---|---|")
    stats = {name: (median([s[0] for s in step.seconds[args.warmup:]]), median([s[1] for s in step.seconds[args.warmup:]]))
             for name, step in rows.items()}
    for name, (wall, cpu) in stats.items():
        if name.endswith(" 0.5"):
            base_wall, base_cpu = stats[name[: -len("0.5")] + "0.0"]
            ratio = f"**{base_wall / wall:.2f}x** / {base_cpu / cpu:.2f}x"
        else:
            ratio = "1.00x"
        print(f"| {name} | {wall:.2f} s | {cpu:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
