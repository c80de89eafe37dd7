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

import lightning as L
import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_distributed import (BATCH, REPEATED_IMAGES, TINY_CONFIG, WORLD_SIZE, _batch, _shard,  # noqa: E402
                              _TrainingStep, init_gloo, run_workers)

DEEPER = ["model.vision.layers=2", "model.text.layers=2"]
COCA = ["model.caption_weight=1.0", "model.caption_head.layers=2", "model.caption_head.heads=2",
        "model.caption_head.image_queries=4"]
VISION_LOCKED = ["model.vision_lock.lock=true"]
MULTI_POSITIVE = "model.loss={name: clip, local_loss: true, multi_positive: true}"
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
    # model.loss.multi_positive on a batch that repeats images within and across the ranks' halves.
    "multi_positive": (DEEPER + [MULTI_POSITIVE], {}, False),
}
# The chunked contrastive step (optim.contrastive_chunks, vlm_lab/gradient_cache.py) under sharding: each
# case is also compared with the unchunked DDP step of the case it chunks (CHUNKED_FROM).
CHUNKS = ["optim.contrastive_chunks=3"]
CHUNKED_FROM = {"clip_local_chunks": "clip_local", "siglip_chunks": "siglip_neighbour", "coca_chunks": "coca",
                "multi_positive_chunks": "multi_positive",
                "vision_locked_chunks": "vision_locked_sharded", "grad_checkpointing_chunks": "grad_checkpointing",
                "embedding_cache_chunks": "embedding_cache"}
CASES.update({name: (CASES[base][0] + CHUNKS, *CASES[base][1:]) for name, base in CHUNKED_FROM.items()})
LEARNING_RATE = 1e-2


def _module(case: str):
    import vlm_lab

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=CASES[case][0])
    torch.manual_seed(0)
    return vlm_lab.build_module(cfg).to(torch.float64).train()


def _case_batch(case: str) -> dict[str, torch.Tensor]:
    batch = _batch("float64")
    if MULTI_POSITIVE in CASES[case][0]:
        batch["image_ids"] = torch.tensor(REPEATED_IMAGES)
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


def _captions(module) -> list[str]:
    """Greedy captions of two fixed images: generation reaches inside the text tower's units."""
    from vlm_lab.generation import generate_captions
    from vlm_lab.schema import GenerationSettings

    with torch.no_grad():
        tokens = module.vision_tower_output(_batch("float64")["pixel_values"][:2]).tokens
    return generate_captions(module, tokens, GenerationSettings(max_new_tokens=6))


def _worker(init_file: str, out_file: str, rank: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from vlm_lab.sharding import ShardingSettings, shard_module

    init_gloo(init_file, rank)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results = {}
    for case, kind in itertools.product(CASES, ("sharded", "ddp")):
        shard = _shard(_case_batch(case), rank)
        module = _module(case)
        if kind == "sharded":
            units = shard_module(module, mesh, ShardingSettings(**CASES[case][1]))
            captions = _captions(module) if case == "coca" else None
            result = _step(module, shard)
            result["captions"] = captions
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
    return run_workers(__file__, tmp_path_factory.mktemp("fsdp"))


def _worst(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(got) == set(expected)
    return {name: (got[name] - value).abs().max().item() for name, value in expected.items()}


@pytest.mark.slow  # two processes build and step 30 models: a few minutes on 2 loaded cores
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
def test_sharded_caption_generation_equals_one_process(two_process_results):
    captions = [results["coca", "sharded"]["captions"] for results in two_process_results]
    assert captions[0] == captions[1] == _captions(_module("coca"))
    assert any(caption.strip() for caption in captions[0])


@pytest.mark.slow
def test_locked_parameters_are_sharded_or_replicated_as_asked(two_process_results):
    rank0 = two_process_results[0]
    sharded, replicated = rank0["vision_locked_sharded", "sharded"], rank0["vision_locked_replicated", "sharded"]
    vision = sum(p.numel() for name, p in sharded["params"].items() if name.startswith("vision."))
    # Replicated, every process holds the whole locked tower; sharded, about half of it.
    assert replicated["local_numel"] - sharded["local_numel"] == pytest.approx(vision / 2, rel=0.05)
    assert not any(name.startswith("vision.") for name in sharded["grads"])


# --------------------------------------------------------------------------------------------------
# The YAML, the units, one process


@pytest.mark.parametrize("value, settings", [
    ("fsdp2", {}),
    ("{name: fsdp2, locked: replicate, checkpoint: sharded, reshard_after_forward: false}",
     {"locked": "replicate", "checkpoint": "sharded", "reshard_after_forward": False}),
])
def test_strategy_by_name_or_mapping_builds_the_sharded_strategy(value, settings, tmp_path):
    import vlm_lab
    from vlm_lab.sharding import ShardedStrategy, ShardingSettings

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=[f"trainer.strategy={value}"])
    trainer = vlm_lab.build_trainer(cfg, tmp_path)
    assert isinstance(trainer.strategy, ShardedStrategy) and trainer.strategy.sharding == ShardingSettings(**settings)
    assert trainer.strategy.expected_world_size == 1


def test_other_strategies_reach_lightning_unchanged(tmp_path):
    import vlm_lab
    from lightning.pytorch.strategies import DDPStrategy

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["trainer.strategy=ddp"])
    assert isinstance(vlm_lab.build_trainer(cfg, tmp_path).strategy, DDPStrategy)


