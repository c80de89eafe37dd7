"""Losses against hand-computed values on tiny examples, plus scale handling, precision and sharding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlm_lab.losses as losses
from vlm_lab.errors import ConfigError
from vlm_lab.losses import AlignLoss, ClipLoss, SigLipLoss
from vlm_lab.registry import build

# Two unit-norm pairs. Similarities (rows: images, columns: texts):
#   img0 . txt0 = 0.8   img0 . txt1 = 0.0
#   img1 . txt0 = 0.96  img1 . txt1 = 0.8   (img1 prefers the wrong text)
IMAGES = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
TEXTS = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
SIMS = [[0.8, 0.0], [0.96, 0.8]]


def _set(param: torch.nn.Parameter, value: float) -> None:
    with torch.no_grad():
        param.fill_(value)


def _cross_entropy(logits: list[float], target: int, smoothing: float = 0.0) -> float:
    """Cross-entropy written out: (1 - e) * -log p_target + e * mean_c(-log p_c)."""
    log_z = math.log(sum(math.exp(x) for x in logits))
    nll = [log_z - x for x in logits]
    return (1 - smoothing) * nll[target] + smoothing * sum(nll) / len(nll)


def _symmetric(scale: float, smoothing: float = 0.0) -> float:
    rows = [[scale * s for s in row] for row in SIMS]
    cols = [[rows[i][j] for i in range(2)] for j in range(2)]
    image_loss = (_cross_entropy(rows[0], 0, smoothing) + _cross_entropy(rows[1], 1, smoothing)) / 2
    text_loss = (_cross_entropy(cols[0], 0, smoothing) + _cross_entropy(cols[1], 1, smoothing)) / 2
    return (image_loss + text_loss) / 2


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------------------------------
# CLIP


def test_clip_default_scale_is_one_over_0_07():
    loss = ClipLoss()
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert loss.logit_scale_value().item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_clip_matches_hand_computed_loss():
    loss = ClipLoss()
    _set(loss.logit_scale, math.log(2.0))
    # Scale 2: image rows [1.6, 0] and [1.92, 1.6]; text rows [1.6, 1.92] and [0, 1.6].
    expected = (
        (-1.6 + math.log(math.exp(1.6) + 1)) / 2
        + (-1.6 + math.log(math.exp(1.92) + math.exp(1.6))) / 2
        + (-1.6 + math.log(math.exp(1.6) + math.exp(1.92))) / 2
        + (-1.6 + math.log(1 + math.exp(1.6))) / 2
    ) / 2
    assert expected == pytest.approx(_symmetric(2.0))
    assert loss(IMAGES, TEXTS).item() == pytest.approx(expected, rel=1e-6)


def test_clip_scale_is_capped_at_100():
    loss = ClipLoss()
    _set(loss.logit_scale, math.log(1000.0))
    assert loss.logit_scale_value().item() == pytest.approx(100.0, rel=1e-6)
    value = loss(IMAGES, TEXTS)
    assert value.item() == pytest.approx(_symmetric(100.0), rel=1e-5)
    value.backward()
    # Past the cap the clamp passes no gradient, and the stored parameter is left untouched.
    assert loss.logit_scale.grad.item() == 0.0
    assert loss.logit_scale.item() == pytest.approx(math.log(1000.0))


def test_clip_custom_cap():
    loss = build("loss", {"name": "clip", "max_logit_scale": 10.0})
    assert loss.logit_scale_value().item() == pytest.approx(10.0, rel=1e-6)


def test_clip_gradients_reach_scale_and_features():
    loss = ClipLoss()
    images, texts = IMAGES.clone().requires_grad_(), TEXTS.clone().requires_grad_()
    loss(images, texts).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.item() != 0.0
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0


def test_clip_frozen_scale():
    loss = ClipLoss(learnable_scale=False)
    assert not loss.logit_scale.requires_grad
    loss(IMAGES.clone().requires_grad_(), TEXTS).backward()
    assert loss.logit_scale.grad is None


# --------------------------------------------------------------------------------------------------
# ALIGN


def test_align_matches_explicit_label_smoothing_formula():
    loss = AlignLoss()
    assert loss.temperature.item() == 1.0 and loss.label_smoothing == 0.1
    _set(loss.temperature, 0.5)
    # Label smoothing 0.1 over 2 classes: 0.95 * -log p_target + 0.05 * -log p_other, per row.
    rows = [[1.6, 0.0], [1.92, 1.6]]  # similarities / 0.5
    cols = [[1.6, 1.92], [0.0, 1.6]]

    def smoothed(logits, target):
        log_z = math.log(sum(math.exp(x) for x in logits))
        other = 1 - target
        return 0.95 * (log_z - logits[target]) + 0.05 * (log_z - logits[other])

    expected = (
        (smoothed(rows[0], 0) + smoothed(rows[1], 1)) / 2 + (smoothed(cols[0], 0) + smoothed(cols[1], 1)) / 2
    ) / 2
    assert expected == pytest.approx(_symmetric(2.0, smoothing=0.1))
    assert expected != pytest.approx(_symmetric(2.0), rel=1e-3)
    assert loss(IMAGES, TEXTS).item() == pytest.approx(expected, rel=1e-6)
    assert loss.logit_scale_value().item() == pytest.approx(2.0)


def test_align_without_smoothing_is_clip_loss():
    align = AlignLoss(init_temperature=0.25, label_smoothing=0.0)
    clip = ClipLoss(init_logit_scale=math.log(4.0))
    assert align(IMAGES, TEXTS).item() == pytest.approx(clip(IMAGES, TEXTS).item(), rel=1e-6)


def test_align_temperature_is_clamped_below():
    loss = AlignLoss(min_temperature=0.01)
    _set(loss.temperature, 0.001)
    assert loss.logit_scale_value().item() == pytest.approx(100.0, rel=1e-6)
    assert loss(IMAGES, TEXTS).item() == pytest.approx(_symmetric(100.0, smoothing=0.1), rel=1e-5)


def test_align_gradient_reaches_temperature():
    loss = AlignLoss()
    loss(IMAGES, TEXTS).backward()
    assert loss.temperature.grad is not None and loss.temperature.grad.item() != 0.0


# --------------------------------------------------------------------------------------------------
# SigLIP


def test_siglip_matches_explicit_logsigmoid_sum():
    loss = SigLipLoss()
    assert loss.logit_scale_value().item() == pytest.approx(10.0, rel=1e-6)
    assert loss.logit_bias.item() == -10.0
    # logits = 10 * sims - 10 = [[-2, -10], [-0.4, -2]]; labels +1 on the diagonal, -1 elsewhere.
    expected = -(_log_sigmoid(-2.0) + _log_sigmoid(10.0) + _log_sigmoid(0.4) + _log_sigmoid(-2.0)) / 2
    assert loss(IMAGES, TEXTS).item() == pytest.approx(expected, rel=1e-6)


def test_siglip_with_other_scale_and_bias():
    loss = SigLipLoss(init_logit_scale=math.log(3.0), init_logit_bias=-1.0)
    logits = [[3 * s - 1 for s in row] for row in SIMS]
    expected = -sum(
        _log_sigmoid((1.0 if i == j else -1.0) * logits[i][j]) for i in range(2) for j in range(2)
    ) / 2
    assert loss(IMAGES, TEXTS).item() == pytest.approx(expected, rel=1e-6)


def test_siglip_gradients_reach_scale_and_bias():
    loss = SigLipLoss()
    loss(IMAGES, TEXTS).backward()
    assert loss.logit_scale.grad.item() != 0.0
    assert loss.logit_bias.grad.item() != 0.0


# --------------------------------------------------------------------------------------------------
# Common behaviour


ALL_LOSSES = [ClipLoss, AlignLoss, SigLipLoss]


@pytest.mark.parametrize("cls", ALL_LOSSES)
def test_fp32_under_bf16_autocast(cls):
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(16, 32, generator=gen), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(16, 32, generator=gen), dim=-1)
    loss = cls()
    reference = loss(images, texts)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = loss(images, texts)
        from_bf16 = loss(images.bfloat16(), texts.bfloat16())
    assert under_autocast.dtype == torch.float32 and from_bf16.dtype == torch.float32
    # A bf16 matmul would be off by ~1e-2 at these scales; the fp32 region must match exactly-ish.
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    "cls, names",
    [(ClipLoss, {"logit_scale"}), (AlignLoss, {"temperature"}), (SigLipLoss, {"logit_scale", "logit_bias"})],
)
def test_no_weight_decay_names_every_parameter(cls, names):
    loss = cls()
    assert loss.no_weight_decay() == names == {n for n, _ in loss.named_parameters()}


@pytest.mark.parametrize("name, cls", [("clip", ClipLoss), ("align", AlignLoss), ("siglip", SigLipLoss)])
def test_registered_and_buildable(name, cls):
    assert isinstance(build("loss", {"name": name}), cls)


def test_registry_checks_loss_argument_types():
    with pytest.raises(ConfigError, match="local_loss"):
        build("loss", {"name": "clip", "local_loss": "yes"})
    with pytest.raises(ConfigError, match="temprature"):
        build("loss", {"name": "align", "init_temprature": 0.5})


def test_bad_loss_values_are_config_errors():
    with pytest.raises(ConfigError):
        AlignLoss(label_smoothing=1.0)
    with pytest.raises(ConfigError):
        AlignLoss(min_temperature=0.0)
    with pytest.raises(ConfigError):
        ClipLoss(max_logit_scale=-1.0)


# --------------------------------------------------------------------------------------------------
# Sharded batches (simulated: each "rank" sees its slice and the gathered global features)


def _global_batch(n=8, dim=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    texts = F.normalize(images + torch.randn(n, dim, generator=gen), dim=-1)
    return images, texts


def _per_rank_losses(monkeypatch, loss, images, texts, world_size):
    batch = images.shape[0] // world_size
    monkeypatch.setattr(losses, "gather_features", lambda i, t, gather_with_grad=True: (images, texts))
    # SigLIP gathers the texts alone.
    monkeypatch.setattr(losses, "all_gather_batch", lambda t, gather_with_grad=True: texts)
    values = []
    for rank in range(world_size):
        monkeypatch.setattr(losses, "world_info", lambda rank=rank: (rank, world_size))
        shard = slice(rank * batch, (rank + 1) * batch)
        values.append(loss(images[shard], texts[shard]).item())
    return values


@pytest.mark.parametrize("cls", [ClipLoss, AlignLoss])
def test_local_loss_shards_average_to_global_loss(monkeypatch, cls):
    images, texts = _global_batch()
    loss = cls(local_loss=True)
    expected = loss(images, texts).item()  # one process, whole batch
    values = _per_rank_losses(monkeypatch, loss, images, texts, world_size=2)
    # With the rank offset on the labels each shard scores its own positives; a missing offset
    # would make rank 1 pick rank 0's texts as positives.
    assert sum(values) / 2 == pytest.approx(expected, rel=1e-6)
    assert values[0] != pytest.approx(values[1])


@pytest.mark.parametrize("cls", [ClipLoss, AlignLoss])
def test_global_loss_mode_gives_every_rank_the_global_loss(monkeypatch, cls):
    images, texts = _global_batch()
    loss = cls(local_loss=False)
    expected = loss(images, texts).item()
    values = _per_rank_losses(monkeypatch, loss, images, texts, world_size=2)
    assert values == pytest.approx([expected, expected], rel=1e-6)


def test_siglip_shards_average_to_global_loss(monkeypatch):
    images, texts = _global_batch()
    loss = SigLipLoss(init_logit_bias=-2.0)
    expected = loss(images, texts).item()
    values = _per_rank_losses(monkeypatch, loss, images, texts, world_size=4)
    assert sum(values) / 4 == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Real two-process gather (gloo on CPU): the one place that touches torch.distributed.
# The workers load vlm_lab/distributed.py by path and import nothing else but torch, so the test costs
# two torch imports (run in parallel) rather than two imports of the whole package.

_GATHER_WORKER = """
import importlib.util, sys
import torch, torch.distributed as dist

