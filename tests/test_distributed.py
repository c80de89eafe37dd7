"""Distributed training on CPU: exactness of the distributed losses, launchers and run directories.

The exactness test runs the real ``VisionLanguageModule.training_step`` (tiny towers, heads, loss)
wrapped in torch's ``DistributedDataParallel`` on two gloo processes, each given half of a batch,
and compares with one process on the whole batch: the mean of the two ranks' losses must equal the
single-process loss (1e-6) and every parameter's gradient after DDP's averaging must equal the
single-process gradient (1e-5). It runs in float64, where the only differences left are rounding
(~1e-15), and in float32, where rounding grows with the values (a gradient of 40 has a float32 step
of 4e-6), so there the tolerances are relative to the value's size. This file is also the worker
script: ``python test_distributed.py worker ...`` is what the test starts twice.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

TESTS = Path(__file__).resolve().parent
TINY_CONFIG = TESTS / "configs" / "tiny.yaml"
WORLD_SIZE = 2
BATCH = 8  # global batch; each rank gets BATCH // WORLD_SIZE

# Loss specs compared between one process and two. "exact" says whether the gradients must match.
CASES = {
    "clip_local": ({"name": "clip", "local_loss": True}, True),
    "clip_global": ({"name": "clip", "local_loss": False}, True),
    "clip_global_no_grad_gather": ({"name": "clip", "local_loss": False, "gather_with_grad": False}, True),
    "align_local": ({"name": "align"}, True),
    "siglip_gather": ({"name": "siglip"}, True),
    "siglip_neighbour": ({"name": "siglip", "exchange": "neighbour"}, True),
    # CoCa: CLIP plus the caption loss, whose token average must be over both ranks' tokens (the
    # halves of the batch hold 29 and 32 of them).
    "coca": ({"name": "clip", "local_loss": True}, True),
    # Multi-positive (model.loss.multi_positive): the batch repeats images within a rank's half and
    # across the halves (REPEATED_IMAGES), so positives sit in other ranks' columns too.
    "clip_local_multi": ({"name": "clip", "local_loss": True, "multi_positive": True}, True),
    "clip_global_multi": ({"name": "clip", "local_loss": False, "multi_positive": True}, True),
    "align_local_multi": ({"name": "align", "multi_positive": True}, True),
    "siglip_gather_multi": ({"name": "siglip", "multi_positive": True}, True),
    "siglip_neighbour_multi": ({"name": "siglip", "exchange": "neighbour", "multi_positive": True}, True),
    # The control: local loss through a gather without gradient misses the other ranks' terms, so
    # its gradients must differ. It shows the comparison can fail.
    "clip_local_no_grad_gather": ({"name": "clip", "local_loss": True, "gather_with_grad": False}, False),
}


DTYPES = {"float64": torch.float64, "float32": torch.float32}
# The image ids of the multi-positive cases' batch: image 0 in both halves, image 1 in both, image 0
# twice in the first half.
REPEATED_IMAGES = [0, 1, 2, 0, 3, 1, 4, 0]
# Config overrides of the cases that need more than a loss.
OVERRIDES = {"coca": ["model.caption_weight=1.0", "model.caption_head.layers=1", "model.caption_head.heads=2",
                      "model.caption_head.image_queries=4"]}


def _module(case: str, dtype: str):
    import vlm_lab

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=OVERRIDES.get(case, []))
    cfg.model.loss = CASES[case][0]
    torch.manual_seed(0)
    return vlm_lab.build_module(cfg).to(DTYPES[dtype])


def _batch(dtype: str) -> dict[str, torch.Tensor]:
    """A fixed batch in the collate function's format, with captions of different lengths."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 5, 9, 7, 12, 6, 10, 8])
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return {
        "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=gen, dtype=DTYPES[dtype]),
        "input_ids": torch.randint(1000, 2000, (BATCH, 12), generator=gen) * mask,
        "attention_mask": mask,
        "text_image_index": torch.arange(BATCH),
        "image_ids": torch.arange(BATCH),
    }


def _case_batch(case: str, dtype: str) -> dict[str, torch.Tensor]:
    batch = _batch(dtype)
    if case.endswith("_multi"):
        batch["image_ids"] = torch.tensor(REPEATED_IMAGES)
    return batch


