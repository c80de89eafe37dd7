"""Gradient caching (``optim.contrastive_chunks``, vlm_lab/gradient_cache.py): the chunked step is the
unchunked step.

"The same step" means: the same loss (within 1e-6) and the same gradient on every weight (within
1e-5 of the largest entry of that weight's gradient), in float64 where the only differences left are
rounding. A weight whose gradient is zero in exact arithmetic (attention key biases: softmax ignores
a constant shift) carries rounding noise near 1e-17 on both sides, hence a floor of 1e-8 under the
scale. Dropout changes the comparison: the unchunked step draws its masks for the whole batch at
once, the chunked one chunk by chunk, so there the reference is the step that draws its masks chunk
by chunk but keeps every chunk's graph (``graph_per_chunk``); the chunked step must reproduce it,
which it only does if its second pass sees the first pass's masks. Controls show each comparison can
fail: dropping the cached gradients, not restoring the random state, and Lightning's accumulation.

This file is also the worker script of the two-process test: ``python test_gradient_cache.py worker ...``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # the worker script imports its sibling test modules as pytest does

import vlm_lab  # noqa: E402
from test_distributed import (BATCH, OVERRIDES, WORLD_SIZE, _batch, _shard, _TrainingStep, init_gloo,  # noqa: E402
                              run_workers)
from vlm_lab import gradient_cache  # noqa: E402
from vlm_lab.cli import main  # noqa: E402
from vlm_lab.errors import ConfigError  # noqa: E402
from vlm_lab.gradient_cache import check_trainer, chunk_rows  # noqa: E402

TINY = TESTS / "configs" / "tiny.yaml"

COCA = OVERRIDES["coca"]
# Each loss, plus the settings the chunked step must compose with.
CASES = {
    "clip": ["model.loss.name=clip"],
    "align": ["model.loss.name=align"],
    "siglip": ["model.loss.name=siglip"],
    "coca": COCA,
    "coca_caption_only": [*COCA, "model.contrastive_weight=0"],
    "grad_checkpointing": ["model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true",
                           *COCA, "model.caption_head.grad_checkpointing=true"],
    "vision_locked": ["model.vision_lock.lock=true"],
    "text_locked_but_layer_norms": ["model.text_lock.lock=true", "model.text_lock.freeze_layer_norm=false"],
}
# Tiny Hugging Face towers with dropout (hidden states and attention probabilities, 10%).
DROPOUT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
DROPOUT_TOWERS = [
    "model.vision={name: hf_vision, pooling: cls, config: {model_type: vit, image_size: 32, patch_size: 8, "
    + ", ".join(f"{k}: {v}" for k, v in DROPOUT.items()) + "}}",
    "model.text={name: hf_text, pooling: mean, config: {model_type: bert, vocab_size: 30522, "
    + ", ".join(f"{k}: {v}" for k, v in DROPOUT.items()) + "}}",
]


def build(overrides: list[str], chunks: int, dtype: torch.dtype = torch.float64):
    cfg = vlm_lab.load_config(TINY, overrides=[*overrides, f"optim.contrastive_chunks={chunks}"])
    torch.manual_seed(0)
    return vlm_lab.build_module(cfg).to(dtype).train()


def step(module, batch: dict[str, torch.Tensor], seed: int = 1) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One training step's losses and the gradient of every trainable weight."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = module.losses(batch)
    losses["loss"].backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return {name: value.item() for name, value in losses.items()}, grads


def differences(expected, actual) -> dict[str, float]:
    """Each loss's and each gradient's distance from the expected one, in units of its tolerance."""
    (expected_losses, expected_grads), (losses, grads) = expected, actual
    assert set(grads) == set(expected_grads), "the same weights must receive a gradient"
    out = {f"loss {k}": abs(losses[k] - v) / 1e-6 for k, v in expected_losses.items()}
    for name, grad in expected_grads.items():
        scale = max(grad.abs().max().item(), 1e-8)
        out[name] = (grads[name] - grad).abs().max().item() / (1e-5 * scale)
    return out


def assert_same_step(expected, actual) -> None:
    bad = {name: f"{ratio:.3g}x the tolerance" for name, ratio in differences(expected, actual).items() if ratio > 1}
    assert not bad, f"the chunked step differs: {bad}"


def graph_per_chunk(module, chunks: int):
    """``module`` changed to draw its random numbers chunk by chunk, as the chunked step does, while
    keeping every chunk's graph and backpropagating once (the memory-hungry way to the same step)."""
    encode = module.encode_pairs

    def encode_in_chunks(batch, frozen=None):
        size = len(batch["input_ids"])
        parts = []
        for rows in chunk_rows(size, chunks):
            chunk = {k: v[rows] for k, v in batch.items() if k in gradient_cache.PAIR_KEYS}
            parts.append(encode(chunk, module.frozen_outputs(chunk)))
        return {key: sum(p[key] for p in parts) if parts[0][key].ndim == 0 else torch.cat([p[key] for p in parts])
                for key in parts[0]}

    module.encode_pairs = encode_in_chunks
    return module


