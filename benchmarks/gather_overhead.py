"""What the cross-process feature exchange of the contrastive losses costs, with 2 processes on CPU.

    python benchmarks/gather_overhead.py
    python benchmarks/gather_overhead.py --batch-sizes 32 256 1024 --dim 512 --reps 20

Two gloo processes (one torch thread each) measure, for each per-process batch size ``B``:

1. **The exchange alone**: ``gather_features`` on ``[B, dim]`` image and text features, forward and
   backward (two all-gathers, then two all-reduces of their gradients): the communication.
2. **Each loss**, forward and backward, exchange included; and the CLIP loss on the process's own
   batch with no exchange at all. The difference between the two is the whole price of scoring
   against the other process's features: communication plus a logit matrix twice as wide.
3. **A training step**: a DDP step (forward, backward with DDP's gradient all-reduce, AdamW) of the
   quickstart model (``clip_vit_tiny`` + ``clip_text_tiny``, 64 px) with the default CLIP loss,
   against the same step with the loss kept to the process's own batch. This is what a run pays.

For the no-exchange references the benchmark tells the losses that they run alone (``world_info``
returns ``(0, 1)``); nothing else changes. The measurements take turns, so a change in machine
load hits all of them; a time is the slower process's (a step waits for both), median over
``--reps`` rounds after warm-up. Timings depend on what else runs on the machine: check ``uptime``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
EXCHANGE = "the exchange alone (gather_features)"
ALONE = "clip on the process's own batch (no exchange)"
LOSSES = {
    "clip, local (default)": {"name": "clip"},
    "clip, global": {"name": "clip", "local_loss": False},
    "clip, local, gather without grad": {"name": "clip", "gather_with_grad": False},
    "siglip, gather": {"name": "siglip"},
    "siglip, neighbour exchange": {"name": "siglip", "exchange": "neighbour"},
}


@contextlib.contextmanager
def _alone():
    """Make the losses compute on this process's batch only, as if there were no other process."""
    import vlm_lab.distributed as distributed
    import vlm_lab.losses as losses

    originals = losses.world_info, distributed.world_info
    losses.world_info = distributed.world_info = lambda: (0, 1)
    try:
        yield
    finally:
        losses.world_info, distributed.world_info = originals


def _timed(functions: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, run in turn ``reps`` times (so a change in machine load hits
    all of them alike); each run's time is the slower process's, as a step waits for both."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for index in range(warmup + reps):
        for name, function in functions.items():
            dist.barrier()
            start = time.perf_counter()
            function()
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if index >= warmup:
                times[name].append(elapsed.item())
    return {name: statistics.median(values) for name, values in times.items()}


def worker(rank: int, init_file: str, batch_sizes: list[int], dim: int, reps: int, step_batch: int) -> dict:
    import vlm_lab
    from vlm_lab.distributed import gather_features
    from vlm_lab.registry import build

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results: dict = {"loss_ms": {}, "step_ms": {}}

    gen = torch.Generator().manual_seed(rank)
    for batch in batch_sizes:
        images = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
        texts = F.normalize(images + torch.randn(batch, dim, generator=gen), dim=-1)

        def backward_through(function):
            def run():
                image_leaf, text_leaf = images.clone().requires_grad_(), texts.clone().requires_grad_()
                function(image_leaf, text_leaf).backward()
            return run

        def exchange_only(image_features, text_features):
            all_images, all_texts = gather_features(image_features, text_features)
            return all_images.sum() + all_texts.sum()

        def alone(loss):
            def run(image_features, text_features):
                with _alone():
                    return loss(image_features, text_features)
            return run

        functions = {EXCHANGE: backward_through(exchange_only)}
        for name, spec in LOSSES.items():
            functions[name] = backward_through(build("loss", spec))
        functions[ALONE] = backward_through(alone(build("loss", {"name": "clip"})))
        results["loss_ms"][batch] = {name: 1000 * t for name, t in _timed(functions, reps).items()}

    cfg = vlm_lab.load_config(REPO / "experiments" / "quickstart.yaml")
    torch.manual_seed(0)
    module = vlm_lab.build_module(cfg).train()
    ddp = DistributedDataParallel(_TrainingStep(module))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    size = module.image_config.size[0]
    batch = {
        "pixel_values": torch.randn(step_batch, 3, size, size, generator=gen),
        "input_ids": torch.randint(1000, 20000, (step_batch, 16), generator=gen),
        "attention_mask": torch.ones(step_batch, 16, dtype=torch.long),
        "text_image_index": torch.arange(step_batch),
        "image_ids": torch.arange(step_batch),
    }

    def train_step():
        ddp(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_step_alone():
        with _alone():
            train_step()

    step_times = _timed({"with exchange": train_step, "without": train_step_alone}, max(4, reps // 2))
    results["step_ms"] = {name: 1000 * t for name, t in step_times.items()}
    dist.barrier()
    dist.destroy_process_group()
    return results


class _TrainingStep(torch.nn.Module):
    """Routes DDP's forward to the module's ``training_step`` (as Lightning's wrapper does)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module.training_step(batch, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256, 1024], help="per process")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--step-batch", type=int, default=128, help="per process, for the training step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("RANK", "INIT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(int(args.worker[0]), args.worker[1], args.batch_sizes, args.dim, args.reps, args.step_batch)
        if args.worker[0] == "0":
            print(json.dumps(result))
        return

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--batch-sizes", *map(str, args.batch_sizes), "--dim", str(args.dim), "--reps", str(args.reps),
                  "--step-batch", str(args.step_batch)]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), f"{tmp}/store", *common],
                                  env=env, cwd=REPO, stdout=subprocess.PIPE, text=True) for rank in range(2)]
        outputs = [proc.communicate()[0] for proc in procs]
        if any(proc.returncode for proc in procs):
            raise SystemExit("a worker failed")
    results = json.loads(outputs[0].strip().splitlines()[-1])

    print(f"2 gloo processes, 1 thread each, CPU ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}")
    print(f"\nforward+backward, ms, per-process batch B of {args.dim}-dim features")
    batches = list(results["loss_ms"])
    print(f"{'':<44}" + "".join(f"{'B=' + b:>10}" for b in batches))
    for name in [EXCHANGE, *LOSSES, ALONE]:
        print(f"{name:<44}" + "".join(f"{results['loss_ms'][b][name]:>10.2f}" for b in batches))
    step = results["step_ms"]
    overhead = step["with exchange"] - step["without"]
    print(f"\nDDP training step, quickstart model, batch {args.step_batch} per process: "
          f"{step['with exchange']:.1f} ms with the exchange (clip, local), {step['without']:.1f} ms without "
          f"({overhead:+.1f} ms, {100 * overhead / step['without']:+.1f}%)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