distributed_py, init_file, out_file, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
spec = importlib.util.spec_from_file_location("vlm_distributed", distributed_py)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
images = torch.arange(12.0).reshape(4, 3) / 10
texts = -images
weight = torch.arange(12.0).reshape(4, 3)
out = {"world": module.world_info()}
for with_grad in (True, False):
    local_images = images[2 * rank : 2 * rank + 2].clone().requires_grad_()
    all_images, all_texts = module.gather_features(local_images, texts[2 * rank : 2 * rank + 2], with_grad)
    (all_images * weight).sum().backward()
    out[with_grad] = (all_images.detach(), all_texts, local_images.grad)
torch.save(out, out_file)
dist.barrier()  # neither rank tears down gloo while the other still talks to it
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_gather_features_across_two_processes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import vlm_lab.distributed

    source = Path(vlm_lab.distributed.__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GATHER_WORKER, str(source), str(tmp_path / "store"),
             str(tmp_path / f"{rank}.pt"), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()

    images = torch.arange(12.0).reshape(4, 3) / 10
    weight = torch.arange(12.0).reshape(4, 3)
    for rank in range(2):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert out["world"] == (rank, 2)
        shard = slice(2 * rank, 2 * rank + 2)
        for with_grad in (True, False):
            all_images, all_texts, grad = out[with_grad]
            assert torch.equal(all_images, images) and torch.equal(all_texts, -images)
            # Through the differentiable gather both ranks' losses reach this shard (the backward
            # sums over the 2 ranks); without it, only this rank's own slot carries gradient.
            assert torch.allclose(grad, weight[shard] * (2 if with_grad else 1))
