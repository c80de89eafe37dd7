"""Locking towers (LiT): what is frozen, what stays in eval mode, and that DDP accepts it."""

import os
import warnings
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import vlm_lab
from vlm_lab import build
from vlm_lab.errors import ConfigError
from vlm_lab.locking import TowerLock, layer_groups, lock_tower

TINY_TEXT_BERT = {"name": "hf_text", "config": {"model_type": "bert", "vocab_size": 64, "hidden_size": 16,
                                                 "num_hidden_layers": 3, "num_attention_heads": 2,
                                                 "intermediate_size": 32, "max_position_embeddings": 32}}


def trainable(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_timm_groups_come_from_timms_group_matcher():
    tower = build("vision_tower", {"name": "timm", "model_name": "test_efficientnet"})
    groups = layer_groups(tower)
    # stem, then one group per block; the head conv and its norm join the last block.
    assert [g[0] for g in groups] == ["model.conv_stem.weight", "model.blocks.0.0.conv.weight",
                                      "model.blocks.1.0.conv_exp.weight", "model.blocks.2.0.conv_exp.weight",
                                      "model.blocks.3.0.conv_pw.weight", "model.blocks.4.0.conv_pw.weight"]
    assert "model.conv_head.weight" in groups[-1] and "model.bn2.weight" in groups[-1]
    assert sorted(n for g in groups for n in g) == sorted(n for n, _ in tower.named_parameters())


def test_partial_timm_lock_keeps_top_groups_trainable_and_frozen_batchnorm_in_eval():
    tower = build("vision_tower", {"name": "timm", "model_name": "test_efficientnet"})
    parts = lock_tower(tower, TowerLock(lock=True, unlocked_groups=2), "model.vision_lock")
    assert not parts.fully_locked
    assert all(n.startswith(("model.blocks.3.", "model.blocks.4.", "model.conv_head", "model.bn2"))
               for n in trainable(tower))
    assert "model.blocks.3.0.conv_pw.weight" in trainable(tower)
    tower.train()
    parts.apply_eval_mode()
    assert not tower.model.bn1.training and not tower.model.blocks[2][0].bn1.training  # frozen groups
    assert tower.model.blocks[4][0].bn1.training and tower.model.bn2.training  # unlocked groups
    # Frozen BatchNorm statistics do not move in a training forward pass; unlocked ones do.
    frozen_stats = tower.model.bn1.running_mean.clone()
    free_stats = tower.model.bn2.running_mean.clone()
    tower(torch.randn(2, 3, 64, 64))
    assert torch.equal(tower.model.bn1.running_mean, frozen_stats)
    assert not torch.equal(tower.model.bn2.running_mean, free_stats)


def test_without_freeze_bn_stats_frozen_batchnorm_keeps_training_mode():
    tower = build("vision_tower", {"name": "timm", "model_name": "test_efficientnet"})
    parts = lock_tower(tower, TowerLock(lock=True, unlocked_groups=1, freeze_bn_stats=False), "model.vision_lock")
    tower.train()
    parts.apply_eval_mode()
    assert all(m.training for m in tower.modules() if isinstance(m, _BatchNorm))


def test_native_towers_group_by_block_with_the_final_norm_on_top():
    tower = build("vision_tower", {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 32,
                                   "layers": 3, "heads": 2})
    groups = layer_groups(tower)
    assert len(groups) == 4  # embeddings + pre-norm, then one per layer
    assert "pre_layrnorm.weight" in groups[0] and "post_layernorm.weight" in groups[-1]
    lock_tower(tower, TowerLock(lock=True, unlocked_groups=1), "model.vision_lock")
    assert trainable(tower) == {n for n in groups[-1]}
    assert all(n.startswith(("encoder.layers.2.", "post_layernorm")) for n in trainable(tower))


def test_hf_text_lock_and_freeze_layer_norm():
    tower = build("text_tower", TINY_TEXT_BERT)
    groups = layer_groups(tower)
    assert len(groups) == 4 and groups[0][0].startswith("model.embeddings.")
    lock_tower(tower, TowerLock(lock=True, unlocked_groups=1, freeze_layer_norm=False), "model.text_lock")
    unlocked = trainable(tower)
    assert any(n.startswith("model.encoder.layer.2.") for n in unlocked)
    assert any(n.startswith("model.pooler.") for n in unlocked)  # after the blocks: the top group
    # With freeze_layer_norm false the LayerNorms of the frozen part stay trainable (open_clip's default).
    frozen_part_norms = {n for n in unlocked if n.startswith(("model.embeddings.", "model.encoder.layer.0."))}
    assert frozen_part_norms and all("LayerNorm" in n for n in frozen_part_norms)
    assert "model.encoder.layer.0.attention.self.query.weight" not in unlocked


@pytest.mark.slow
def test_fully_locked_tower_runs_in_eval_mode_without_a_graph_and_its_weights_never_change(tiny_config):
    cfg = vlm_lab.load_config(tiny_config_path(), overrides=[
        "model.vision_lock.lock=true", "model.text_lock.lock=true", "model.text_lock.unlocked_groups=1"])
    module = vlm_lab.build_module(cfg)
    assert module.vision_locked.fully_locked and not module.text_locked.fully_locked
    module.train()
    assert not any(m.training for m in module.vision.modules())
    assert module.text.training and module.vision_head.training
    pixels = torch.randn(2, 3, 32, 32)
    assert not module.vision_tower_output(pixels).pooled.requires_grad
    assert module.encode_image(pixels).requires_grad  # the head still trains

    module = vlm_lab.build_module(cfg)  # fresh, as fit gets it: all in train mode
    vision_before = {n: p.detach().clone() for n, p in module.vision.named_parameters()}
    head_before = module.vision_head.proj.weight.detach().clone()
    modes_seen = []

    class RecordModes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes_seen.append(any(m.training for m in pl_module.vision.modules()))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                        callbacks=[RecordModes()])
    with warnings.catch_warnings():
        # Lightning warns about modules in eval mode when fit starts; locking must not cause that.
        warnings.filterwarnings("error", message=".*in eval mode at the start of training")
        trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    assert modes_seen and not any(modes_seen)  # every training batch, after validation's restores too
    assert all(torch.equal(p, vision_before[n]) for n, p in module.vision.named_parameters())
    assert not torch.equal(module.vision_head.proj.weight, head_before)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in module.vision.parameters())


