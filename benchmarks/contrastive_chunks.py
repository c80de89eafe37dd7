"""A contrastive batch larger than memory: vlm-lab's chunked step against its whole-batch step and
open_clip's ``--accum-freq``, the same small CLIP, weights and data, in one run.

    python benchmarks/contrastive_chunks.py                        # batch 512 in chunks of 64, 3 measured steps
    python benchmarks/contrastive_chunks.py --batch-size 256 --chunk-size 32 --steps 5
    python benchmarks/contrastive_chunks.py --threads 2                 # torch's intra-op threads (default 1)

Three training steps on the same batch of 512 pairs, fp32, CPU, from the same weights
(``vs_open_clip_pairs.small_clip_pair``: a ViT of 64 px / patch 8 and a causal text transformer of 32
tokens, both width 128 with 2 layers, open_clip's 49,408-token vocabulary, 128-d embeddings):

- ``vlm-lab, whole batch``: ``VisionLanguageModule.losses`` on all 512 pairs, backward, AdamW;
- ``vlm-lab, chunks``: the same with ``optim.contrastive_chunks = 512 / 64`` (vlm_lab/gradient_cache.py);
- ``open_clip --accum-freq 8``: open_clip_train's own ``train_one_epoch`` (the installed package,
  called as its ``main`` calls it, ``args.accum_freq = 8``) on 8 micro-batches of 64, which is its
  way of training on those 512 pairs.

Each step is forward, loss, backward and one AdamW step (decay on matrices; the fused kernel for
vlm-lab, torch's default for open_clip, as each project builds it). The three take turns step by step
(A, B, C, A, ...) so that a change in the machine's load hits them alike; the figures are medians
over the measured steps, wall time and this process's CPU time.

Threads: one by default. On a machine whose cores other jobs share, each of torch's parallel
regions waits for a thread the operating system may have descheduled; that costs per operator, so
it penalises the many small operators of 64-pair chunks far more than the few large ones of the
whole batch (on the 2 cores loaded by ~10 jobs where this was written, with 2 threads the chunked
steps of both vlm-lab and open_clip took 4x the whole-batch step, with 1 thread about 1.1x). One
thread measures the work; ``--threads`` measures the other case.

Loss: each system's loss of the first step (from the same weights) and the largest relative
difference of its first gradients from the whole-batch step's, tower weights and temperature apart:
vlm-lab's chunks must match both; open_clip's recomputed chunks give the towers the whole-batch
gradient, but every micro-batch's backward adds the *whole* loss's gradient to the temperature, so
it receives ``accum_freq`` times its gradient (open_clip issues 761 and 957 ask about this).

Peak memory: the most tensor memory a step holds on top of the weights, the optimizer state and the
batch, measured by torch's CPU memory profiler (``profile_memory=True``: every tensor allocation and
free, with the running total) in one fresh process per system, over one step after a warm-up step.
That counts exactly what the activations, gradients and caches take. The resident set size would
not: glibc keeps memory a process freed for its next allocations, so the growth of a process's peak
resident set during a step depends on what ran before it (after a warm-up step it showed a third of
the whole-batch step's tensor peak) and on the allocator's thresholds, not on the step alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import open_clip  # noqa: E402
import torch  # noqa: E402
from open_clip_train.train import train_one_epoch  # noqa: E402

from vlm_lab.interop.open_clip import native_to_open_clip  # noqa: E402
from vs_open_clip_pairs import machine, median, small_clip_batch, small_clip_pair  # noqa: E402
from vs_open_clip_throughput import adamw  # noqa: E402

VISION = {"image_size": 64, "patch_size": 8, "width": 128, "layers": 2, "heads": 4}
TEXT = {"vocab_size": 49408, "context_length": 32, "width": 128, "layers": 2, "heads": 4}
EMBED_DIM = 128
SYSTEMS = ("vlm-lab, whole batch", "vlm-lab, chunks", "open_clip --accum-freq")


class VlmLabStep:
    """vlm-lab's training step in a plain loop (the loss Lightning would backpropagate, then AdamW)."""

    def __init__(self, batch: dict[str, torch.Tensor], chunks: int) -> None:
        self.module, _ = small_clip_pair(VISION, TEXT, EMBED_DIM, overrides=[f"optim.contrastive_chunks={chunks}"])
        self.batch, self.optimizer = batch, adamw(self.module, fused=True)
        self.losses: list[float] = []
        self.first_gradients = first_gradients(self.optimizer, self.module, native_to_open_clip)

    def step(self) -> None:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.module.losses(self.batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())


