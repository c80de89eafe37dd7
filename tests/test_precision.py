"""Training precision: ``trainer.precision`` 32 and bf16-mixed on CPU, with fp32 where it matters.

Under bf16-mixed the towers and heads run in bfloat16 (autocast), while the logit scale, the
similarity logits that enter the loss function and the loss itself stay float32. The short fits
also run with gradient checkpointing and a partially locked vision tower, the combination a large
run uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlm_lab
from vlm_lab.losses import AlignLoss, ClipLoss, SigLipLoss


TINY_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


class _DtypeSpy:
    """Wraps a function and records the dtype of its first tensor argument and of its result."""

    def __init__(self, function):
        self.function, self.inputs, self.outputs = function, [], []

    def __call__(self, *args, **kwargs):
        self.inputs.append(args[0].dtype if args and isinstance(args[0], torch.Tensor) else None)
        result = self.function(*args, **kwargs)
        self.outputs.append(result.dtype)
        return result


def _fit(precision: str, tmp_path, monkeypatch):
    cfg = vlm_lab.load_config(
        TINY_CONFIG,
        overrides=[f"trainer.precision={precision}", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                   "trainer.num_sanity_val_steps=0", "trainer.logger=false", "trainer.enable_checkpointing=false",
                   "model.vision.layers=2", "model.vision.grad_checkpointing=true",
                   "model.text.grad_checkpointing=true", "model.vision_lock.lock=true",
                   "model.vision_lock.unlocked_groups=1"],
    )
    module = vlm_lab.build_module(cfg)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    # Matmul outputs show the compute precision (LayerNorms and residual sums are fp32 under autocast).
    tower_dtypes: list[torch.dtype] = []
    for linear in (module.vision.encoder.layers[1].mlp.fc1, module.text.encoder.layers[0].mlp.fc1,
                   module.vision_head, module.text_head):
        linear.register_forward_hook(lambda _m, _i, out: tower_dtypes.append(out.dtype))
    # The similarity logits are what the loss hands to cross-entropy.
    cross_entropy = _DtypeSpy(F.cross_entropy)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    scale = _DtypeSpy(module.loss.logit_scale_value)
    monkeypatch.setattr(module.loss, "logit_scale_value", scale)
    losses: list[torch.dtype] = []
    module.loss.register_forward_hook(lambda _m, _i, out: losses.append(out.dtype))

    trainer = vlm_lab.build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    return module, trainer, tower_dtypes, cross_entropy, scale, losses, changed


@pytest.mark.parametrize("precision, compute_dtype", [("bf16-mixed", torch.bfloat16), ("32", torch.float32)])
@pytest.mark.slow
def test_fit_precision_keeps_logits_and_loss_in_fp32(precision, compute_dtype, tmp_path, monkeypatch):
    module, trainer, tower_dtypes, cross_entropy, scale, losses, changed = _fit(precision, tmp_path, monkeypatch)
    assert trainer.precision == {"32": "32-true"}.get(precision, precision) and trainer.global_step == 2
    # The towers and heads really ran in the compute precision ...
    assert tower_dtypes and set(tower_dtypes) == {compute_dtype}
    # ... while every logit matrix, scale and loss of those steps was float32.
    assert len(cross_entropy.inputs) == 2 * 3 and set(cross_entropy.inputs) == {torch.float32}
    assert set(cross_entropy.outputs) == set(scale.outputs) == set(losses) == {torch.float32}
    # Mixed precision keeps float32 weights, and training moved them: the logit scale and the
    # unlocked top of the vision tower, but not its locked embeddings.
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert "loss.logit_scale" in changed and "vision.encoder.layers.1.mlp.fc1.weight" in changed
    assert not any(n.startswith("vision.embeddings.") for n in changed)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("loss_class, loss_function", [(ClipLoss, "cross_entropy"), (AlignLoss, "cross_entropy"),
                                                      (SigLipLoss, "logsigmoid")])
def test_losses_take_bf16_features_and_compute_in_fp32(loss_class, loss_function, monkeypatch):
    spy = _DtypeSpy(getattr(F, loss_function))
    monkeypatch.setattr(torch.nn.functional, loss_function, spy)
    gen = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    loss = loss_class()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(features.bfloat16(), features.bfloat16())
    assert value.dtype == torch.float32 and loss.logit_scale_value().dtype == torch.float32
    assert spy.inputs and set(spy.inputs) == set(spy.outputs) == {torch.float32}


@pytest.mark.parametrize("value, hint", [("17", None), ("bf16-mix", "Did you mean 'bf16-mixed'")])
def test_an_invalid_precision_is_one_line_with_exit_status_2(value, hint, capsys):
    from vlm_lab.cli import main

    assert main(["check", str(TINY_CONFIG), f"trainer.precision={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"vlm-lab: error: trainer.precision={value if hint else int(value)!r} is not")
    assert "valid: 64, 32, 16," in err and "bf16-mixed" in err
    assert hint is None or hint in err
