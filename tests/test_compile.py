"""``model.compile``: the towers compiled with torch.compile (TorchInductor, which on the CPU needs a C++
compiler) give the eager numbers, with gradient checkpointing, locking and DDP, and checkpoints of
compiled and eager runs load into each other (docs/how-to/compile.md).

Compiling takes a minute or more the first time on a small CPU (TorchInductor caches its kernels in
its cache folder afterwards), so the tests that compile are marked slow. This file is also the DDP
worker script: ``python test_compile.py worker ...``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
TINY = str(TESTS / "configs" / "tiny.yaml")
# Gradient checkpointing in the vision tower, the text tower's bottom group locked.
RECIPE = ["model.vision.grad_checkpointing=true", "model.text.layers=2", "model.text_lock.lock=true",
          "model.text_lock.unlocked_groups=1"]
BATCH = 8


def build(*overrides: str):
    import vlm_lab

    torch.manual_seed(0)
    return vlm_lab.build_module(vlm_lab.load_config(TINY, overrides=list(overrides)))


def fixed_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 5, 9, 7, 12, 6, 10, 8])
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=gen),
            "input_ids": torch.randint(1000, 2000, (BATCH, 12), generator=gen) * mask, "attention_mask": mask,
            "text_image_index": torch.arange(BATCH), "image_ids": torch.arange(BATCH)}


def loss_and_grads(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer warns and does nothing
        loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_close_grads(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == expected.keys() and expected
    worst = {name: float((grads[name] - grad).abs().max()) for name, grad in expected.items()}
    bad = {name: diff for name, diff in worst.items() if diff > 1e-5 * max(1.0, float(expected[name].abs().max()))}
    assert not bad, bad


def test_compile_settings_are_checked():
    import vlm_lab
    from vlm_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="model.compile_mode='max-autotun' is not one of 'default', 'reduce-overhead', "
                                          ".* Did you mean 'max-autotune'"):
        vlm_lab.load_config(TINY, overrides=["model.compile_mode=max-autotun"])
    with pytest.raises(ConfigError, match="model.compile='maybe' should be true or false"):
        vlm_lab.load_config(TINY, overrides=["model.compile=maybe"])
    module = build("model.compile=true")
    assert not module._compiled  # compiled by configure_model(), i.e. when a Trainer runs it
    assert module.state_dict().keys() == build().state_dict().keys()


@pytest.mark.slow
def test_compiled_towers_train_and_evaluate_as_the_eager_ones():
    compiled, eager = build("model.compile=true", *RECIPE), build(*RECIPE)
    compiled.compile_towers()
    assert compiled._compiled and compiled.vision._compiled_call_impl is not None
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: the same names
    assert compiled.text.embeddings.token_embedding.weight.requires_grad is False  # the lock holds
    batch = fixed_batch()
    loss, grads = loss_and_grads(compiled.train(), batch)
    expected_loss, expected_grads = loss_and_grads(eager.train(), batch)
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
    assert_close_grads(grads, expected_grads)
    with torch.no_grad():
        assert torch.allclose(compiled.eval().encode_image(batch["pixel_values"]),
                              eager.eval().encode_image(batch["pixel_values"]), atol=1e-5)


@pytest.mark.slow
def test_compiled_towers_in_chunked_contrastive_steps():
    """optim.contrastive_chunks (gradient caching) runs the compiled towers twice per chunk, with and
    without a graph: the same step as one eager pass over the whole batch."""
    compiled = build("model.compile=true", "optim.contrastive_chunks=2", *RECIPE)
    compiled.compile_towers()
    loss, grads = loss_and_grads(compiled.train(), fixed_batch())
    expected_loss, expected_grads = loss_and_grads(build(*RECIPE).train(), fixed_batch())
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
    assert_close_grads(grads, expected_grads)


@pytest.mark.slow
def test_checkpoints_of_compiled_and_eager_runs_load_into_each_other(tmp_path):
    import vlm_lab
    from interop_helpers import save_checkpoint
    from vlm_lab.interop.checkpoint import read_weights_file

    short = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"]
    compiled_cfg = vlm_lab.load_config(TINY, overrides=["model.compile=true", *RECIPE, *short])
    module = vlm_lab.build_module(compiled_cfg)
    vlm_lab.api.build_trainer(compiled_cfg, tmp_path / "compiled").fit(module, datamodule=vlm_lab.build_datamodule(
        compiled_cfg, module))
    assert module._compiled and module.text._compiled_call_impl is not None  # the Trainer compiled it
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    eager = build(*RECIPE)
    eager.load_state_dict(state)  # strict: the same keys, nothing "_orig_mod."

    eager_cfg = vlm_lab.load_config(TINY, overrides=[*RECIPE, *short[1:]])  # one epoch: 4 steps
    vlm_lab.fit(eager_cfg, run_dir=tmp_path / "eager")
    resumed_cfg = vlm_lab.load_config(TINY, overrides=["model.compile=true", *RECIPE, *short[1:], "trainer.max_epochs=2"])
    vlm_lab.fit(resumed_cfg, run_dir=tmp_path / "eager", resume=True)  # compiled, from the eager run
    assert torch.load(tmp_path / "eager" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8

    # A state dict saved from a module wrapped by torch.compile carries "_orig_mod." levels.
    module = build(*RECIPE)
    save_checkpoint(module, tmp_path / "wrapped.ckpt")
    checkpoint = torch.load(tmp_path / "wrapped.ckpt", weights_only=False)
    checkpoint["state_dict"] = {key.replace("vision.", "vision._orig_mod.", 1): value
                                for key, value in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "wrapped.ckpt")
    loaded = vlm_lab.VisionLanguageModule.load_from_checkpoint(tmp_path / "wrapped.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.state_dict().values()))
    torch.save({"_orig_mod.visual.proj": torch.ones(2)}, tmp_path / "open_clip.pt")
    assert list(read_weights_file(tmp_path / "open_clip.pt")) == ["visual.proj"]


# --------------------------------------------------------------------------------------------------
# DDP: compiled towers inside DistributedDataParallel, two gloo processes against one eager process.


def _worker(init_file: str, out_file: str, rank: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from test_distributed import _TrainingStep  # DDP's forward routed to training_step, as Lightning's wrapper does

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    module = build("model.compile=true", *RECIPE)
    module.compile_towers()  # what configure_model() does before Lightning wraps the module in DDP
    shard = {k: v.chunk(2)[rank] for k, v in fixed_batch().items()}
    shard["text_image_index"] = torch.arange(BATCH // 2)
    ddp = DistributedDataParallel(_TrainingStep(module))
    loss = ddp(shard)
    loss.backward()  # DDP averages the gradients here
    torch.save({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_towers_under_ddp_give_the_gradients_of_one_eager_process(tmp_path):
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(tmp_path / "store"), str(tmp_path / f"{rank}.pt"),
                               str(rank)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, output.decode()[-3000:]
    _, expected = loss_and_grads(build(*RECIPE), fixed_batch())
    for rank in range(2):
        assert_close_grads(torch.load(tmp_path / f"{rank}.pt"), expected)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, str(TESTS))
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
