"""What the default logging callbacks cost a training step: lr_monitor + grad_norm + throughput on, then off.

    python benchmarks/tracking_overhead.py                       # quickstart's model, batch 32, 30 steps, 2 rounds
    python benchmarks/tracking_overhead.py --steps 60 --rounds 5 --batch-size 128   # quickstart as shipped

Fits ``--config`` (validation and checkpoints off, the CSV logger on, logging every step, the worst
case; batches of ``--batch-size``) for ``--steps`` steps with ``default_callbacks`` as shipped and with ``default_callbacks=[]``,
alternating ``--rounds`` times in one process, and reports the median wall and CPU time of a step
(batch end to batch end; the first 5 steps of each fit left out). Timings depend on what else runs on the machine: check
``uptime`` first. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

import vlm_lab  # noqa: E402

WARMUP = 5


class StepTimer(L.Callback):
    """Time from one training batch's end to the next: the whole step, data loading and every hook included."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._last: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
        self._last = now


def timed_fit(config: str, overrides: list[str], run_dir: str,
              prepare: Callable[[L.Trainer], None] | None = None) -> StepTimer:
    """One fit of ``config`` with ``overrides`` in ``run_dir``, seeded, timed step by step; ``prepare``
    gets the trainer before it fits (benchmarks/step_checkpoint_cost.py times its saves there)."""
    cfg = vlm_lab.load_config(config, overrides=overrides)
    L.seed_everything(0, verbose=False)
    module = vlm_lab.build_module(cfg)
    timer = StepTimer()
    trainer = vlm_lab.build_trainer(cfg, run_dir)
    trainer.callbacks.append(timer)
    if prepare is not None:
        prepare(trainer)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    return timer


def one_fit(config: str, steps: int, batch_size: int, defaults: bool) -> StepTimer:
    overrides = [f"trainer.max_steps={steps}", "trainer.max_epochs=-1", f"data.batch_size={batch_size}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                 "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu"]
    if not defaults:
        overrides.append("default_callbacks=[]")
    with tempfile.TemporaryDirectory() as run_dir:
        return timed_fit(config, overrides, run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    times = {True: ([], []), False: ([], [])}
    for _ in range(args.rounds):
        for defaults in (True, False):
            timer = one_fit(args.config, args.steps, args.batch_size, defaults)
            times[defaults][0].extend(timer.wall[WARMUP:])
            times[defaults][1].extend(timer.cpu[WARMUP:])
    wall = {k: statistics.median(v[0]) for k, v in times.items()}
    cpu = {k: statistics.median(v[1]) for k, v in times.items()}
    print(f"| default_callbacks | step wall (ms, median) | step CPU (ms, median) |\n|---|---|---|")
    print(f"| lr_monitor, grad_norm, throughput | {1e3 * wall[True]:.1f} | {1e3 * cpu[True]:.1f} |")
    print(f"| [] | {1e3 * wall[False]:.1f} | {1e3 * cpu[False]:.1f} |")
    print(f"| ratio on/off | {wall[True] / wall[False]:.3f} | {cpu[True] / cpu[False]:.3f} |")


if __name__ == "__main__":
    main()
