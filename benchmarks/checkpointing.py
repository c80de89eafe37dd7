"""Peak memory and step time of a training step with and without gradient checkpointing, on CPU.

    python benchmarks/checkpointing.py                       # ViT-B/16 + CLIP base text, batch 32
    python benchmarks/checkpointing.py --batch-size 8 --steps 3 --repeats 2
    python benchmarks/checkpointing.py --device cuda --precision bf16-mixed --batch-size 128   # a GPU

The model is a real ``VisionLanguageModule``: the ``clip_vit_b16`` vision tower (224 px, 86M
parameters), the ``clip_text_base`` text tower (width 512, 12 layers, 77 tokens), linear heads into
512 dimensions and the CLIP loss; a step is forward, backward and an AdamW update of every
parameter, on a fixed batch of random images and full-length (77-token) captions.
``grad_checkpointing`` is switched on for both towers (``model.vision.grad_checkpointing=true``, the
same for ``model.text``).

How memory is measured. Each configuration runs in a fresh process, so nothing one leaves behind
counts against the other. The figure is the peak resident set size (the kernel's ``VmHWM``) over
the measured steps: once the optimizer state is allocated, the peak is reset
(``/proc/self/clear_refs``) and the measured steps run. glibc's malloc keeps freed memory around and
lets the heap grow, so ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB: every tensor of any size gets
its own mapping and gives it back when freed, and the resident size follows the live tensors.
``baseline`` is the resident size between steps (weights, AdamW state, the batch, the libraries);
``activations`` is peak minus baseline, what checkpointing can save. (tracemalloc sees no tensor
memory, and torch keeps no allocator statistics for CPU tensors, hence the resident size.)

Step time is the median wall-clock time over the measured steps (and repeats); CPU time is the
process's own CPU seconds per step (all its threads), which other processes competing for the
cores inflate less than wall-clock time. Linux only (``/proc``). Timings depend on what else runs
on the machine: check ``uptime`` first, and compare the two ratios.

On a GPU (``--device cuda``, ``benchmarks/gpu_check.sh`` runs it so) the figures are CUDA's own
allocator counters instead of the resident size: ``baseline`` is ``torch.cuda.memory_allocated()``
between steps and the peak ``torch.cuda.max_memory_allocated()`` over the measured steps, reset at the
baseline; ``--precision bf16-mixed`` runs the step under bf16 autocast. ``--tiny`` swaps in the
toy towers (``clip_vit_tiny``, ``clip_text_tiny``) to check the script, measuring nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def worker(checkpointing: bool, batch_size: int, steps: int, device: str = "cpu", precision: str = "32",
           tiny: bool = False) -> dict:
    """One configuration in this (fresh) process: the figures as a dict."""
    import contextlib

    import torch

    import vlm_lab

    towers = ["model.vision.name=clip_vit_tiny", "model.text.name=clip_text_tiny"] if tiny else \
        ["model.vision.name=clip_vit_b16", "model.text.name=clip_text_base"]
    overrides = [
        *towers, "model.embed_dim=512",
        f"model.vision.grad_checkpointing={str(checkpointing).lower()}",
        f"model.text.grad_checkpointing={str(checkpointing).lower()}",
    ]
    cfg = vlm_lab.load_config(overrides=overrides)
    torch.manual_seed(0)
    module = vlm_lab.build_module(cfg).train().to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    size = module.image_config.size
    batch = {
        "pixel_values": torch.randn(batch_size, 3, *size, generator=gen),
        "input_ids": torch.randint(1000, 20000, (batch_size, module.max_length), generator=gen),
        "attention_mask": torch.ones(batch_size, module.max_length, dtype=torch.long),
        "text_image_index": torch.arange(batch_size),
        "image_ids": torch.arange(batch_size),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    cuda = torch.device(device).type == "cuda"
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) \
        if precision == "bf16-mixed" else contextlib.nullcontext

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step() -> tuple[float, float]:
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        with autocast():
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start, time.process_time() - start_cpu

    import warnings

    warnings.simplefilter("ignore")  # training_step's self.log() without a Trainer
    # AdamW's state exists from the first step on; create it up front rather than spend a whole step.
    for parameter in module.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:  # CUDA's allocator counts exactly what tensors occupy
        sync()
        baseline = torch.cuda.memory_allocated(device) // 1024
        torch.cuda.reset_peak_memory_stats(device)
        times = [step() for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated(device) // 1024
    else:
        baseline = _status_kib("VmRSS")
        _reset_peak()
        times = [step() for _ in range(steps)]
        peak = _status_kib("VmHWM")
    return {"device": device, "precision": precision, "memory": "cuda allocated" if cuda else "resident set",
        "checkpointing": checkpointing, "batch_size": batch_size,
        "step_times_s": [wall for wall, _ in times], "step_cpu_s": [cpu for _, cpu in times],
        "peak_mib": peak / 1024, "baseline_mib": baseline / 1024,
        "parameters_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
    }


def run_configuration(checkpointing: bool, batch_size: int, steps: int, device: str = "cpu", precision: str = "32",
                      tiny: bool = False) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--worker", "--batch-size", str(batch_size), "--steps", str(steps),
               "--device", device, "--precision", precision]
    if checkpointing:
        command.append("--checkpointing")
    if tiny:
        command.append("--tiny")
    output = subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, alternating")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32", choices=("32", "bf16-mixed"))
    parser.add_argument("--tiny", action="store_true", help="toy towers: checks the script, measures nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.checkpointing, args.batch_size, args.steps, args.device, args.precision,
                                args.tiny)))
        return

    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for checkpointing in (False, True):  # alternate, so a change in machine load hits both
            runs[checkpointing].append(run_configuration(checkpointing, args.batch_size, args.steps, args.device,
                                                         args.precision, args.tiny))
    summary = {}
    for checkpointing, results in runs.items():
        summary[checkpointing] = {
            "step_s": statistics.median(t for r in results for t in r["step_times_s"]),
            "cpu_s": statistics.median(t for r in results for t in r["step_cpu_s"]),
            "peak_mib": max(r["peak_mib"] for r in results),
            "baseline_mib": statistics.median(r["baseline_mib"] for r in results),
        }
    off, on = summary[False], summary[True]
    first = runs[False][0]
    where = (f"{args.device}, {args.precision}, memory: {first['memory']}" if args.device != "cpu" else
             f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{first['threads']} torch threads)")
    towers = "clip_vit_tiny + clip_text_tiny" if args.tiny else "clip_vit_b16 + clip_text_base"
    print(f"{towers} ({first['parameters_m']:.0f}M parameters), batch {args.batch_size}, "
          f"{where}, {time.strftime('%Y-%m-%d')}")
    print(f"{'':<22}{'step time':>11}{'CPU time':>11}{'peak mem':>11}{'activations':>13}")
    for name, figures in (("no checkpointing", off), ("grad_checkpointing", on)):
        activations = figures["peak_mib"] - figures["baseline_mib"]
        print(f"{name:<22}{figures['step_s']:>10.2f}s{figures['cpu_s']:>10.2f}s{figures['peak_mib'] / 1024:>8.2f}GiB"
              f"{activations / 1024:>10.2f}GiB")
    ratio_memory = on["peak_mib"] / off["peak_mib"]
    ratio_time = on["step_s"] / off["step_s"]
    ratio_cpu = on["cpu_s"] / off["cpu_s"]
    ratio_activations = (on["peak_mib"] - on["baseline_mib"]) / (off["peak_mib"] - off["baseline_mib"])
    print(f"{'ratio':<22}{ratio_time:>10.2f}x{ratio_cpu:>10.2f}x{ratio_memory:>10.2f}x{ratio_activations:>9.2f}x")
    verdict = "met" if ratio_memory <= 0.6 and ratio_time <= 1.4 else "MISSED"
    print(f"target peak memory <= 0.6x at step time <= 1.4x: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"runs": {str(k): v for k, v in runs.items()}, "ratio_memory": ratio_memory,
                                         "ratio_time": ratio_time, "ratio_cpu": ratio_cpu}, indent=2) + "\n")


if __name__ == "__main__":
    main()