def _shard(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's half of the batch, as a distributed sampler and the collate function would give it."""
    shard = {k: v.chunk(WORLD_SIZE)[rank] for k, v in batch.items()}
    shard["text_image_index"] = torch.arange(len(shard["image_ids"]))  # positions within the shard
    return shard


class _TrainingStep(torch.nn.Module):
    """Routes DDP's forward to the module's real ``training_step`` (as Lightning's wrapper does)."""

    def __init__(self, module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.training_step(batch, 0)


def _loss_and_grads(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer warns and does nothing
        loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


def init_gloo(init_file: str, rank: int) -> None:
    """Join the WORLD_SIZE gloo processes of a worker script (one thread each; warnings off, since
    ``self.log()`` without a Trainer warns on every step)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)


def run_workers(script: str, tmp: Path) -> list:
    """Start ``python script worker STORE OUT RANK`` for every rank; each rank's saved results."""
    procs = [
        subprocess.Popen(
            [sys.executable, script, "worker", str(tmp / "store"), str(tmp / f"{rank}.pt"), str(rank)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()[-3000:]
    return [torch.load(tmp / f"{rank}.pt") for rank in range(WORLD_SIZE)]


def _worker(init_file: str, out_file: str, rank: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    init_gloo(init_file, rank)
    results = {}
    for case, dtype in itertools.product(CASES, DTYPES):
        shard = _shard(_case_batch(case, dtype), rank)
        module = _module(case, dtype)
        ddp = DistributedDataParallel(_TrainingStep(module))  # must outlive backward: it holds the hooks
        loss = ddp(shard)
        loss.backward()  # DDP averages the gradients over the ranks here
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[case, dtype] = {
            "loss": mean_loss / WORLD_SIZE,
            "rank_loss": loss.detach(),
            "grads": {name: p.grad.clone() for name, p in module.named_parameters()},
        }
    torch.save(results, out_file)
    dist.barrier()  # neither rank tears down gloo while the other still talks to it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    return run_workers(__file__, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_two_processes_match_one_process(two_process_results, case, dtype):
    exact = CASES[case][1]
    expected_loss, expected_grads = _loss_and_grads(_module(case, dtype), _case_batch(case, dtype))
    rank0, rank1 = (results[case, dtype] for results in two_process_results)

    def tolerance(absolute: float, value: torch.Tensor) -> float:
        # float32 carries ~7 digits: 1e-6 of a loss of 10 is below its rounding step.
        return absolute * max(1.0, value.abs().max().item()) if dtype == "float32" else absolute

    # Both ranks report the same mean and the same averaged gradients (DDP's all-reduce).
    assert torch.equal(rank0["loss"], rank1["loss"])
    assert abs(rank0["loss"].item() - expected_loss.item()) <= tolerance(1e-6, expected_loss)
    assert set(rank0["grads"]) == set(expected_grads)
    largest = max(g.abs().max().item() for g in expected_grads.values())
    assert largest > 1e-3  # the gradients are not trivially zero

    worst = {name: (rank0["grads"][name] - grad).abs().max().item() for name, grad in expected_grads.items()}
    if exact:
        bad = {n: f"{d:.1e}" for n, d in worst.items() if d > tolerance(1e-5, expected_grads[n])}
        assert not bad, f"{case} ({dtype}): gradients differ: {bad}"
        for name in expected_grads:
            assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name
    else:
        assert max(worst.values()) > 1e-3, f"{case}: expected inexact gradients"


@pytest.mark.slow  # the two-process fixture
def test_local_mode_ranks_compute_different_shares(two_process_results):
    # In local mode each rank's loss is its own rows' share; global mode gives every rank the whole loss.
    rank0, rank1 = two_process_results
    local, global_ = ("clip_local", "float64"), ("clip_global", "float64")
    assert rank0[local]["rank_loss"].item() != pytest.approx(rank1[local]["rank_loss"].item())
    assert rank0[global_]["rank_loss"].item() == pytest.approx(rank1[global_]["rank_loss"].item(), abs=1e-12)


def test_weight_decay_groups_survive_fsdp_flattening(tiny_module):
    """FSDP (use_orig_params, Lightning's default) shows the optimizer flattened 1-D parameter shards
    under names with wrapper levels; weight decay must still pick the same parameters."""

    class FakeTrainer:
        estimated_stepping_batches = 10
        strategy = SingleDeviceStrategy("cpu")  # restores a checkpoint before setup

    tiny_module.trainer = FakeTrainer()

    def groups():
        optimizer = tiny_module.configure_optimizers()["optimizer"]
        return [{id(p) for p in group["params"]} for group in optimizer.param_groups]

    decay, no_decay = groups()
    assert id(tiny_module.vision_head.proj.weight) in decay and id(tiny_module.loss.logit_scale) in no_decay

    class FSDPWrapper(torch.nn.Module):  # the level FSDP's auto-wrapping inserts
        def __init__(self, module):
            super().__init__()
            self._fsdp_wrapped_module = module

    tiny_module.vision_head = FSDPWrapper(tiny_module.vision_head)
    with torch.no_grad():
        for parameter in tiny_module.parameters():
            parameter.data = parameter.data.flatten()
    assert groups() == [decay, no_decay]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(TESTS.parent))
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