class _RecordedClipLoss(open_clip.ClipLoss):
    """open_clip's ClipLoss, keeping the value of the last total loss it computed."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        self.last = float((sum(out.values()) if isinstance(out, dict) else out).detach())
        return out


class _Loader(list):
    """The ``data['train'].dataloader`` open_clip_train expects: batches with their counts."""

    @property
    def num_batches(self) -> int:
        return len(self)

    @property
    def num_samples(self) -> int:
        return sum(len(images) for images, _ in self)


class OpenClipStep:
    """One optimizer step of open_clip_train's ``train_one_epoch`` with ``--accum-freq``: an "epoch"
    of ``accum_freq`` micro-batches that together hold the batch."""

    def __init__(self, batch: dict[str, torch.Tensor], accum_freq: int) -> None:
        _, self.model = small_clip_pair(VISION, TEXT, EMBED_DIM)
        self.model.output_dict = True  # what open_clip_train's create_model_and_transforms sets
        self.optimizer = adamw(self.model, fused=None)
        self.loss = _RecordedClipLoss()
        micro = [(images, texts) for images, texts in zip(batch["pixel_values"].chunk(accum_freq),
                                                          batch["input_ids"].chunk(accum_freq))]
        self.data = {"train": SimpleNamespace(dataloader=_Loader(micro), set_epoch=lambda epoch: None)}
        self.args = SimpleNamespace(device="cpu", precision="fp32", accum_freq=accum_freq, distill=False,
                                    skip_scheduler=True, grad_clip_norm=None, horovod=False, log_every_n_steps=100,
                                    world_size=1, rank=0, local_rank=0, batch_size=len(micro[0][0]), wandb=False)
        self.losses: list[float] = []
        self.first_gradients = first_gradients(self.optimizer, self.model, lambda grads: grads)

    def step(self) -> None:
        train_one_epoch(self.model, self.data, self.loss, 0, self.optimizer, None, None, None, self.args)
        self.losses.append(self.loss.last)


def first_gradients(optimizer: torch.optim.Optimizer, model: torch.nn.Module, rename) -> dict[str, torch.Tensor]:
    """Filled with the gradients of the first optimizer step (open_clip names), through a step pre-hook."""
    grads: dict[str, torch.Tensor] = {}

    def keep(optimizer, args, kwargs) -> None:
        if not grads:
            grads.update(rename({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))

    optimizer.register_step_pre_hook(keep)
    return grads


def build(system: str, args: argparse.Namespace):
    batch = small_clip_batch(small_clip_pair(VISION, TEXT, EMBED_DIM)[0], args.batch_size)
    chunks = args.batch_size // args.chunk_size
    if system == SYSTEMS[0]:
        return VlmLabStep(batch, 1)
    if system == SYSTEMS[1]:
        return VlmLabStep(batch, chunks)
    return OpenClipStep(batch, chunks)


# --------------------------------------------------------------------------------------------------
# Memory: one system per fresh process


def peak_memory(system: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak tensor memory of one step after a warm-up step (torch's CPU memory profiler)."""
    stepper = build(system, args)
    stepper.step()  # the optimizer's state exists from here on, as in any later step
    stepper.optimizer.zero_grad(set_to_none=True)
    return {"tensors_mb": tensor_peak(stepper.step) / 2**20}


