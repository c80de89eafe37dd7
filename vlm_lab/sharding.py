"""Sharded data parallelism (FSDP2): ``trainer.strategy: fsdp2``.

Under DDP every process holds the whole model, its gradients and the optimizer's two AdamW moments:
16 bytes per fp32 parameter on every process. Fully sharded data parallelism splits all three
over the processes: each holds ``1 / world`` of every tensor, gathers a block's full parameters just
before the block runs and frees them after; gradients are reduce-scattered instead of all-reduced.
This file is that strategy's one room:

* **The YAML** (:func:`check_strategy`, :func:`build_strategy`). ``trainer.strategy: fsdp2``, or a
  mapping ``{name: fsdp2, locked: replicate, checkpoint: sharded, reshard_after_forward: false}``
  (:class:`ShardingSettings`), becomes Lightning's ``ModelParallelStrategy`` with one data-parallel
  dimension over every process. Every other value goes to Lightning unchanged.
* **What is sharded** (:func:`shard_module`, called by the module's ``configure_model`` hook
  through :func:`configure_sharding`). PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``)
  applied bottom-up: each block of every tower and of the CoCa decoder, then each tower, pooler,
  head and the loss as one unit each. Parameter names do not change (no wrapper levels), so
  checkpoints, ``lr_scale`` and the weight-decay groups read the same names as without sharding.
* **Evaluation helpers**: :func:`gathered_parameters` (CoCa's generation reaches inside blocks).
* **Checkpoints on one process**: :func:`is_sharded_checkpoint`, :func:`consolidate_checkpoint`.

Why ``ModelParallelStrategy`` (FSDP2) and not Lightning's ``FSDPStrategy`` (FSDP1): Lightning 2.6
refuses ``FSDPStrategy`` without a CUDA accelerator, so it could not be built or tested on the CPU,
while ``ModelParallelStrategy`` initialises gloo on CPU and FSDP2 runs there (docs/how-to/sharded-training.md).

Two kinds of parameters stay whole on every process (``replicated``): 0-dim ones (FSDP2 cannot shard
a scalar: the loss's temperature, SigLIP's bias) and, with ``locked: replicate``, frozen ones. A
frozen parameter has no gradient, so it needs nothing more; a trainable scalar's gradient is averaged
over the processes by a hook, exactly what DDP does for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from vlm_lab.errors import ConfigError
# The YAML side (what trainer.strategy may say, checked when a config loads) is the schema's.
from vlm_lab.schema import STRATEGY_NAME, ShardingSettings, check_strategy, sharding_settings  # noqa: F401

# The LightningModule's parts, sharded in this order, each as its own unit (after its blocks).
PARTS = ("vision", "text", "caption_head", "vision_head", "text_head", "loss")
# Methods that read a unit's parameters without going through its forward: FSDP2 must gather around
# them too (``register_fsdp_forward_method``).
FORWARD_METHODS = {"caption_head": ("decode", "pool_contrastive", "pool_caption"),
                   "loss": ("logit_scale_value",)}
# ModelParallelStrategy's file beside the shards of a sharded checkpoint (everything but the tensors).
METADATA_FILE = "meta.pt"


def build_strategy(trainer: Mapping[str, Any]) -> Any:
    """What ``lightning.Trainer(strategy=...)`` gets for ``trainer.strategy``: Lightning's
    ``ModelParallelStrategy`` sharding over every process for ``fsdp2``, the value unchanged otherwise.

    ``trainer`` is the trainer section with ``devices`` and ``num_nodes`` as the Trainer will see
    them (a launcher's layout filled in).
    """
    value = trainer.get("strategy", "auto")
    settings = sharding_settings(value)
    if settings is None:
        return value
    world_size = _devices_per_node(trainer.get("accelerator", "auto"), trainer.get("devices", "auto")) * \
        int(trainer.get("num_nodes", 1))
    return ShardedStrategy(settings, world_size)


def _devices_per_node(accelerator: Any, devices: Any) -> int:
    """How many processes Lightning starts per node for ``accelerator`` and ``devices``.

    ModelParallelStrategy needs the size of its data-parallel dimension when it is built; Lightning
    works out the process count only inside the Trainer, so it is worked out here the same way, with
    Lightning's own parsers (and ``ShardedStrategy.setup_environment`` checks the two agree).
    """
    if accelerator == "auto":
        accelerator = "cuda" if CUDAAccelerator.is_available() else "cpu"
    kinds = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "gpu": CUDAAccelerator}
    if accelerator not in kinds:
        raise ConfigError(f"trainer.strategy={STRATEGY_NAME} runs on cpu or cuda, not trainer.accelerator={accelerator!r}")
    kind = kinds[accelerator]
    if devices in ("auto", -1, "-1"):
        return kind.auto_device_count()
    return len(kind.get_parallel_devices(kind.parse_devices(devices)))


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with FSDP2 over one data-parallel dimension of every
    process (no tensor parallelism), carrying the :class:`ShardingSettings` that ``configure_model``
    applies. Checkpoints: ``full`` is one file written by rank 0, ``sharded`` a directory."""

    def __init__(self, settings: ShardingSettings, world_size: int) -> None:
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=settings.checkpoint == "sharded")
        self.sharding = settings
        self.expected_world_size = world_size

    def setup_environment(self) -> None:
        if self.world_size != self.expected_world_size:  # what _devices_per_node worked out was wrong
            raise ConfigError(f"trainer.strategy={STRATEGY_NAME}: Lightning starts {self.world_size} processes, "
                              f"not the {self.expected_world_size} expected from trainer.devices and "
                              f"trainer.num_nodes; set both explicitly")
        super().setup_environment()


