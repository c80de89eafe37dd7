"""Training throughput, vlm-lab against open_clip: the same small CLIP, batch, precision and data.

    python benchmarks/vs_open_clip_throughput.py                       # batch 64, 2 warm-up + 10 measured steps
    python benchmarks/vs_open_clip_throughput.py --steps 30 --batch-size 64
    python benchmarks/vs_open_clip_throughput.py --profile             # torch.profiler: top operators of each
    python benchmarks/vs_open_clip_throughput.py --device cuda --precision bf16-mixed --batch-size 256  # a GPU

Both sides train a ViT (64 px, patch 8, width 256, 4 layers) and a causal text transformer (32
tokens, width 256, 4 layers, open_clip's 49,408-token vocabulary) with linear projections into
256-d and the CLIP loss, in fp32 on the CPU, from the same weights
(``vs_open_clip_pairs.small_clip_pair``) on the same in-memory batch. A train step is forward,
loss, backward and an AdamW step (decay on matrices only, as both projects do). Rows:

- ``vlm-lab (Lightning)``: the ``VisionLanguageModule`` trained by Lightning
  (``vlm_lab.api.build_trainer``, logging on, as a user's run; a step is the interval between two
  batch starts, so the loop's own work counts);
- ``open_clip``: ``open_clip.CLIP`` with ``open_clip.ClipLoss`` in a plain loop, as
  ``open_clip_train`` runs it (``torch.optim.AdamW`` with torch's defaults);
- ``vlm-lab, plain loop``: the same module without Lightning (``module.losses``, backward, the fused
  AdamW that ``configure_optimizers`` builds), which separates the framework's cost from the model's;
- ``open_clip, fused AdamW``: open_clip's model with vlm-lab's optimizer, which separates the
  optimizer's share from the model's.

The four take turns step by step (A, B, C, D, A, ...; the plain loops' steps run from inside the
Lightning loop's batch-end hook, outside vlm-lab's measured interval), so a change in machine load
hits all of them alike. Prints the median step time, samples/s and CPU seconds per step (this
process, all threads), and the ratios to open_clip.

``--device cuda --precision bf16-mixed`` runs all four on a GPU under bf16 autocast (Lightning's
``bf16-mixed`` for vlm-lab, ``torch.autocast`` for the plain loops), with the batch resident on the
GPU for every row and the clocks read after ``torch.cuda.synchronize()``; ``benchmarks/gpu_check.sh``
runs it that way at batch 256. ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.api import build_trainer  # noqa: E402
from vs_open_clip_pairs import (machine, median, open_clip_loss, small_clip_batch, small_clip_config,  # noqa: E402
                                small_clip_pair, SMALL_TEXT, SMALL_VISION, vlm_lab_loss)

LR, BETAS, EPS, WEIGHT_DECAY = 5e-4, (0.9, 0.98), 1e-6, 0.1
# --tiny: the same pair at toy size, to check the script runs (benchmarks/gpu_check.sh --dry-run).
TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
TINY_TEXT = {"vocab_size": 49408, "context_length": 16, "width": 32, "layers": 1, "heads": 2}  # the tokenizer's ids must fit


def adamw(model: torch.nn.Module, fused: bool | None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (open_clip_train's grouping; vlm-lab's is the same).

    ``fused=None`` is torch's default, which open_clip_train uses; vlm-lab asks for the fused kernel.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
                             lr=LR, betas=BETAS, eps=EPS, fused=fused)


def now(device: torch.device) -> tuple[float, float]:
    """Wall and CPU clocks, once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """What Lightning's ``bf16-mixed`` does around a step, for the plain loops; nothing for ``32``."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Stepper:
    """One training step of a model in a plain loop: forward + loss, backward, AdamW."""

    def __init__(self, model: torch.nn.Module, loss_fn, batch: dict[str, torch.Tensor], fused: bool | None,
                 device: torch.device = torch.device("cpu"), precision: str = "32") -> None:
        self.model, self.loss_fn, self.batch = model.to(device), loss_fn, batch
        self.device, self.precision = device, precision
        self.optimizer = adamw(model, fused)
        self.seconds: list[tuple[float, float]] = []

    def step(self) -> None:
        start = now(self.device)
        self.model.train()
        with autocast(self.device, self.precision):
            loss = self.loss_fn(self.model, self.batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        end = now(self.device)
        self.seconds.append((end[0] - start[0], end[1] - start[1]))


class TakeTurns(L.Callback):
    """Times Lightning's steps (batch start to next batch start) and runs the other systems' steps
    in between, outside that interval."""

    def __init__(self, others: list[Stepper], device: torch.device = torch.device("cpu")) -> None:
        self.others, self.device = others, device
        self.seconds: list[tuple[float, float]] = []
        self._start: tuple[float, float] | None = None
        self._paused = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        start = now(self.device)
        if self._start is not None:
            self.seconds.append((start[0] - self._start[0] - self._paused[0],
                                 start[1] - self._start[1] - self._paused[1]))
        self._start = start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = now(self.device)
        with torch.enable_grad():
            for other in self.others:
                other.step()
        end = now(self.device)
        self._paused = (end[0] - start[0], end[1] - start[1])


def profile(module, reference, batch, steps: int = 3) -> None:
    """The top operators of each system's training step, by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for name, model, loss_fn, fused in (("vlm-lab", module, vlm_lab_loss, True),
                                        ("open_clip", reference, open_clip_loss, None)):
        stepper = Stepper(model, loss_fn, batch, fused)
        stepper.step()  # warm-up: AdamW's state, allocator
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                stepper.step()
        print(f"\n## {name}: {steps} steps\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="steps of each system left out of the figures")
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each system")
    parser.add_argument("--profile", action="store_true", help="profile instead of timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32", choices=("32", "bf16-mixed"))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--tiny", action="store_true", help="toy-size towers: checks the script, measures nothing")
    args = parser.parse_args()
    device = torch.device(args.device)
    vision, text, embed_dim = (TINY_VISION, TINY_TEXT, 32) if args.tiny else (SMALL_VISION, SMALL_TEXT, 256)

    module, reference = small_clip_pair(vision, text, embed_dim)
    batch = {key: value.to(device) for key, value in small_clip_batch(module, args.batch_size).items()}
    if args.profile:
        profile(module, reference, batch)
        return
    # Copies for the other rows, so that each optimiser drives its own weights.
    plain_module, fused_reference = small_clip_pair(vision, text, embed_dim)
    others = [Stepper(reference, open_clip_loss, batch, None, device, args.precision),
              Stepper(plain_module, vlm_lab_loss, batch, True, device, args.precision),
              Stepper(fused_reference, open_clip_loss, batch, True, device, args.precision)]
    turns = TakeTurns(others, device)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = vlm_lab.load_config(overrides=[
            *small_clip_config(vision, text, embed_dim), f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}",
            f"trainer.max_steps={total + 1}", "trainer.enable_checkpointing=false",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", f"trainer.accelerator={device.type}", "trainer.devices=1",
            f"trainer.precision={args.precision}"])
        trainer = build_trainer(cfg, run_dir)
        trainer.callbacks.append(turns)
        L.seed_everything(0, verbose=False)
        # The same batch every step, as the other two get it: no data loading on any side.
        loader = torch.utils.data.DataLoader([batch] * (total + 1), batch_size=None)
        trainer.fit(module, train_dataloaders=loader)

    rows = [("vlm-lab (Lightning)", turns.seconds), ("open_clip", others[0].seconds),
            ("vlm-lab, plain loop", others[1].seconds), ("open_clip, fused AdamW (not its default)", others[2].seconds)]
    stats = {name: (median([s[0] for s in seconds[args.warmup:total]]), median([s[1] for s in seconds[args.warmup:total]]))
             for name, seconds in rows}
    print(f"\n{machine()}\n{args.device}, batch {args.batch_size}, {args.precision}, {args.steps} measured steps each after {args.warmup} "
          f"warm-up steps, taking turns\n")
    print("| | step time (median) | samples/s | CPU s per step | vs open_clip (samples/s) |\n|---|---|---|---|---|")
    base = stats["open_clip"][0]
    for name, (wall, cpu) in stats.items():
        print(f"| {name} | {wall * 1000:.0f} ms | {args.batch_size / wall:.1f} | {cpu:.2f} | {base / wall:.2f}x |")
    if args.json:
        figures = {name: {"step_s": wall, "cpu_s": cpu, "samples_per_s": args.batch_size / wall}
                   for name, (wall, cpu) in stats.items()}
        Path(args.json).write_text(json.dumps({"device": args.device, "precision": args.precision,
                                               "batch_size": args.batch_size, "rows": figures}, indent=2))


if __name__ == "__main__":
    main()
