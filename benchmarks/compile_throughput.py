"""torch.compile: training throughput of the small CLIP, vlm-lab compiled and eager against open_clip.

    python benchmarks/compile_throughput.py                    # batch 32, 2 warm-up + 6 measured steps each
    python benchmarks/compile_throughput.py --batch-size 64 --steps 10
    python benchmarks/compile_throughput.py --threads 1                   # steadier CPU seconds on a shared machine
    python benchmarks/compile_throughput.py --threads 1 --modes max-autotune-no-cudagraphs   # one more row

The small CLIP of ``vs_open_clip_throughput.py`` (ViT 64 px / patch 8, text 32 tokens, both width 256
with 4 layers; open_clip's 49,408-token vocabulary; the same weights on both sides), fp32 on the
CPU, one in-memory batch. Each row is a plain training loop (forward, CLIP loss, backward, AdamW;
``vs_open_clip_throughput.Stepper``), so the rows differ only in the model code and compilation:

- ``vlm-lab eager`` and ``vlm-lab, model.compile``: the ``VisionLanguageModule``, its towers compiled
  in place as ``model.compile: true`` does (``compile_towers``, TorchInductor, mode ``default``);
- ``vlm-lab, towers + heads + loss compiled``: also the projection heads and the loss, to see
  whether compiling more than the towers pays;
- ``open_clip eager`` and ``open_clip, torch.compile``: open_clip's ``CLIP`` as ``open_clip_train``
  runs it, without and with ``--torchcompile`` (which calls ``torch.compile`` on the model), and its
  ``ClipLoss``; torch's default AdamW, as there.

The first steps of a compiled row compile (their times are printed, not counted). The rows take turns
step by step, so a change in machine load hits all of them alike. Prints median wall and CPU seconds
per step and the ratios to vlm-lab eager and to open_clip compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from vs_open_clip_pairs import (add_threads_option, machine, median, open_clip_loss, small_clip_batch,  # noqa: E402
                                small_clip_pair, use_threads, vlm_lab_loss)
from vs_open_clip_throughput import Stepper  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="steps of each row left out (compilation happens here)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps of each row")
    parser.add_argument("--modes", nargs="*", default=[], metavar="MODE",
                        help="also rows of model.compile in these model.compile_mode values (e.g. "
                             "max-autotune-no-cudagraphs: TorchInductor's C++ GEMM templates, tuned at the first step)")
    add_threads_option(parser)
    args = parser.parse_args()
    use_threads(args.threads)

    rows: dict[str, Stepper] = {}
    module, reference = small_clip_pair()
    batch = small_clip_batch(module, args.batch_size)
    rows["vlm-lab eager"] = Stepper(module, vlm_lab_loss, batch, True)

    # Built with model.compile: true: the module reads the setting when it is built, so setting
    # hparams afterwards (as this script did until 2026-12-05) compiles nothing.
    compiled, _ = small_clip_pair(overrides=["model.compile=true"])
    compiled.compile_towers()  # what configure_model does in a fit
    rows["vlm-lab, model.compile (towers)"] = Stepper(compiled, vlm_lab_loss, batch, True)

    for mode in args.modes:
        tuned, _ = small_clip_pair(overrides=["model.compile=true", f"model.compile_mode={mode}"])
        tuned.compile_towers()
        rows[f"vlm-lab, model.compile (towers), mode {mode}"] = Stepper(tuned, vlm_lab_loss, batch, True)

    everything, _ = small_clip_pair(overrides=["model.compile=true"])
    everything.compile_towers()
    for part in (everything.vision_head, everything.text_head, everything.loss):
        part.compile()
    rows["vlm-lab, towers + heads + loss compiled"] = Stepper(everything, vlm_lab_loss, batch, True)

    rows["open_clip eager"] = Stepper(reference, open_clip_loss, batch, None)
    _, open_clip_model = small_clip_pair()
    rows["open_clip, torch.compile (--torchcompile)"] = Stepper(torch.compile(open_clip_model), open_clip_loss, batch, None)

    for step in range(args.warmup + args.steps):
        for name, stepper in rows.items():
            stepper.step()
            if step < args.warmup:
                print(f"warm-up step {step} of {name}: {stepper.seconds[-1][0]:.1f} s", flush=True)

    stats = {name: (median([s[0] for s in stepper.seconds[args.warmup:]]),
                    median([s[1] for s in stepper.seconds[args.warmup:]])) for name, stepper in rows.items()}
    eager, peer = stats["vlm-lab eager"], stats["open_clip, torch.compile (--torchcompile)"]
    print(f"\n{machine()}\nbatch {args.batch_size}, fp32, {args.steps} measured steps each after {args.warmup} "
          f"warm-up steps, taking turns; TorchInductor, mode default\n")
    print("| | step time (median) | CPU s per step | vs vlm-lab eager (wall / CPU) | vs open_clip compiled (wall / CPU) |\n"
          "|---|---|---|---|---|")
    for name, (wall, cpu) in stats.items():
        print(f"| {name} | {wall:.2f} s | {cpu:.2f} | {eager[0] / wall:.2f}x / {eager[1] / cpu:.2f}x | "
              f"{peer[0] / wall:.2f}x / {peer[1] / cpu:.2f}x |")
    print(f"\n(time.process_time: this process's CPU seconds; TorchInductor compiles in worker processes, "
          f"{time.process_time():.0f} CPU s in this one overall)")


if __name__ == "__main__":
    main()
