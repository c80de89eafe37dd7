"""The two numbers that size ``optim.contrastive_chunks``: a chunk's memory per pair, and the loss's per logit.

    python benchmarks/chunk_memory.py                          # CLIP ViT-B/16 towers, bf16 autocast
    python benchmarks/chunk_memory.py --grad-checkpointing     # the same, each layer recomputed in backward
    python benchmarks/chunk_memory.py --config my_experiment.yaml --precision fp32

A chunked training step (vlm_lab/gradient_cache.py) holds, on top of the weights, their gradients
and the optimizer's state, (a) the activations of one chunk, ``chunk size x A`` bytes, and (b) the
loss over the whole batch, ``K x 4 bytes`` per logit (``local batch x global batch`` logits for CLIP
with ``local_loss``). docs/how-to/contrastive-chunks.md turns them into a chunk size.

- ``A``: the peak tensor memory of a training step (loss forward and backward, no optimizer step)
  on a batch of 8 pairs in chunks of 4 and in chunks of 2, each in a fresh process; the difference
  over 2 pairs is the memory one more pair in a chunk costs, whatever is fixed.
- ``K``: the peak tensor memory of each loss's forward and backward on ``b x 512`` features
  (one process, so ``b x b`` logits), over ``4 b^2`` bytes.

Memory is what torch's CPU memory profiler counts (see ``contrastive_chunks.tensor_peak``), under
CPU autocast for ``--precision bf16``: the same layers run in bf16 as under CUDA autocast, so ``A``
transfers to a GPU up to what its kernels keep (measure there with
``torch.cuda.max_memory_allocated`` when you have one). The default towers are CLIP ViT-B/16's: a
224 px, patch 16, 768-wide, 12-layer ViT and a 77-token, 512-wide, 12-layer text transformer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import vlm_lab  # noqa: E402
from contrastive_chunks import tensor_peak  # noqa: E402
from vs_open_clip_pairs import machine, small_clip_config  # noqa: E402

VIT_B16 = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12}
TEXT_B = {"vocab_size": 49408, "context_length": 77, "width": 512, "layers": 12, "heads": 8}
BATCH = 8
CHUNK_SIZES = (2, 4)
LOSS_ROWS = 2048


def step_peak(args: argparse.Namespace, chunk_size: int) -> float:
    """Peak tensor bytes of one training step (after a warm-up step) with chunks of ``chunk_size``."""
    overrides = [f"optim.contrastive_chunks={BATCH // chunk_size}"]
    if args.grad_checkpointing:
        overrides += ["model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true"]
    if args.config:
        cfg = vlm_lab.load_config(args.config, overrides=overrides)
    else:
        cfg = vlm_lab.load_config(overrides=[*small_clip_config(VIT_B16, TEXT_B, 512), *overrides])
    torch.manual_seed(0)
    module = vlm_lab.build_module(cfg).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, len(module.tokenizer), (BATCH, module.max_length), generator=generator)
    batch = {"pixel_values": torch.randn(BATCH, 3, *module.image_config.size, generator=generator),
             "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}  # full-length captions

    def step() -> None:
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = module.losses(batch)["loss"]
        loss.backward()  # outside autocast, as Lightning's precision plugin runs it

    step()
    module.zero_grad(set_to_none=True)
    return tensor_peak(step)


def loss_peak(name: str) -> float:
    """Peak tensor bytes of a loss's forward and backward on LOSS_ROWS x 512 features, per 4-byte logit."""
    loss = vlm_lab.registry.build("loss", {"name": name})
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(LOSS_ROWS, 512, generator=generator), dim=-1)
                   .requires_grad_() for _ in range(2))
    return tensor_peak(lambda: loss(image, text).backward()) / (4 * LOSS_ROWS**2)


def in_fresh_process(args: argparse.Namespace, what: str) -> float:
    command = [sys.executable, __file__, "--measure", what, "--precision", args.precision]
    if args.grad_checkpointing:
        command.append("--grad-checkpointing")
    if args.config:
        command += ["--config", args.config]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {what} failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an experiment YAML (default: CLIP ViT-B/16 towers)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the fresh-process worker
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        kind, value = args.measure.split(":")
        print(step_peak(args, int(value)) if kind == "chunk" else loss_peak(value))
        return

    peaks = {size: in_fresh_process(args, f"chunk:{size}") for size in CHUNK_SIZES}
    per_pair = (peaks[CHUNK_SIZES[1]] - peaks[CHUNK_SIZES[0]]) / (CHUNK_SIZES[1] - CHUNK_SIZES[0])
    print(f"{machine()}\nmodel: {args.config or 'CLIP ViT-B/16 towers'}, {args.precision}"
          f"{', gradient checkpointing' if args.grad_checkpointing else ''}")
    for size, peak in peaks.items():
        print(f"step of {BATCH} pairs in chunks of {size}: peak {peak / 2**20:.0f} MB of tensors")
    print(f"A = {per_pair / 2**20:.1f} MB per pair in a chunk")
    for name in ("clip", "siglip"):
        print(f"K = {in_fresh_process(args, f'loss:{name}'):.1f} for the {name} loss "
              f"({LOSS_ROWS} x {LOSS_ROWS} logits, one process)")


if __name__ == "__main__":
    main()