@pytest.mark.parametrize("override, message", [
    ("trainer.strategy=fsdp3", "trainer.strategy='fsdp3' is not a strategy; valid: auto, fsdp2, ddp"),
    ("trainer.strategy=fsdp", "needs a CUDA accelerator; on the CPU use trainer.strategy=fsdp2"),
    ("trainer.strategy={name: ddp}", "needs name: fsdp2 (got name: 'ddp')"),
    ("trainer.strategy={name: fsdp2, lockd: shard}", "unknown key 'trainer.strategy.lockd'. Did you mean 'locked'?"),
    ("trainer.strategy={name: fsdp2, checkpoint: consolidated}", "trainer.strategy.checkpoint='consolidated' is not"),
    ("trainer.strategy={name: fsdp2, reshard_after_forward: 2}", "should be true or false"),
    ("trainer.strategy=[fsdp2]", "should be a strategy name or a mapping"),
])
def test_bad_strategy_is_one_line(override, message, capsys, tmp_path):
    from vlm_lab.cli import main

    assert main(["check", str(TINY_CONFIG), override, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_precision_the_strategy_refuses_is_one_line():
    import vlm_lab
    from vlm_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="64-true.*does not work with trainer.strategy=fsdp2.*bf16-mixed"):
        vlm_lab.load_config(TINY_CONFIG, overrides=["trainer.strategy=fsdp2", "trainer.precision=64-true"])


@pytest.mark.parametrize("trainer, processes", [
    ({"accelerator": "cpu", "devices": 2}, 2),
    ({"accelerator": "cpu", "devices": "auto"}, 1),
    ({"accelerator": "cpu", "devices": 2, "num_nodes": 3}, 6),
])
def test_the_shard_dimension_spans_every_process(trainer, processes):
    from vlm_lab.sharding import build_strategy

    strategy = build_strategy({**trainer, "strategy": "fsdp2"})
    assert strategy.expected_world_size == processes


@pytest.mark.parametrize("spec, count", [
    ({"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "heads": 2}, 3),
    ({"name": "timm", "model_name": "test_vit"}, None),  # timm's blocks: an nn.Sequential of one class
])
def test_units_are_the_blocks_of_each_stack(spec, count):
    from vlm_lab import build
    from vlm_lab.sharding import repeated_blocks

    tower = build("vision_tower", spec)
    blocks = repeated_blocks(tower)
    expected = len(tower.model.blocks) if count is None else count
    assert len(blocks) == expected and len({type(b) for b in blocks}) == 1
    assert all(type(b).__name__.endswith(("Layer", "Block")) for b in blocks)


def test_tied_caption_embedding_is_refused_in_one_line():
    import vlm_lab
    from vlm_lab.errors import ConfigError
    from vlm_lab.sharding import shard_module

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=[*COCA, "model.caption_head.tie_embedding=true"])
    with pytest.raises(ConfigError, match="tie_embedding: false with trainer.strategy=fsdp2"):
        shard_module(vlm_lab.build_module(cfg), mesh=None)


@pytest.fixture
def process_group_cleanup():
    """A one-process fit under the strategy starts a gloo group in this process and Lightning writes
    its address (MASTER_ADDR, MASTER_PORT, ...) into os.environ; end the group and restore those
    variables afterwards, so that later tests, and the processes they start, find neither."""
    import torch.distributed as dist
    from test_distributed_launch import _is_launcher_variable

    before = {k: v for k, v in os.environ.items() if _is_launcher_variable(k)}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in [k for k in os.environ if _is_launcher_variable(k)]:
        del os.environ[key]
    os.environ.update(before)


def test_one_process_sharded_fit(tmp_path, process_group_cleanup):
    """The strategy on one process (what the GPU check runs on one GPU): the parts become units, the
    parameters DTensors, and the checkpoint an ordinary one."""
    import vlm_lab
    from lightning.pytorch.callbacks import Callback
    from torch.distributed.fsdp import FSDPModule

    class Seen(Callback):
        def on_train_end(self, trainer, module):
            self.units = [name for name, m in module.named_modules() if isinstance(m, FSDPModule)]
            self.dtensors = all(hasattr(p, "to_local") for p in module.vision.parameters())

    seen = Seen()
    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["trainer.strategy=fsdp2", "data.train_size=32",
                                                      "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"])
    module = vlm_lab.build_module(cfg)
    trainer = vlm_lab.build_trainer(cfg, tmp_path)
    trainer.callbacks.append(seen)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    assert {"vision", "vision.encoder.layers.0", "text", "text.encoder.layers.0", "vision_head", "text_head"} <= \
        set(seen.units)
    assert "loss" not in seen.units  # its one parameter is a scalar: replicated (see vlm_lab/sharding.py)
    assert seen.dtensors
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # TorchInductor compiles the towers: a minute or more on a small CPU
def test_compiled_towers_under_the_sharded_strategy_train_as_eager(tmp_path, process_group_cleanup):
    """model.compile with trainer.strategy=fsdp2: configure_model shards first, then compiles the
    sharded towers in place; two steps end with the weights of the eager sharded fit."""
    import vlm_lab

    weights = {}
    for compiled in (False, True):
        cfg = vlm_lab.load_config(TINY_CONFIG, overrides=[
            "trainer.strategy=fsdp2", "data.train_size=32", "trainer.max_steps=2", "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", f"model.compile={str(compiled).lower()}"])
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # as vlm_lab.fit: the same weights and data
        module = vlm_lab.build_module(cfg)
        vlm_lab.build_trainer(cfg, tmp_path / str(compiled)).fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
        assert (module.vision._compiled_call_impl is not None) is compiled  # as tests/test_compile.py checks
        assert hasattr(next(module.vision.parameters()), "to_local")  # and sharded
        weights[compiled] = _weights(tmp_path / str(compiled) / "checkpoints" / "last.ckpt")
        if torch.distributed.is_initialized():  # the next fit starts its own one-process group
            torch.distributed.destroy_process_group()
    assert weights[True].keys() == weights[False].keys()
    assert not any("_orig_mod" in key for key in weights[True])  # compiled in place: the eager names
    worst = max((weights[True][k] - v).abs().max().item() for k, v in weights[False].items() if v.is_floating_point())
    assert worst < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CHUNKED_FROM))