# --------------------------------------------------------------------------------------------------
# What is sharded


def configure_sharding(module: Any) -> None:
    """Shard ``module`` (a ``VisionLanguageModule``) when its trainer's strategy is a
    ``ModelParallelStrategy``; otherwise do nothing. Called from its ``configure_model`` hook,
    which Lightning may call more than once: a module already sharded is left as it is."""
    try:
        strategy = module.trainer.strategy
    except RuntimeError:  # load_from_checkpoint calls configure_model too, on a module with no trainer
        return
    if not isinstance(strategy, ModelParallelStrategy):
        return
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return
    mesh = module.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ConfigError(f"ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()}: "
                          f"vlm-lab shards over data parallelism only; use trainer.strategy={STRATEGY_NAME}")
    shard_module(module, mesh["data_parallel"], getattr(strategy, "sharding", ShardingSettings()))


def shard_module(module: nn.Module, mesh: Any, settings: ShardingSettings = ShardingSettings()) -> list[nn.Module]:
    """Apply FSDP2 to ``module``'s parts (``PARTS``) over the 1-D device ``mesh``; returns the units.

    Units, bottom-up: the blocks of each part (:func:`repeated_blocks`), then the part itself (its
    remaining parameters: embeddings, norms, projections). A part with nothing left to shard is
    not made a unit. Each part is a root of its own: the module has no forward of its own for
    FSDP2 to hook, so Lightning's ``training_step`` reaches the parts one by one.
    """
    _check_shardable(module)
    units: list[nn.Module] = []
    for name in PARTS:
        part = getattr(module, name, None)
        if part is None:
            continue
        replicated = replicated_parameters(part, settings)
        for parameter in replicated:
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(_average_over(mesh.get_group()))
        for block in [*repeated_blocks(part), part]:
            if any(p not in replicated for p in block.parameters() if not _in_unit(p)):
                fully_shard(block, mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                            ignored_params=replicated)
                units.append(block)
        for method in FORWARD_METHODS.get(name, ()):
            register_fsdp_forward_method(part, method)  # a no-op for a part that is not a unit
    return units


def replicated_parameters(part: nn.Module, settings: ShardingSettings) -> set[nn.Parameter]:
    """The parameters of ``part`` that every process keeps whole (see the module docstring)."""
    return {p for p in part.parameters()
            if p.ndim == 0 or (settings.locked == "replicate" and not p.requires_grad)}


