"""Gradient checkpointing with unlocked, partially locked and fully locked towers of every type.

Checkpointing must be active (each trainable block runs twice: forward, then again in backward), give
the gradients of the plain tower, and cope with frozen parameters: no "none of the inputs require
grad" failure or warning (the reentrant variant's trap), and frozen blocks are neither recomputed nor
backpropagated through. Towers are frozen with the LiT lock (``vlm_lab.locking``) and by hand; the
last tests run the whole model, the CoCa caption decoder included, with locked towers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from vlm_lab.locking import TowerLock, lock_tower
from vlm_lab.registry import build

TINY_HF = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
TOWERS = {
    "clip_vit": ("vision_tower", {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 3,
                                  "heads": 2}),
    "clip_text": ("text_tower", {"name": "clip_text", "vocab_size": 100, "context_length": 16, "width": 32,
                                 "layers": 3, "heads": 2}),
    "timm": ("vision_tower", {"name": "timm", "model_name": "vit_tiny_patch16_224",
                              "model_args": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32,
                                             "num_heads": 2}}),
    "hf_vision": ("vision_tower", {"name": "hf_vision", "config": {"model_type": "vit", "image_size": 32,
                                                                   "patch_size": 8, **TINY_HF}}),
    "hf_text": ("text_tower", {"name": "hf_text", "config": {"model_type": "bert", "vocab_size": 100, **TINY_HF}}),
}


def _inputs(kind: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    if kind == "vision_tower":
        return (torch.randn(2, 3, 32, 32, generator=gen),)
    return torch.randint(1, 100, (2, 8), generator=gen), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])


def _blocks(tower: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The tower's stack of blocks: the ModuleList (timm: Sequential) holding most parameters."""
    stacks = [m for m in tower.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def _freeze(tower: nn.Module, how: str) -> None:
    if how == "lock_all_but_top_block":  # embeddings and all blocks but the last frozen (LiT, partial)
        lock_tower(tower, TowerLock(lock=True, unlocked_groups=1), "test")
    elif how == "lock_whole_tower":
        lock_tower(tower, TowerLock(lock=True), "test")
    elif how == "middle_block_by_hand":  # a frozen block between trainable ones
        _blocks(tower)[1].requires_grad_(False)


def _run(tower: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], list[int], torch.Tensor]:
    """Forward and backward in training mode; gradients, forward calls per block, and the output."""
    calls = [0] * len(_blocks(tower))
    for index, block in enumerate(_blocks(tower)):
        # Counted on the block's first linear layer, with a pre-hook: transformers checkpoints a layer's
        # forward (its own hooks stay outside), and recomputation stops once it has what backward needs.
        first_linear = next(m for m in block.modules() if isinstance(m, nn.Linear))
        first_linear.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    # A head on top keeps the loss differentiable even when the whole tower is frozen.
    torch.manual_seed(0)
    head = nn.Linear(tower.output_dim, 4)
    tower.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "None of the inputs have requires_grad=True"
        pooled = tower(*_inputs(kind)).pooled
        head(pooled).square().sum().backward()
    return {n: p.grad for n, p in tower.named_parameters() if p.grad is not None}, calls, pooled


@pytest.mark.parametrize("freezing", ["none", "lock_all_but_top_block", "lock_whole_tower", "middle_block_by_hand"])
@pytest.mark.parametrize("tower_name", list(TOWERS))
@pytest.mark.slow
def test_checkpointing_with_frozen_parameters(tower_name, freezing):
    kind, spec = TOWERS[tower_name]
    torch.manual_seed(0)
    plain = build(kind, spec)
    checkpointed = build(kind, {**spec, "grad_checkpointing": True})
    checkpointed.load_state_dict(plain.state_dict())
    for tower in (plain, checkpointed):
        _freeze(tower, freezing)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}

    expected, plain_calls, plain_out = _run(plain, kind)
    got, calls, out = _run(checkpointed, kind)

    # Same gradients, for the same parameters: the trainable ones (but for an unused BERT pooler).
    assert set(got) == set(expected) and set(expected) <= trainable
    assert len(expected) >= len(trainable) - 2
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    # A fully frozen tower is a constant: nothing behind it is kept for backward.
    assert out.requires_grad == plain_out.requires_grad == bool(trainable)

    # Checkpointing is on: a block with trainable parameters runs again in backward. A frozen block
    # whose input needs no gradient is not: nothing below it learns, so backward never reaches it.
    assert plain_calls == [1] * len(calls)
    blocks = _blocks(checkpointed)
    needs_backward = any(p.requires_grad for p in _parameters_before(checkpointed, blocks))
    for index, block in enumerate(blocks):
        needs_backward = needs_backward or any(p.requires_grad for p in block.parameters())
        assert calls[index] == (2 if needs_backward else 1), f"block {index}: forward calls {calls}"


def _parameters_before(tower: nn.Module, blocks: nn.Module) -> list[nn.Parameter]:
    """The parameters that feed the first block (embeddings): those registered before the blocks."""
    in_blocks = {id(p) for p in blocks.parameters()}
    before = []
    for parameter in tower.parameters():
        if id(parameter) in in_blocks:
            break
        before.append(parameter)
    return before


# --------------------------------------------------------------------------------------------------
# The whole model: towers and the caption decoder checkpointed, with locked towers


TINY_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
COCA = ["model.caption_weight=1.0", "model.caption_head.name=coca_decoder", "model.caption_head.layers=2",
        "model.caption_head.heads=2", "model.caption_head.image_queries=4",
        "model.vision.layers=2", "model.text.layers=2"]
LOCKS = {
    "fully locked towers": ["model.vision_lock.lock=true", "model.text_lock.lock=true"],
    "partly locked towers": ["model.vision_lock.lock=true", "model.vision_lock.unlocked_groups=1",
                             "model.text_lock.lock=true", "model.text_lock.unlocked_groups=1"],
}


def _module_gradients(overrides: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
    import vlm_lab

    torch.manual_seed(0)
    module = vlm_lab.build_module(vlm_lab.load_config(TINY_CONFIG, overrides=overrides)).train()
    layers = module.caption_head.layers
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        first_linear = next(m for m in layer.modules() if isinstance(m, nn.Linear))
        first_linear.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    gen = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32, generator=gen),
             "input_ids": torch.randint(1000, 2000, (4, 10), generator=gen),
             "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "text_image_index": torch.arange(4), "image_ids": torch.arange(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "None of the inputs have requires_grad=True"
        module.losses(batch)["loss"].backward()
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("locks", list(LOCKS))
@pytest.mark.slow
def test_model_with_checkpointed_towers_and_decoder_and_locked_towers(locks):
    expected, plain_calls = _module_gradients(COCA + LOCKS[locks])
    on = ["model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true",
          "model.caption_head.grad_checkpointing=true"]
    got, calls = _module_gradients(COCA + LOCKS[locks] + on)
    assert plain_calls == [1, 1] and calls == [2, 2]  # the decoder's layers were recomputed
    assert set(got) == set(expected) and any(n.startswith("caption_head.") for n in got)
    assert any(n.startswith("vision.") for n in got) == (locks == "partly locked towers")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