def test_chunked_sharded_step_equals_the_unchunked_ddp_step(two_process_results, case):
    """optim.contrastive_chunks under FSDP2: the second pass backpropagates each chunk through FSDP2's
    hooks (gathered weights, gradients reduce-scattered into the shards and added up over the chunks);
    the step equals DDP's without chunks, so the chunks change memory and nothing else."""
    got, expected = two_process_results[0][case, "sharded"], two_process_results[0][CHUNKED_FROM[case], "ddp"]
    assert got["grads"].keys() == expected["grads"].keys()  # every weight got its gradient, through the shards
    assert abs(got["loss"].item() - expected["loss"].item()) <= 1e-6 * max(1.0, expected["loss"].abs().item())
    assert max(_worst(got["grads"], expected["grads"]).values()) <= 1e-5
    assert max(_worst(got["params"], expected["params"]).values()) <= 1e-6


# --------------------------------------------------------------------------------------------------
# Through Lightning: real 2-process fits under torchrun (each process runs _fits; the runs in sequence)

QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
FITS = {
    # name: (overrides, epochs before a resume or None for one uninterrupted fit)
    "fsdp2": (["trainer.strategy=fsdp2", "trainer.max_epochs=2"], None),
    "ddp": (["trainer.strategy=ddp", "trainer.max_epochs=2"], None),
    "fsdp2_resumed": (["trainer.strategy=fsdp2", "trainer.max_epochs=2"], 1),
    "fsdp2_sharded_resumed": (["trainer.strategy={name: fsdp2, checkpoint: sharded}", "trainer.max_epochs=2"], 1),
    # CoCa: generation in validation reaches inside the sharded text tower (gathered_parameters).
    "coca": (["trainer.strategy=fsdp2", "trainer.max_epochs=1", *COCA, "model.generation.max_new_tokens=4",
              "model.generation.max_images=4"], None),
    # LiT with the embedding cache (filled before configure_model shards), locked tower replicated.
    "lit_cached": (["trainer.strategy={name: fsdp2, locked: replicate}", "trainer.max_epochs=1", *VISION_LOCKED],
                   None),
    # Chunked contrastive steps through Lightning's automatic optimization, sharded.
    "fsdp2_chunks": (["trainer.strategy=fsdp2", "trainer.max_epochs=2", "optim.contrastive_chunks=2"], None),
}


