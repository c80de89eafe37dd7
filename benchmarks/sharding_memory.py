"""Training memory per process, sharded (``trainer.strategy: fsdp2``) against DDP, on 2 CPU processes.

    python benchmarks/sharding_memory.py                  # ViT-B/16 + CLIP base text, batch 2 at 224 px
    python benchmarks/sharding_memory.py --steps 3 --json out.json

The model is a real ``VisionLanguageModule``: the ``clip_vit_b16`` vision tower (224 px, 86M
parameters) and the ``clip_text_base`` text tower (width 512, 12 layers, 77 tokens), linear heads into
512 dimensions and the CLIP loss. Two gloo processes (started by this script) each build it and take
real AdamW steps on their half of a batch of random images and full-length captions, four ways in
turn:

* ``ddp``: torch's DistributedDataParallel (what ``trainer.strategy: ddp`` wraps the module in);
* ``fsdp2``: the module sharded by ``vlm_lab.sharding.shard_module``, as ``trainer.strategy: fsdp2`` does;
* LiT (vision tower locked) under ``ddp``, ``fsdp2`` with ``locked: shard`` and with ``locked: replicate``:
  the measurement behind the strategy's default for locked towers.

What is counted. After the steps, the bytes of the tensors each process holds for training: its
parameters (a sharded parameter counts its local shard only), their gradients (local shards) and
the optimizer's state (AdamW's two moments and step counters, local shards). This accounting is exact
and independent of the allocator; the real steps before it prove that every gradient and optimizer
state exists. Not counted: activations (batch-dependent, the same under both), DDP's communication
buckets (``gradient_as_bucket_view=True`` makes the gradients views into them, so they are counted
once) and FSDP2's gathered parameters, which exist only while a block runs.

Step time is the median wall-clock seconds of the steps after the first, with the process's CPU
seconds beside it; on a loaded machine compare ratios from one run.
"""

from __future__ import annotations

import argparse
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

import torch

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
MODEL = ["model.vision.name=clip_vit_b16", "model.text.name=clip_text_base", "model.embed_dim=512",
         "model.tokenizer.max_length=77"]
LIT = ["model.vision_lock.lock=true"]
# name: (config overrides, strategy, sharding settings)
CONFIGS = {
    "ddp": (MODEL, "ddp", None),
    "fsdp2": (MODEL, "fsdp2", {}),
    "lit ddp": (MODEL + LIT, "ddp", None),
    "lit fsdp2, locked: shard": (MODEL + LIT, "fsdp2", {"locked": "shard"}),
    "lit fsdp2, locked: replicate": (MODEL + LIT, "fsdp2", {"locked": "replicate"}),
}


class _TrainingStep(torch.nn.Module):
    """Routes DDP's forward to the module's real ``training_step`` (as Lightning's wrapper does)."""

    def __init__(self, module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.training_step(batch, 0)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _batch(rank: int, per_rank: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return {"pixel_values": torch.randn(per_rank, 3, 224, 224, generator=gen),
            "input_ids": torch.randint(1000, vocab, (per_rank, seq), generator=gen),
            "attention_mask": torch.ones(per_rank, seq, dtype=torch.long),
            "text_image_index": torch.arange(per_rank), "image_ids": torch.arange(per_rank) + rank * per_rank}


def worker(init_file: str, out_file: str, rank: int, per_rank: int, steps: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    import vlm_lab
    from vlm_lab.sharding import ShardingSettings, shard_module

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results = {}
    for name, (overrides, strategy, settings) in CONFIGS.items():
        cfg = vlm_lab.load_config(overrides=overrides)
        torch.manual_seed(0)
        module = vlm_lab.build_module(cfg).train()
        batch = _batch(rank, per_rank, cfg.model.tokenizer.max_length, len(module.tokenizer))
        if strategy == "ddp":
            step_module = DistributedDataParallel(_TrainingStep(module), gradient_as_bucket_view=True)
            step = lambda: step_module(batch)  # noqa: E731
        else:
            shard_module(module, mesh, ShardingSettings(**settings))
            step = lambda: module.training_step(batch, 0)  # noqa: E731
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
        walls, cpus = [], []
        for _ in range(steps):
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            optimizer.zero_grad(set_to_none=False)
            step().backward()
            optimizer.step()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        results[name] = {
            "parameters": _bytes(module.parameters()),
            "gradients": _bytes(p.grad for p in module.parameters() if p.grad is not None),
            "optimizer": _bytes(state),
            "parameter_count": sum(_local(p).numel() for p in module.parameters()),
            "wall_s": statistics.median(walls[1:] or walls), "cpu_s": statistics.median(cpus[1:] or cpus),
        }
        results[name]["total"] = sum(results[name][k] for k in ("parameters", "gradients", "optimizer"))
        del module, optimizer, state, step
        if strategy == "ddp":
            del step_module
    Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run(per_rank: int, steps: int) -> dict:
    """Start the two workers; rank 0's and rank 1's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"{tmp}/store", f"{tmp}/{rank}.json",
                                   str(rank), str(per_rank), str(steps)], env=env) for rank in range(WORLD_SIZE)]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"a worker failed (exit status {proc.returncode})")
        return {rank: json.loads(Path(f"{tmp}/{rank}.json").read_text()) for rank in range(WORLD_SIZE)}


def table(results: dict) -> str:
    mib = 2**20
    rows = ["| per process (rank 0) | parameters | gradients | optimizer state | total | vs DDP | step, wall | "
            "step, CPU |", "|---|---|---|---|---|---|---|---|"]
    rank0 = results[0]
    for name, figures in rank0.items():
        reference = rank0["lit ddp" if name.startswith("lit") else "ddp"]["total"]
        rows.append(f"| {name} | {figures['parameters'] / mib:.0f} MiB | {figures['gradients'] / mib:.0f} MiB | "
                    f"{figures['optimizer'] / mib:.0f} MiB | **{figures['total'] / mib:.0f} MiB** | "
                    f"{figures['total'] / reference:.2f}x | {figures['wall_s']:.1f} s | {figures['cpu_s']:.1f} s |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-per-process", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="real steps per configuration (the first is not timed)")
    parser.add_argument("--json", help="also write the figures of both ranks here")
    args = parser.parse_args()
    start = time.strftime("%Y-%m-%d %H:%M")
    results = run(args.batch_per_process, args.steps)
    print(f"{platform.node()} ({os.cpu_count()} CPUs), {start}, {WORLD_SIZE} gloo processes, "
          f"batch {args.batch_per_process} per process at 224 px, {args.steps} steps per configuration")
    print(table(results))
    # Rank 1 holds the same amounts within a shard's rounding: shards differ by at most one row.
    ratio = results[0]["fsdp2"]["total"] / results[0]["ddp"]["total"]
    print(f"\nsharded / DDP, parameters + gradients + optimizer state per process: {ratio:.3f}x (target <= 0.6x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.path.insert(0, str(REPO))
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