def tensor_peak(run: Callable[[], Any]) -> int:
    """The most CPU tensor memory ``run()`` holds at once beyond what existed before, in bytes.

    Read from torch's memory profiler, which records every allocation and free with the running
    total. Call it once per process: the profiler's running total carries over between sessions.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])
    # "Total Allocated" runs on from whatever the reporter counted before profiling; start from zero.
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


def measure_in_fresh_processes(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for system in SYSTEMS:
        command = [sys.executable, __file__, "--memory-of", system, "--batch-size", str(args.batch_size),
                   "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"memory run of {system} failed:\n{result.stderr[-3000:]}")
        out[system] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------------------
# The run


def gradient_gaps(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(towers: the largest difference over the weights relative to each weight's largest gradient entry,
    temperature: its gradient over the reference's)."""
    towers = max((other[k] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                 for k, g in reference.items() if k != "logit_scale" and g.abs().max() > 1e-9)
    return towers, other["logit_scale"].item() / reference["logit_scale"].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1, help="steps of each system left out of the timings")
    parser.add_argument("--steps", type=int, default=3, help="measured steps of each system")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (see the docstring)")
    parser.add_argument("--memory-of", choices=SYSTEMS, help=argparse.SUPPRESS)  # the fresh-process worker
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.batch_size % args.chunk_size:
        parser.error("--chunk-size must divide --batch-size (open_clip's micro-batches are equal)")
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args)))
        return

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    memory = measure_in_fresh_processes(args)
    steppers = {system: build(system, args) for system in SYSTEMS}
    seconds: dict[str, list[tuple[float, float]]] = {system: [] for system in SYSTEMS}
    for _ in range(args.warmup + args.steps):
        for system, stepper in steppers.items():
            start = (time.perf_counter(), time.process_time())
            stepper.step()
            seconds[system].append((time.perf_counter() - start[0], time.process_time() - start[1]))

    chunks = args.batch_size // args.chunk_size
    whole, chunked, open_clip_row = (steppers[s] for s in SYSTEMS)
    print(f"\n{machine()}\n{started}, commit {commit}; batch {args.batch_size} in chunks of {args.chunk_size} "
          f"({chunks} chunks; open_clip --accum-freq {chunks}), fp32, {args.steps} measured steps each after "
          f"{args.warmup} warm-up step, taking turns\n")
    print("| | step time (median) | CPU time per step | peak tensor memory | first loss "
          "| towers' gradients vs whole batch | temperature's gradient vs whole batch |")
    print("|---|---|---|---|---|---|---|")
    stats = {}
    for system, stepper in steppers.items():
        measured = seconds[system][args.warmup:]
        wall, cpu = median([s[0] for s in measured]), median([s[1] for s in measured])
        stats[system] = (wall, cpu)
        towers, temperature = gradient_gaps(whole.first_gradients, stepper.first_gradients)
        print(f"| {system} | {wall:.2f} s | {cpu:.2f} s | {memory[system]['tensors_mb']:.0f} MB "
              f"| {stepper.losses[0]:.7f} | {towers:.1e} | {temperature:.3g}x |")
    mem = {s: memory[s]["tensors_mb"] for s in SYSTEMS}
    ratio = {kind: stats[SYSTEMS[1]][i] / stats[SYSTEMS[0]][i] for i, kind in enumerate(("wall", "CPU"))}
    speed = {kind: stats[SYSTEMS[2]][i] / stats[SYSTEMS[1]][i] for i, kind in enumerate(("wall", "CPU"))}
    print(f"\nvlm-lab chunks vs whole batch: memory {mem[SYSTEMS[1]] / mem[SYSTEMS[0]]:.2f}x (target <= 0.35x), "
          f"step time {ratio['wall']:.2f}x wall, {ratio['CPU']:.2f}x CPU (target <= 1.4x)")
    print(f"vlm-lab chunks vs open_clip --accum-freq {chunks}: loss difference "
          f"{abs(chunked.losses[0] - open_clip_row.losses[0]):.1e} (target <= 1e-5), speed {speed['wall']:.2f}x "
          f"open_clip's wall, {speed['CPU']:.2f}x CPU (target >= 1.0x), memory "
          f"{mem[SYSTEMS[1]] / mem[SYSTEMS[2]]:.2f}x open_clip's (target <= 1.0x)")
    assert math.isfinite(chunked.losses[-1])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