def _fits(out: str) -> None:
    import vlm_lab

    warnings.simplefilter("ignore")
    for name, (overrides, first_epochs) in FITS.items():
        cfg = vlm_lab.load_config(TINY_CONFIG, overrides=[*QUIET, *overrides])
        run_dir = Path(out) / name
        if first_epochs is not None:
            first = vlm_lab.load_config(TINY_CONFIG, overrides=[*QUIET, *overrides,
                                                                f"trainer.max_epochs={first_epochs}"])
            vlm_lab.fit(first, run_dir=run_dir)
            vlm_lab.fit(cfg, run_dir=run_dir, resume=True)
        else:
            vlm_lab.fit(cfg, run_dir=run_dir)


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fits")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT") and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, "fits", str(out)], env=env, cwd=out, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow  # six 2-process fits
def test_sharded_fit_saves_a_full_checkpoint_that_one_process_reads(lightning_runs, tmp_path):
    import vlm_lab
    from vlm_lab.interop import export
    from vlm_lab.module import VisionLanguageModule

    run = lightning_runs / "fsdp2"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()  # checkpoint: full is one ordinary file
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["step"]) == (1, 4)  # 2 epochs of 2 steps: the data was split over 2 ranks
    module = VisionLanguageModule.load_from_checkpoint(str(last), map_location="cpu", weights_only=True)
    assert not any(hasattr(p, "to_local") for p in module.parameters())  # plain tensors, not shards
    # One process evaluating the saved weights finds what the two sharded processes reported.
    single = vlm_lab.validate(vlm_lab.load_config(TINY_CONFIG), ckpt_path=str(last), run_dir=tmp_path / "val")
    assert metrics["val/loss"] == pytest.approx(single["val/loss"], abs=1e-5)
    for key in [k for k in single if "R@" in k]:
        assert metrics[key] == pytest.approx(single[key], abs=1e-4), key
    exported = export(str(last), "open_clip", tmp_path / "open_clip")
    assert (exported / "open_clip_config.json").is_file()


@pytest.mark.slow
def test_sharded_fit_trains_as_ddp_does(lightning_runs):
    sharded, ddp = (_weights(lightning_runs / name / "checkpoints" / "last.ckpt") for name in ("fsdp2", "ddp"))
    assert sharded.keys() == ddp.keys()
    # Four float32 steps apart: rounding differs (reduce-scatter vs all-reduce), nothing else.
    worst = max((sharded[k] - ddp[k]).abs().max().item() for k in ddp if ddp[k].is_floating_point())
    assert worst < 1e-4


@pytest.mark.slow
def test_sharded_fit_with_contrastive_chunks_trains_as_without(lightning_runs):
    chunked, whole = (_weights(lightning_runs / name / "checkpoints" / "last.ckpt") for name in ("fsdp2_chunks", "fsdp2"))
    assert chunked.keys() == whole.keys()
    worst = max((chunked[k] - whole[k]).abs().max().item() for k in whole if whole[k].is_floating_point())
    assert worst < 1e-4  # four float32 steps: the chunks' gradients are summed in another order


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp2_resumed", "fsdp2_sharded_resumed"])
def test_sharded_fit_resumes_exactly(lightning_runs, name, tmp_path):
    from vlm_lab.module import VisionLanguageModule
    from vlm_lab.sharding import consolidate_checkpoint, is_sharded_checkpoint

    uninterrupted = _weights(lightning_runs / "fsdp2" / "checkpoints" / "last.ckpt")
    last = lightning_runs / name / "checkpoints" / "last.ckpt"
    if name == "fsdp2_sharded_resumed":
        assert is_sharded_checkpoint(last) and len(list(last.glob("*.distcp"))) == 2  # one file per rank
        last = consolidate_checkpoint(last, tmp_path / "last.ckpt")
        VisionLanguageModule.load_from_checkpoint(str(last), map_location="cpu", weights_only=True)
    resumed = _weights(last)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    metrics = json.loads((lightning_runs / name / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["step"]) == (1, 4)


@pytest.mark.slow
def test_sharded_coca_and_cached_lit_fits_evaluate(lightning_runs):
    coca = json.loads((lightning_runs / "coca" / "metrics.json").read_text())
    assert "val/cider" in coca and "val/i2t_R@1" in coca
    lit = json.loads((lightning_runs / "lit_cached" / "metrics.json").read_text())
    assert "val/i2t_R@1" in lit


def test_consolidate_refuses_what_is_not_a_sharded_checkpoint(tmp_path):
    from vlm_lab.errors import ConfigError
    from vlm_lab.sharding import consolidate_checkpoint

    with pytest.raises(ConfigError, match="not a sharded checkpoint directory"):
        consolidate_checkpoint(tmp_path, tmp_path / "out.ckpt")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(TESTS.parent))
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
elif __name__ == "__main__" and sys.argv[1:2] == ["fits"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _fits(sys.argv[2])
