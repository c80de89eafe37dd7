"""Locking towers (LiT): freeze a tower whole, or all but its top layer groups.

A tower is split into *layer groups*, ordered from the input side:

* timm towers: timm's own ``group_matcher`` (stem, then each block, the last block with the head
  convolution), as open_clip's ``TimmModel.lock`` does;
* any tower with a ``layer_groups()`` method (a custom tower may define one): its groups;
* every other tower (``clip_vit``, ``clip_text``, ``hf_vision``, ``hf_text``): its stack of blocks, the
  ``nn.ModuleList`` holding most parameters. Parameters registered before the first block
  (embeddings, pre-norm) form the first group; those after the last (final norm, pooler) join the
  last block's group, as in open_clip's ``VisionTransformer.lock``.

The same groups set layer-wise learning-rate decay (``optim.layer_decay``, :func:`layer_decay_scales`).

``lock: true`` freezes every group but the top ``unlocked_groups``. A frozen parameter has
``requires_grad=False``, so the optimizer never sees it and DDP never waits for its gradient. A
tower frozen whole is *fully locked*: the module runs it in eval mode under ``no_grad``, and its
outputs may be cached (``vlm_lab/embedding_cache.py``). The settings (``TowerLock``, the config's
``model.vision_lock`` / ``model.text_lock``) are declared in ``vlm_lab/schema.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vlm_lab.errors import ConfigError
from vlm_lab.schema import TowerLock


@dataclass
class LockedParts:
    """What ``lock_tower`` froze: whether all of it, and which modules must stay in eval mode."""

    fully_locked: bool
    eval_modules: list[nn.Module]

    def apply_eval_mode(self) -> None:
        """Put the frozen parts back in eval mode (after a ``train()`` call switched them)."""
        for module in self.eval_modules:
            module.eval()


def layer_groups(tower: nn.Module) -> list[list[str]]:
    """The tower's parameter names in layer groups, input side first (see the module docstring)."""
    if callable(getattr(tower, "layer_groups", None)):
        return [list(group) for group in tower.layer_groups()]
    timm_model = getattr(tower, "model", None)
    if callable(getattr(timm_model, "group_matcher", None)):
        from timm.models._manipulate import group_parameters

        groups = group_parameters(timm_model, timm_model.group_matcher(coarse=False))
        return [[f"model.{name}" for name in groups[key]] for key in sorted(groups)]
    return _block_groups(tower)


def layer_decay_scales(tower: nn.Module, decay: float, where: str) -> dict[str, float]:
    """Layer-wise learning-rate decay: a learning-rate multiplier for each of ``tower``'s parameter names.

    open_clip's ``--image-layer-decay`` / ``--text-layer-decay`` (BEiT's rule): counted from the top,
    each layer group learns ``decay`` times as fast as the one above it. The top of a CLIP tower in
    open_clip is its projection, at full rate; here the projection is the head above the tower, so
    of a tower's ``n`` layer groups (input side first) group ``i`` gets ``decay ** (n - i)``: the top
    block ``decay``, the embeddings ``decay ** n``. ``decay`` lies in (0, 1] (``vlm_lab.schema.LayerDecay``
    checks it); 1 gives every parameter 1.0. ``where`` names the setting in errors
    (``optim.layer_decay.vision``).
    """
    if decay == 1.0:
        return {name: 1.0 for name, _ in tower.named_parameters()}
    try:
        groups = layer_groups(tower)
    except ConfigError:
        raise ConfigError(f"{where}={decay}: {type(tower).__name__} has no stack of blocks to split into layer "
                          f"groups (vlm_lab/locking.py); give it a layer_groups() method, or set {where}=1") from None
    return {name: decay ** (len(groups) - index) for index, group in enumerate(groups) for name in group}


def _block_groups(tower: nn.Module) -> list[list[str]]:
    block_lists = [(sum(p.numel() for p in m.parameters()), name, m) for name, m in tower.named_modules()
                   if isinstance(m, nn.ModuleList)]
    block_lists = [entry for entry in block_lists if entry[0] > 0]
    if not block_lists:
        raise ConfigError(f"{type(tower).__name__} has no stack of blocks to split into layer groups; "
                          f"only a whole-tower lock (unlocked_groups: 0) works for it, or give it a layer_groups() method")
    _, prefix, blocks = max(block_lists, key=lambda entry: entry[0])
    block_of = {f"{prefix}.{index}.{name}": index for index, block in enumerate(blocks)
                for name, _ in block.named_parameters()}
    groups: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    seen_block = False
    for name, _ in tower.named_parameters():
        if name in block_of:
            seen_block = True
            groups[block_of[name] + 1].append(name)
        else:  # before the blocks: the input group; after them: the top block's group
            groups[-1 if seen_block else 0].append(name)
    return [group for group in groups if group]


def lock_tower(tower: nn.Module, lock: TowerLock, where: str) -> LockedParts:
    """Freeze ``tower`` as ``lock`` says; ``where`` names its config section in errors."""
    if not lock.lock:
        return LockedParts(fully_locked=False, eval_modules=[])
    frozen_names: set[str]
    if lock.unlocked_groups:
        groups = layer_groups(tower)
        if lock.unlocked_groups >= len(groups):
            raise ConfigError(f"{where}.unlocked_groups={lock.unlocked_groups} leaves nothing locked: "
                              f"the tower has {len(groups)} layer groups; use at most {len(groups) - 1}, or lock: false")
        frozen_names = {name for group in groups[: len(groups) - lock.unlocked_groups] for name in group}
    else:
        frozen_names = {name for name, _ in tower.named_parameters()}

    name_of = {id(p): n for n, p in tower.named_parameters()}
    frozen_modules = [module for module in tower.modules()
                      if _all_frozen([name_of[id(p)] for p in module.parameters()], frozen_names)]
    keep_layer_norms = not lock.freeze_layer_norm
    for name, parameter in tower.named_parameters():
        if name in frozen_names:
            parameter.requires_grad_(False)
    if keep_layer_norms:
        for module in frozen_modules:
            if isinstance(module, nn.LayerNorm):
                for parameter in module.parameters():
                    parameter.requires_grad_(True)

    fully_locked = not any(p.requires_grad for p in tower.parameters())
    if fully_locked:
        eval_modules: list[nn.Module] = [tower]
    elif lock.freeze_bn_stats:
        eval_modules = [m for m in frozen_modules if isinstance(m, _BatchNorm)]
    else:
        eval_modules = []
    # Modes are left alone here: the module applies them on train() and at each training epoch's
    # start, after Lightning's check that warns about modules found in eval mode when fit begins.
    return LockedParts(fully_locked=fully_locked, eval_modules=eval_modules)


def _all_frozen(names: list[str], frozen_names: set[str]) -> bool:
    """Whether a module with these parameter names (it has some) lies wholly in the frozen groups."""
    return bool(names) and all(n in frozen_names for n in names)
