"""What step checkpoints cost a training run: ``checkpoint.every_n_steps=50`` against none.

    python benchmarks/step_checkpoint_cost.py                          # quickstart's model, batch 32, 150 steps, 2 rounds
    python benchmarks/step_checkpoint_cost.py --steps 300 --batch-size 128

Fits ``--config`` (validation off, logging off; batches of ``--batch-size``) for ``--steps`` steps with
step checkpoints every ``--every`` steps and without, alternating ``--rounds`` times in one process,
and reports the mean wall and CPU time of a step (batch end to batch end, the checkpoint writes
included, the first 5 steps of each fit left out), the time of one checkpoint write and the size of
a step checkpoint (weights, AdamW's two moments, loop and data state). The mean, not the median: a
write every 50 steps is what the figure is about. Timings depend on what else runs on the machine:
check ``uptime`` first. Prints a markdown table.
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

import vlm_lab  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
# Batch end to batch end. Lightning runs checkpoint callbacks after the others, so a checkpoint
# written at a step's end falls in the next interval.
from tracking_overhead import WARMUP, StepTimer  # noqa: E402


def one_fit(config: str, steps: int, batch_size: int, every: int) -> tuple[StepTimer, int | None]:
    """One fit; its step timer and the size in bytes of a step checkpoint (None without)."""
    overrides = [f"trainer.max_steps={steps}", "trainer.max_epochs=-1", f"data.batch_size={batch_size}",
                 "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.logger=false",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "trainer.accelerator=cpu", f"checkpoint.every_n_steps={every}"]
    cfg = vlm_lab.load_config(config, overrides=overrides)
    L.seed_everything(0, verbose=False)
    module = vlm_lab.build_module(cfg)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = vlm_lab.build_trainer(cfg, run_dir)
        trainer.callbacks.append(timer)
        trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
        written = sorted(Path(run_dir, "checkpoints").glob("step*.ckpt"))
        size = written[-1].stat().st_size if written else None
    timer.wall, timer.cpu = timer.wall[WARMUP:], timer.cpu[WARMUP:]
    return timer, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[StepTimer]] = {"none": [], f"every {args.every} steps": []}
    size = None
    for _ in range(args.rounds):
        runs["none"].append(one_fit(args.config, args.steps, args.batch_size, 0)[0])
        timer, size = one_fit(args.config, args.steps, args.batch_size, args.every)
        runs[f"every {args.every} steps"].append(timer)
    means = {name: (statistics.fmean(w for t in timers for w in t.wall), statistics.fmean(c for t in timers for c in t.cpu))
             for name, timers in runs.items()}
    base_wall, base_cpu = means["none"]
    writes = args.rounds * (args.steps // args.every) if args.every else 0
    print(f"{args.config}, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f}\n")
    print("| step checkpoints | wall ms/step | CPU ms/step | wall vs none |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in means.items():
        print(f"| {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {100 * (wall / base_wall - 1):+.1f}% |")
    if writes:
        extra = (means[f"every {args.every} steps"][0] - base_wall) * len(runs["none"][0].wall) * args.rounds
        print(f"\nstep checkpoint: {size / 2**20:.1f} MiB; about {1e3 * extra / writes:.0f} ms of wall time per write "
              f"({writes} writes)")


if __name__ == "__main__":
    main()