# --------------------------------------------------------------------------------------------------
# The setting


def test_chunk_rows_cover_the_batch_in_near_equal_runs():
    assert chunk_rows(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert chunk_rows(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]  # uneven: 3, 3, 2
    assert chunk_rows(3, 8) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # never an empty chunk
    assert chunk_rows(5, 1) == [slice(0, 5)]


@pytest.mark.parametrize("value, message", [
    ("0", "optim.contrastive_chunks=0 should be a positive integer"),
    ("-2", "optim.contrastive_chunks=-2 should be a positive integer"),
    ("1.5", "optim.contrastive_chunks=1.5 should be an integer"),
    ("four", "optim.contrastive_chunks='four' should be an integer"),
])
def test_a_bad_number_of_chunks_is_one_line(value, message, capsys, tmp_path):
    assert main(["fit", str(TINY), f"optim.contrastive_chunks={value}", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_yaml_cli_and_python_set_the_chunks(tmp_path):
    (tmp_path / "chunks.yaml").write_text("optim:\n  contrastive_chunks: 4\n")
    assert vlm_lab.build_module(vlm_lab.load_config(TINY, tmp_path / "chunks.yaml")).contrastive_chunks == 4
    assert vlm_lab.build_module(vlm_lab.load_config(TINY)).contrastive_chunks == 1
    # The CLI: a short chunked fit in bf16-mixed, logged like any other.
    assert main(["fit", str(TINY), "optim.contrastive_chunks=3", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                 "trainer.log_every_n_steps=1", "trainer.precision=bf16-mixed",
                 "--run-dir", str(tmp_path / "run")]) == 0
    log = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in log.splitlines()[0]


# --------------------------------------------------------------------------------------------------
# One process: the chunked step is the unchunked step


# Uneven chunks (3, 3, 2) for every case; one pair per chunk for two.
@pytest.mark.parametrize("case, chunks", [(case, 3) for case in CASES] + [("clip", 8), ("coca", 8)])
def test_chunked_step_equals_unchunked_step(case, chunks):
    batch = _batch("float64")
    assert_same_step(step(build(CASES[case], 1), batch), step(build(CASES[case], chunks), batch))


def test_embedding_cache_rows_give_the_same_step():
    # LiT from the embedding cache: the batch holds the locked tower's outputs instead of pixels.
    unchunked = build(["model.vision_lock.lock=true"], 1)
    batch = _batch("float64")
    with torch.no_grad():
        batch["vision_pooled"] = unchunked.vision(batch.pop("pixel_values")).pooled
    assert_same_step(step(unchunked, batch), step(build(["model.vision_lock.lock=true"], 4), batch))


@pytest.mark.parametrize("loss", ["clip", "align", "siglip"])
def test_chunked_step_keeps_each_chunks_dropout_masks(loss, monkeypatch):
    overrides = [*DROPOUT_TOWERS, f"model.loss.name={loss}"]
    batch = _batch("float64")
    reference = step(graph_per_chunk(build(overrides, 1), 4), batch)
    assert_same_step(reference, step(build(overrides, 4), batch))
    # Dropout is active: drawing the masks for the whole batch at once gives another step...
    assert max(differences(reference, step(build(overrides, 1), batch)).values()) > 100
    # ...and a second pass that draws fresh masks (no saved random state) misses the reference.
    monkeypatch.setattr(gradient_cache._RandomState, "restore", lambda self: None)
    assert max(differences(reference, step(build(overrides, 4), batch)).values()) > 100


def test_control_dropping_the_cached_gradients_fails():
    batch = _batch("float64")
    expected = step(build(CASES["clip"], 1), batch)
    chunked = build(CASES["clip"], 4)
    original = gradient_cache._ChunkedRun.second_pass
    gradient_cache._ChunkedRun.second_pass = lambda run, grads: original(
        run, [None if g is None else torch.zeros_like(g) for g in grads])
    try:
        dropped = step(chunked, batch)
    finally:
        gradient_cache._ChunkedRun.second_pass = original
    with pytest.raises(AssertionError, match="the chunked step differs"):
        assert_same_step(expected, dropped)
    # Only the loss and the temperature, which step 2 reaches directly, are right; the towers got zeros
    # (all of their weights are off, but the key biases, whose true gradient is zero).
    ratios = differences(expected, dropped)
    assert ratios.pop("loss loss") <= 1 and ratios.pop("loss.logit_scale") <= 1
    assert sum(ratio > 1e4 for ratio in ratios.values()) == len(ratios) - 2


def test_control_lightnings_accumulation_is_another_loss():
    """Lightning's accumulate_grad_batches=4 on quarters of the batch: four contrastive problems of
    2 pairs (1 negative each) instead of one of 8 pairs. Its loss and gradients differ measurably."""
    batch = _batch("float64")
    module = build(CASES["clip"], 1)
    expected = step(module, batch)
    module.zero_grad(set_to_none=True)
    quarters = []
    for rows in chunk_rows(BATCH, 4):
        loss = module.losses({k: v[rows] for k, v in batch.items()})["loss"] / 4
        loss.backward()
        quarters.append(loss.item())
    accumulated = ({"loss": sum(quarters)},
                   {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    ratios = differences(expected, accumulated)
    assert ratios["loss loss"] > 1e4  # the loss differs by more than 1e-2
    assert sorted(ratios.values())[len(ratios) // 2] > 1e3  # the median weight by more than 1% of its scale


def test_bf16_autocast_chunks_lose_no_more_than_bf16_itself():
    """bf16-mixed runs the training step under autocast; the second pass runs in backward, outside it,
    and must re-enter it to recompute the same activations. The gradients reaching a weight are bf16
    where autocast cast it, and chunking moves those roundings (a sum of four rounded chunk gradients
    instead of one rounded sum), so the chunked gradients agree with the unchunked ones to bf16's
    precision (8 bits: 1% of each weight's gradient norm), and are no further from float32's."""
    batch = _batch("float32")

    def distance(step_a, step_b) -> float:  # the largest relative distance over the weights
        return max(((step_a[1][n] - g).norm() / g.norm()).item() for n, g in step_b[1].items() if g.norm() > 1e-6)

    full_precision = step(build(CASES["coca"], 1, torch.float32), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unchunked = step(build(CASES["coca"], 1, torch.float32), batch)
        chunked = step(build(CASES["coca"], 4, torch.float32), batch)
    assert chunked[0] == pytest.approx(unchunked[0], abs=1e-5)  # the loss is computed in float32
    assert distance(chunked, unchunked) <= 1e-2
    assert distance(chunked, full_precision) <= 1.1 * distance(unchunked, full_precision)
    assert distance(unchunked, full_precision) > 1e-2  # bf16 did round: the comparison is not vacuous


# --------------------------------------------------------------------------------------------------
# Locked towers and the embedding cache are never recomputed


@pytest.mark.parametrize("overrides, pixels, expected", [
    ([], True, {"vision": 2 * 4, "text": 2 * 4}),  # both passes
    (["model.vision_lock.lock=true"], True, {"vision": 4, "text": 2 * 4}),  # first pass only
    (["model.vision_lock.lock=true"], False, {"vision": 0, "text": 2 * 4}),  # embedding cache rows
    (["model.text_lock.lock=true"], True, {"vision": 2 * 4, "text": 4}),
])
def test_towers_with_nothing_to_train_run_once(overrides, pixels, expected):
    module = build(overrides, 4)
    batch = _batch("float64")
    if not pixels:
        with torch.no_grad():
            batch["vision_pooled"] = module.vision(batch.pop("pixel_values")).pooled
    calls = {"vision": 0, "text": 0}
    for name in calls:
        getattr(module, name).register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    step(module, batch)
    assert calls == expected


def test_lightning_run_on_embedding_cache_never_runs_the_locked_tower(tmp_path, monkeypatch):
    from test_embedding_cache import run

    locked = ["model.vision_lock.lock=true", "trainer.max_epochs=1"]
    plain, _, _, plain_forwards, _ = run(tmp_path, "plain", locked, monkeypatch)
    chunked, report, _, forwards, _ = run(tmp_path, "chunked", [*locked, "optim.contrastive_chunks=4"], monkeypatch)
    assert report["train"]["encoded"] == 64 and "pixel_values" not in chunked.batch_keys
    assert forwards == plain_forwards == 2 + 2  # the cache's fills and probes only: no training step
    assert chunked.losses == pytest.approx(plain.losses, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Lightning: whole fits, the trainer checks


def _fit_weights(tmp_path, chunks: int) -> tuple[dict[str, torch.Tensor], L.Trainer]:
    cfg = vlm_lab.load_config(TINY, overrides=[
        "data.train_size=320", "trainer.max_steps=20", "trainer.limit_val_batches=0", "trainer.precision=64-true",
        "trainer.enable_checkpointing=false", "trainer.logger=false", f"optim.contrastive_chunks={chunks}",
        "trainer.gradient_clip_val=1.0"])
    L.seed_everything(0, verbose=False)
    module = vlm_lab.build_module(cfg)
    trainer = vlm_lab.build_trainer(cfg, tmp_path / f"chunks{chunks}")
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    return {k: v.clone() for k, v in module.state_dict().items()}, trainer


@pytest.mark.slow
def test_twenty_steps_with_four_chunks_end_with_the_same_weights(tmp_path):
    expected, plain = _fit_weights(tmp_path, 1)
    weights, chunked = _fit_weights(tmp_path, 4)
    assert plain.global_step == chunked.global_step == 20  # one optimizer step per batch
    L.seed_everything(0, verbose=False)  # the initial weights of the fits (the config's seed)
    initial = vlm_lab.build_module(vlm_lab.load_config(TINY)).state_dict()
    moved = max((expected[k].double() - initial[k].double()).abs().max().item() for k in initial)
    assert moved > 1e-3  # the fit trained (gradient clipping, warm-up and cosine schedule included)
    worst = {k: (weights[k] - v).abs().max().item() for k, v in expected.items()}
    assert max(worst.values()) <= 1e-5, {k: d for k, d in worst.items() if d > 1e-5}


def test_accumulating_contrastive_batches_warns(tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=["trainer.max_steps=1", "trainer.limit_val_batches=0",
                                               "trainer.accumulate_grad_batches=2", "trainer.logger=false",
                                               "trainer.enable_checkpointing=false"])
    module = vlm_lab.build_module(cfg)
    with pytest.warns(UserWarning, match=r"accumulate_grad_batches=2 trains 2 separate contrastive problems .* "
                                         r"optim.contrastive_chunks=2"):
        vlm_lab.build_trainer(cfg, tmp_path).fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))


def test_sharded_strategies_are_refused_and_batch_norm_warns():
    from lightning.pytorch.strategies import FSDPStrategy

    towers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    with pytest.raises(ConfigError, match="optim.contrastive_chunks=4 works with one device, the DDP strategies or "
                                          "trainer.strategy=fsdp2, not FSDPStrategy"):
        check_trainer(SimpleNamespace(accumulate_grad_batches=1, strategy=FSDPStrategy()), 4, True, towers)
    one_device = SimpleNamespace(accumulate_grad_batches=1, strategy=L.pytorch.strategies.SingleDeviceStrategy("cpu"))
    with pytest.warns(UserWarning, match=r"1 BatchNorm layers in training mode \(e.g. 1\) normalise over each chunk"):
        check_trainer(one_device, 4, True, towers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trainer(one_device, 4, True, towers.eval())  # frozen statistics: exact, no warning
        check_trainer(one_device, 1, True, towers.train())  # no chunks: nothing to say


def test_nonfinite_loss_skips_the_chunked_step(tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=["trainer.max_steps=2", "trainer.limit_val_batches=0",
                                               "optim.nonfinite_loss=skip", "optim.contrastive_chunks=2"])
    module = vlm_lab.build_module(cfg)
    module.loss.forward = lambda image, text: (image.sum() + text.sum()) * float("nan")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    vlm_lab.build_trainer(cfg, tmp_path).fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    assert module.skipped_nonfinite_steps == 2
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# --------------------------------------------------------------------------------------------------
# Two processes (gloo): chunked DDP == unchunked DDP == one process on the whole batch

DDP_CASES = {
    "clip_local": ["model.loss={name: clip, local_loss: true}"],
    "clip_global": ["model.loss={name: clip, local_loss: false}"],
    "align": ["model.loss.name=align"],
    "siglip_gather": ["model.loss={name: siglip, exchange: gather}"],
    "siglip_neighbour": ["model.loss={name: siglip, exchange: neighbour}"],
    "coca": COCA,  # the halves of the batch hold 29 and 32 caption tokens: a global token average
}
DDP_CHUNKS = (1, 3)  # 3 chunks of a rank's 4 pairs: 2, 1, 1


def _worker(init_file: str, out_file: str, rank: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    init_gloo(init_file, rank)
    results = {}
    for case, chunks in itertools.product(DDP_CASES, DDP_CHUNKS):
        module = build(DDP_CASES[case], chunks)
        ddp = DistributedDataParallel(_TrainingStep(module))  # must outlive backward: it holds the hooks
        loss = ddp(_shard(_batch("float64"), rank))
        loss.backward()  # DDP averages the gradients over the ranks here
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[case, chunks] = ({"loss": (mean_loss / WORLD_SIZE).item()},
                                 {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    return run_workers(__file__, tmp_path_factory.mktemp("ddp_chunks"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DDP_CASES))
def test_two_processes_chunked_equal_unchunked_and_one_process(two_process_results, case):
    rank0, rank1 = two_process_results
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer
        losses, grads = step(build(DDP_CASES[case], 1), _batch("float64"))
    one_process = ({"loss": losses["loss"]}, grads)  # the ranks' mean of the total loss (CoCa: both terms)
    unchunked, chunked = rank0[case, 1], rank0[case, 3]
    assert_same_step(one_process, unchunked)
    assert_same_step(unchunked, chunked)
    assert_same_step(one_process, chunked)
    for name, grad in chunked[1].items():  # both ranks hold the same averaged gradients
        assert torch.equal(grad, rank1[case, 3][1][name]), name


@pytest.mark.slow
def test_lightning_ddp_fit_with_chunks_matches_without(tmp_path):
    """Lightning's own DDP launcher and automatic optimization, two processes: two steps with three
    chunks per rank end with the weights of two steps without chunks (float64)."""
    from test_distributed_launch import _is_launcher_variable

    env = {k: v for k, v in os.environ.items() if not _is_launcher_variable(k)}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    procs = {chunks: subprocess.Popen(
        [sys.executable, "-m", "vlm_lab.cli", "fit", str(TINY), "trainer.devices=2", "trainer.strategy=ddp",
         "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.precision=64-true",
         f"optim.contrastive_chunks={chunks}", "--run-dir", str(tmp_path / f"chunks{chunks}")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for chunks in (1, 3)}
    for proc in procs.values():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()[-4000:]
    weights = {chunks: torch.load(tmp_path / f"chunks{chunks}" / "checkpoints" / "last.ckpt",
                                  weights_only=True)["state_dict"] for chunks in procs}
    L.seed_everything(0, verbose=False)  # the initial weights of the fits (the config's seed)
    initial = vlm_lab.build_module(vlm_lab.load_config(TINY)).state_dict()
    assert max((weights[1][k].double() - v.double()).abs().max().item() for k, v in initial.items()) > 1e-4
    worst = max((weights[3][k] - v).abs().max().item() for k, v in weights[1].items())
    assert worst <= 1e-10


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(TESTS.parent))
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
