"""Shared by the interop and export tests: tolerances, comparisons, perturbed weights, checkpoints."""

from __future__ import annotations

import lightning as L
import torch

TOLERANCE = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value, so that LayerNorm gains, biases and q/k/v all differ
    and a swapped or mis-transposed weight cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def encode(module, pixels, captions):
    with torch.no_grad():
        return module.encode_image(pixels), module.encode_text(captions)


def save_checkpoint(module, path):
    """A Lightning checkpoint of ``module`` as ``vlm-lab fit`` writes it, without training."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