def tiny_config_path():
    return os.path.join(os.path.dirname(__file__), "configs", "tiny.yaml")


class _LossOf(nn.Module):
    """One contrastive step as a plain forward, so DDP can wrap it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, pixels, input_ids, mask):
        return self.module.loss(self.module.encode_image(pixels), self.module.encode_text(input_ids, mask))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_locked_towers_do_not_trip_ddp_unused_parameter_checks(tiny_config, monkeypatch):
    # monkeypatch: the rendezvous variables must not leak into later tests' subprocesses.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        def three_steps(module):
            ddp = nn.parallel.DistributedDataParallel(_LossOf(module))
            tokens = module.tokenize(["a red circle", "a blue square"])
            for _ in range(3):
                ddp(torch.randn(2, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"]).backward()

        locked = vlm_lab.load_config(tiny_config_path(), overrides=["model.vision_lock.lock=true"])
        three_steps(vlm_lab.build_module(locked))  # no error

        # The check can fail: a tower run under no_grad whose parameters still want gradients trips it.
        unlocked = vlm_lab.build_module(tiny_config)
        unlocked.vision_locked.fully_locked = True  # no_grad forward, but requires_grad left on
        with pytest.raises(RuntimeError, match="finished reduction"):
            three_steps(unlocked)
    finally:
        dist.destroy_process_group()


def test_lock_config_errors_are_one_line_with_the_valid_choices():
    with pytest.raises(ConfigError, match=r"model.vision_lock.unlocked_grups.*Did you mean 'unlocked_groups'"):
        vlm_lab.load_config(tiny_config_path(), overrides=["model.vision_lock.unlocked_grups=1"])
    with pytest.raises(ConfigError, match=r"unlocked_groups=2 only applies with model.vision_lock.lock: true"):
        vlm_lab.build_module(vlm_lab.load_config(tiny_config_path(),
                                                 overrides=["model.vision_lock.unlocked_groups=2"]))
    with pytest.raises(ConfigError, match=r"has 2 layer groups; use at most 1"):
        vlm_lab.build_module(vlm_lab.load_config(tiny_config_path(), overrides=[
            "model.vision_lock.lock=true", "model.vision_lock.unlocked_groups=5"]))
    with pytest.raises(ConfigError, match=r"model.text_lock.lock=.*should be"):
        vlm_lab.load_config(tiny_config_path(), overrides=["model.text_lock.lock=3"])
