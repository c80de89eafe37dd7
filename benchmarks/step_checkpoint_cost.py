"""What step checkpoints cost a training run: ``checkpoint.every_n_steps=50`` on the quickstart model.

    python benchmarks/step_checkpoint_cost.py                          # quickstart's model, batch 32, 100 steps
    python benchmarks/step_checkpoint_cost.py --steps 300 --batch-size 128 --baseline

Fits ``--config`` (validation off, logging off; batches of ``--batch-size``) for ``--steps`` steps with
step checkpoints every ``--every`` steps, times every checkpoint save (``Trainer.save_checkpoint``:
gathering the state and writing the file; a step checkpoint saves ``stepN.ckpt`` and ``last.ckpt``)
and every step (batch end to batch end, the saves included, the first 5 left out), and reports the
share of the training time the saves took: the overhead against a run without step checkpoints,
measured inside one fit, so a machine whose load changes between two fits does not blur it. With
``--baseline`` a second fit without step checkpoints is timed too, for the plain comparison. Also
the size of a step checkpoint (weights, AdamW's two moments, loop and data state). Prints markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
# Batch end to batch end. Lightning runs checkpoint callbacks after the others, so a checkpoint
# written at a step's end falls in the next interval.
from tracking_overhead import WARMUP, StepTimer, timed_fit  # noqa: E402


class SaveTimer:
    """Wraps a trainer's ``save_checkpoint`` and adds up the wall time of its calls."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.seconds, self.calls, self._save = 0.0, 0, trainer.save_checkpoint
        trainer.save_checkpoint = self  # an attribute of this one trainer, for this benchmark only

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._save(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def one_fit(config: str, steps: int, batch_size: int, every: int) -> tuple[StepTimer, SaveTimer, int | None]:
    """One fit; its step timer, its save timer and the size in bytes of a step checkpoint (None without)."""
    overrides = [f"trainer.max_steps={steps}", "trainer.max_epochs=-1", f"data.batch_size={batch_size}",
                 "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.logger=false",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "trainer.accelerator=cpu", f"checkpoint.every_n_steps={every}"]
    timers: list[SaveTimer] = []
    with tempfile.TemporaryDirectory() as run_dir:
        timer = timed_fit(config, overrides, run_dir, prepare=lambda trainer: timers.append(SaveTimer(trainer)))
        saves = timers[0]
        written = sorted(Path(run_dir, "checkpoints").glob("step*.ckpt"))
        size = written[-1].stat().st_size if written else None
    timer.wall, timer.cpu = timer.wall[WARMUP:], timer.cpu[WARMUP:]
    return timer, saves, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline", action="store_true", help="also time a fit without step checkpoints")
    args = parser.parse_args()
    timer, saves, size = one_fit(args.config, args.steps, args.batch_size, args.every)
    writes = args.steps // args.every
    wall, cpu = statistics.fmean(timer.wall), statistics.fmean(timer.cpu)
    # The saves at the end of the fit (the epoch checkpoint Lightning writes when max_steps stops it)
    # fall outside the timed steps; count only the step checkpoints' share.
    per_write = saves.seconds / max(saves.calls, 1) * 2  # stepN.ckpt + last.ckpt
    step_without = (wall * len(timer.wall) - per_write * writes) / len(timer.wall)
    print(f"{args.config}, batch {args.batch_size}, {args.steps} steps, checkpoints every {args.every}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f}\n")
    print("| | value |\n|---|---|")
    print(f"| step, wall / CPU (mean, saves included) | {wall * 1e3:.0f} ms / {cpu * 1e3:.0f} ms |")
    print(f"| one step checkpoint (stepN.ckpt + last.ckpt), wall | {per_write * 1e3:.0f} ms ({saves.calls} saves) |")
    print(f"| overhead: checkpoint time / {args.every} steps' time | "
          f"{100 * per_write / (args.every * step_without):.1f}% |")
    print(f"| step checkpoint size | {size / 2**20:.1f} MiB |")
    if args.baseline:
        plain = one_fit(args.config, args.steps, args.batch_size, 0)[0]
        print(f"| step without step checkpoints (second fit), wall / CPU | "
              f"{statistics.fmean(plain.wall) * 1e3:.0f} ms / {statistics.fmean(plain.cpu) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