def repeated_blocks(part: nn.Module) -> list[nn.Module]:
    """The blocks of ``part``'s block stacks: each entry of an ``nn.ModuleList`` (transformer layers of
    the native, Hugging Face and CoCa modules) or of an ``nn.Sequential`` whose entries all share one
    class (timm's ``blocks``), outermost stacks only. Each becomes an FSDP unit, so that only one
    block's parameters are gathered at a time."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, child in part.named_modules():
        if id(child) in inside:
            continue
        entries = list(child.children())
        stack = isinstance(child, nn.ModuleList) or (
            isinstance(child, nn.Sequential) and len(entries) > 1 and len({type(e) for e in entries}) == 1)
        if stack:
            for entry in entries:
                if any(True for _ in entry.parameters()):
                    blocks.append(entry)
                inside.update(id(m) for m in entry.modules())
    return blocks


def _check_shardable(module: nn.Module) -> None:
    caption_head = getattr(module, "caption_head", None)
    if caption_head is not None and getattr(caption_head, "tie_embedding", False):
        raise ConfigError(f"model.caption_head.tie_embedding: a weight shared by the text tower and the caption "
                          f"head cannot be sharded in two units; set tie_embedding: false with "
                          f"trainer.strategy={STRATEGY_NAME}")


def _in_unit(parameter: nn.Parameter) -> bool:
    return isinstance(parameter, DTensor)  # fully_shard turned it into a shard already


def _average_over(group: Any):
    """A gradient hook that replaces a replicated parameter's gradient by its mean over ``group``,
    as DDP's all-reduce would. Every process runs the same backward, so the calls pair up."""

    def average(parameter: torch.Tensor) -> None:
        parameter.grad.div_(dist.get_world_size(group))
        dist.all_reduce(parameter.grad, group=group)

    return average


@contextlib.contextmanager
def gathered_parameters(*parts: nn.Module | None) -> Iterator[None]:
    """While inside, the FSDP units in ``parts`` hold their full parameters; outside, they are
    sharded again. A no-op for modules that are not sharded. Every process must enter it together.

    For code that reaches into a unit without calling its forward: CoCa's incremental generation
    runs the text tower's layers piece by piece. A unit whose forward *is* called inside frees its
    parameters after that forward as usual (``reshard_after_forward``) and gathers them again at
    its next one, so only units used without their forward need to stay gathered, and they do.
    """
    units = [m for part in parts if part is not None for m in part.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


# --------------------------------------------------------------------------------------------------
# Checkpoints on one process


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory written with ``checkpoint: sharded``."""
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint directory ``path`` as one ordinary Lightning checkpoint file ``out``.

    Runs on one process without the model: the shards are read by torch's distributed-checkpoint
    reader and joined. The result is what ``checkpoint: full`` writes (the loops, callbacks and
    ``on_save_checkpoint`` entries from the metadata file, the full ``state_dict``), so
    ``load_from_checkpoint``, ``vlm-lab export`` and ``validate ckpt_path=`` read it. The optimizer
    states are dropped: resume from the directory itself, which keeps them sharded.
    """
    path, out = Path(path), Path(out)
    if not is_sharded_checkpoint(path):
        raise ConfigError(f"consolidate: {path} is not a sharded checkpoint directory (no {METADATA_FILE} in it)")
    if out.exists():
        raise ConfigError(f"consolidate: {out} exists; give a new file name")
    checkpoint = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=False)
    joined = out.with_name(out.name + ".shards")
    try:
        dcp_to_torch_save(path, joined)  # {"state_dict": ..., "optimizer_0": ...}, on this process alone
        checkpoint["state_dict"] = torch.load(joined, map_location="cpu", weights_only=False)["state_dict"]
    finally:
        joined.unlink(missing_ok=True)
    checkpoint.pop("optimizer_states", None)
    partial = out.with_name(out.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(out)  # atomic: never a half-written checkpoint under the final name
    return out
