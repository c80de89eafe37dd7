"""``optim.nonfinite_loss: skip`` under DDP, when only one rank sees a NaN loss.

Two gloo processes train the tiny model through a real Lightning ``Trainer`` (strategy ddp, on CPU),
each started the way Lightning's launchers start their ranks (``LOCAL_RANK`` and friends in the
environment). Rank 1's first loss is NaN, rank 0's is not. Both ranks must skip that step together
(no parameter changes anywhere) and train the next one normally, ending with equal weights. Without
a collective decision rank 1 skips alone and rank 0 waits in the gradient all-reduce, so the run
hangs until the (short) process-group timeout. This file is also the worker script:
``python test_distributed_nonfinite.py worker ...`` is what the test starts twice.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
TINY_CONFIG = TESTS / "configs" / "tiny.yaml"
WORLD_SIZE = 2


def _worker(out_file: str, rank: int) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    import vlm_lab

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["optim.nonfinite_loss=skip"])
    L.seed_everything(0)
    module = vlm_lab.build_module(cfg)
    if rank == 1:
        module.loss.forward = _nan_on_first_call(module.loss.forward)

    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshots(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshots.append(_weights(pl_module))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(_weights(pl_module))

    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshots()],
    )
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    torch.save({"snapshots": snapshots, "skipped": module.skipped_nonfinite_steps}, out_file)


def _nan_on_first_call(loss_forward):
    calls = []

    def forward(image_features, text_features):
        calls.append(None)
        loss = loss_forward(image_features, text_features)  # its gathers run as on the other rank
        return loss * float("nan") if len(calls) == 1 else loss

    return forward


def _weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")
           and not k.startswith("SLURM_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen([sys.executable, __file__, "worker", str(tmp_path / f"{rank}.pt")],
                         env={**env, "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0].decode())
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
    rank0, rank1 = (torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD_SIZE))

    assert rank0["skipped"] == rank1["skipped"] == 1
    for results in (rank0, rank1):
        initial, after_skip, after_step = results["snapshots"]
        assert all(torch.equal(initial[k], after_skip[k]) for k in initial), "the skipped step changed weights"
        assert not torch.equal(initial["vision_head.proj.weight"], after_step["vision_head.proj.weight"])
    for name, weight in rank0["snapshots"][-1].items():
        assert torch.equal(weight, rank1["snapshots"][-1][name]), f"ranks diverged at {name}"


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2], int(os.environ["LOCAL_RANK"]))
