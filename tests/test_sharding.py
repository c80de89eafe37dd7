"""Sharded training (``trainer.strategy: fsdp2``, vlm_lab/sharding.py) on CPU.

The exactness test runs the module's real ``training_step`` on two gloo processes, each given half
of a batch, three ways: sharded by :func:`vlm_lab.sharding.shard_module` (FSDP2, what
``configure_model`` does under the strategy), wrapped in DDP, and on one process with the whole
batch. In float64, for every case (losses, CoCa, locked towers sharded and replicated, a partly
locked tower, gradient checkpointing, embedding-cache batches): the mean loss over the ranks must
equal the one-process loss (1e-6), every gradient (gathered from its shards) the one-process
gradient (1e-5), and the parameters after one AdamW step the one-process ones. This file is also the
worker script: ``python test_sharding.py worker ...`` is what the fixture starts twice.

The Lightning tests (slow) launch real 2-process fits with ``torchrun``: a sharded run saves, resumes
exactly and its checkpoint is read on one process.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_distributed import BATCH, TINY_CONFIG, WORLD_SIZE, _batch, _shard, _TrainingStep  # noqa: E402

DEEPER = ["model.vision.layers=2", "model.text.layers=2"]
COCA = ["model.caption_weight=1.0", "model.caption_head.layers=2", "model.caption_head.heads=2",
        "model.caption_head.image_queries=4"]
VISION_LOCKED = ["model.vision_lock.lock=true"]
# name: (config overrides, sharding settings, whether the batch carries cached vision outputs)
CASES = {
    "clip_local": (DEEPER + ["model.loss.local_loss=true"], {}, False),
    "clip_global_no_reshard": (DEEPER + ["model.loss.local_loss=false"], {"reshard_after_forward": False}, False),
    "siglip_neighbour": (DEEPER + ["model.loss={name: siglip, exchange: neighbour}"], {}, False),
    "coca": (DEEPER + COCA, {}, False),
    "vision_locked_sharded": (DEEPER + VISION_LOCKED, {"locked": "shard"}, False),
    "vision_locked_replicated": (DEEPER + VISION_LOCKED, {"locked": "replicate"}, False),
    "text_partly_locked": (DEEPER + ["model.text_lock.lock=true", "model.text_lock.unlocked_groups=1"], {}, False),
    "grad_checkpointing": (DEEPER + COCA + ["model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true",
                                            "model.caption_head.grad_checkpointing=true"], {}, False),
    "embedding_cache": (DEEPER + VISION_LOCKED, {}, True),
}
LEARNING_RATE = 1e-2


def _module(case: str):
    import vlm_lab

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=CASES[case][0])
    torch.manual_seed(0)
    return vlm_lab.build_module(cfg).to(torch.float64).train()


def _case_batch(case: str) -> dict[str, torch.Tensor]:
    batch = _batch("float64")
    if CASES[case][2]:  # what the embedding cache serves in place of the images: the tower's pooled output
        pooled = torch.randn(BATCH, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        batch = {**{k: v for k, v in batch.items() if k != "pixel_values"}, "vision_pooled": pooled}
    return batch


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _step(module, batch, step=None) -> dict:
    """Loss, gradients, gradient norm and parameters after one AdamW step (weight decay on everything)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer warns and does nothing
        loss = step(batch) if step is not None else module.training_step(batch, 0)
    loss.backward()
    grads = {name: _full(p.grad).clone() for name, p in module.named_parameters() if p.grad is not None}
    trainable = [p for p in module.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=float("inf"))
    torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.1).step()
    return {"loss": loss.detach(), "grads": grads, "norm": _full(norm).detach(),
            "params": {name: _full(p.detach()).clone() for name, p in module.named_parameters()}}


def _worker(init_file: str, out_file: str, rank: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from vlm_lab.sharding import ShardingSettings, shard_module

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results = {}
    for case, kind in itertools.product(CASES, ("sharded", "ddp")):
        shard = _shard(_case_batch(case), rank)
        module = _module(case)
        if kind == "sharded":
            units = shard_module(module, mesh, ShardingSettings(**CASES[case][1]))
            result = _step(module, shard)
            result["units"] = len(units)
            result["local_numel"] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                        for p in module.parameters())
        else:
            ddp = DistributedDataParallel(_TrainingStep(module))  # must outlive backward: it holds the hooks
            result = _step(module, shard, step=ddp)
        mean_loss = result["loss"].clone()
        dist.all_reduce(mean_loss)
        result["loss"] = mean_loss / WORLD_SIZE
        results[case, kind] = result
    torch.save(results, out_file)
    dist.barrier()  # neither rank tears down gloo while the other still talks to it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(tmp / "store"), str(tmp / f"{rank}.pt"), str(rank)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()[-3000:]
    return [torch.load(tmp / f"{rank}.pt") for rank in range(WORLD_SIZE)]


def _worst(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(got) == set(expected)
    return {name: (got[name] - value).abs().max().item() for name, value in expected.items()}


@pytest.mark.slow  # two processes build and step 18 models: a few minutes on 2 loaded cores
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_equals_ddp_and_one_process(two_process_results, case):
    expected = _step(_module(case), _case_batch(case))
    rank0, rank1 = (results[case, "sharded"] for results in two_process_results)
    ddp = two_process_results[0][case, "ddp"]
    assert rank0["units"] > 0

    # CoCa's caption cross-entropy is computed in float32 by design (captioning.py: logits.float()),
    # also for float64 logits: its loss is exact to float32 rounding (2e-6 on a loss of 16), not 1e-6.
    loss_tolerance = 1e-6 * max(1.0, expected["loss"].abs().item()) if COCA[0] in CASES[case][0] \
        else 1e-6
    for name, other in (("one process", expected), ("DDP", ddp)):
        assert abs(rank0["loss"].item() - other["loss"].item()) <= loss_tolerance, name
        bad = {n: f"{d:.1e}" for n, d in _worst(rank0["grads"], other["grads"]).items() if d > 1e-5}
        assert not bad, f"{case}: sharded gradients differ from {name}: {bad}"
        assert abs(rank0["norm"].item() - other["norm"].item()) <= 1e-6, name
        bad = {n: f"{d:.1e}" for n, d in _worst(rank0["params"], other["params"]).items() if d > 1e-6}
        assert not bad, f"{case}: parameters after one AdamW step differ from {name}: {bad}"
    assert max(g.abs().max().item() for g in expected["grads"].values()) > 1e-3  # not trivially zero
    # Both ranks hold the same (gathered) result, and each only its share of the parameters.
    for name in expected["grads"]:
        assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name
    total = sum(p.numel() for p in expected["params"].values())
    assert rank0["local_numel"] + rank1["local_numel"] < 1.1 * total


@pytest.mark.slow
def test_locked_parameters_are_sharded_or_replicated_as_asked(two_process_results):
    rank0 = two_process_results[0]
    sharded, replicated = rank0["vision_locked_sharded", "sharded"], rank0["vision_locked_replicated", "sharded"]
    vision = sum(p.numel() for name, p in sharded["params"].items() if name.startswith("vision."))
    # Replicated, every process holds the whole locked tower; sharded, about half of it.
    assert replicated["local_numel"] - sharded["local_numel"] == pytest.approx(vision / 2, rel=0.05)
    assert not any(name.startswith("vision.") for name in sharded["grads"])


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(TESTS.parent))
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
