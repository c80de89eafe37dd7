"""Everything about running on several processes, kept in one place.

Contrastive losses get better with more negatives, so under data parallelism every rank scores its
batch against the features of all ranks. The losses call :func:`gather_features` /
:func:`all_gather_batch`, :func:`neighbour_exchange`, :func:`scale_gradient` and :func:`world_info`
and contain no other distributed code; on one process all of them are no-ops. :func:`sum_over_ranks`
gives the caption loss its global token count, and :func:`any_rank` lets every rank take the same
decision when only one rank's loss is non-finite. Evaluation (``vlm_lab/eval/``) splits its data with
:func:`shard_indices` and puts the pieces back with :func:`gather_shards`, :func:`gather_uneven` and
:func:`gather_strings` (captions), all-gathers of fixed-size tensors (never pickled Python objects).

The rest of the file reads what a launcher (torchrun, SLURM, Lightning's own) tells its processes,
so that the same YAML runs on one laptop core or on many nodes: :func:`launcher_layout` (how many
processes per node and how many nodes), :func:`launch_run_id` (a name every process agrees on)
and :func:`share_run_dir` / :func:`inherited_run_dir` (the run directory Lightning's children use).

Gradient bookkeeping under DDP. DDP *averages* parameter gradients over ranks, so a per-rank loss
``L_r`` gives the exact gradient of the global loss ``L`` when ``L = mean_r L_r`` and every rank's
features receive the gradient of *every* rank's ``L_r``. The differentiable gather provides the
second part (its backward sums over ranks); the losses are written so that the first holds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from vlm_lab.errors import ConfigError

# Set by the process that launches Lightning's DDP children (see vlm_lab.api); they inherit it.
RUN_DIR_ENV = "VLM_LAB_RUN_DIR"


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_rank() -> int:
    """This process's global rank, also before (or without) a process group.

    From the process group once one exists, else from what the launcher set (torchrun's ``RANK``,
    SLURM's ``SLURM_PROCID``; Lightning's own DDP children get ``LOCAL_RANK``), the variables and order
    Lightning itself reads. For work that only one process should show, such as progress bars.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 0


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on at least one rank; every rank gets the same answer.

    For decisions that change which collectives a step runs (skipping a step whose loss is
    non-finite on one rank only): if ranks decided alone, one would wait forever in an all-reduce
    the others never join. ``device`` must suit the backend (the loss's device: NCCL needs CUDA).
    """
    _, world_size = world_info()
    if world_size == 1:
        return bool(flag)
    votes = torch.tensor(int(bool(flag)), device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks, as a new tensor outside the autograd graph.

    For normalisers that must be global, such as the number of caption tokens a loss averages over
    (see :meth:`vlm_lab.heads.coca.CocaCaptionHead.caption_loss`).
    """
    _, world_size = world_info()
    total = tensor.detach().clone()
    if world_size > 1:
        dist.all_reduce(total)
    return total


def shard_indices(count: int) -> range:
    """The indices of ``count`` items this rank evaluates: every world-size-th one, from its rank.

    Strided, not in blocks, so that :func:`gather_shards` can put the rows back in order without
    being told how the split went; no item is padded in or counted twice.
    """
    rank, world_size = world_info()
    return range(rank, count, world_size)


def gather_shards(local: Tensor, count: int) -> Tensor:
    """The rows of all ranks' :func:`shard_indices` shards, back in the order of the ``count`` items.

    ``local`` holds this rank's rows (``[len(shard_indices(count)), ...]``). Every rank pads its rows
    to the same ``ceil(count / world_size)`` and one ``all_gather`` of that fixed size brings them
    together; item ``i`` is row ``i // world_size`` of rank ``i % world_size``.
    """
    _, world_size = world_info()
    if world_size == 1:
        return local
    per_rank = -(-count // world_size)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded.contiguous())
    # [world, per_rank, ...] -> [per_rank, world, ...]: row-major order is then the item order.
    return torch.stack(gathered, dim=1).reshape(per_rank * world_size, *local.shape[1:])[:count]


def gather_uneven(local: Tensor) -> Tensor:
    """Every rank's ``local`` rows concatenated in rank order, when the ranks hold different numbers.

    The row counts are all-gathered first, then every rank pads to the largest count for one
    fixed-size ``all_gather``; the padding is cut off again.
    """
    _, world_size = world_info()
    if world_size == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([len(local)], dtype=torch.long, device=local.device))
    sizes = [int(c.item()) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])


def gather_strings(local: Sequence[str], device: torch.device | str = "cpu") -> list[str]:
    """Every rank's ``local`` strings in rank order (generated captions and their references).

    Sent as tensors like everything else (no pickling): each rank's strings as one ``uint8`` tensor
    of UTF-8 bytes plus a tensor of their lengths, both through :func:`gather_uneven`. ``device``
    must suit the backend (NCCL needs CUDA).
    """
    _, world_size = world_info()
    if world_size == 1:
        return list(local)
    encoded = [text.encode("utf-8") for text in local]
    lengths = gather_uneven(torch.tensor([len(b) for b in encoded], dtype=torch.long, device=device)).tolist()
    local_bytes = torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())
    data = gather_uneven(local_bytes.to(device)).cpu()
    raw, texts, start = bytes(data.numpy()), [], 0
    for length in lengths:
        texts.append(raw[start:start + length].decode("utf-8"))
        start += length
    return texts


def gather_features(
    image_features: Tensor, text_features: Tensor, gather_with_grad: bool = True
) -> tuple[Tensor, Tensor]:
    """Every rank's image and text features, concatenated along the batch in rank order.

    See :func:`all_gather_batch`, which this applies to both.
    """
    return all_gather_batch(image_features, gather_with_grad), all_gather_batch(text_features, gather_with_grad)


def all_gather_batch(tensor: Tensor, gather_with_grad: bool = True) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order: ``[world * batch, ...]``.

    All ranks must pass the same batch size (``all_gather`` needs equal shapes, and the losses find
    their positives at ``rank * batch``).

    ``gather_with_grad=True`` backpropagates through the gather, so a rank's features also receive
    the gradient of other ranks' losses (the exact gradient of the global loss). ``False`` is cheaper:
    the gathered copies are constants and only this rank's slot, put back as the original tensor,
    carries gradient.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return tensor
    if gather_with_grad:
        return _AllGatherWithGrad.apply(tensor)
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    # dist.all_gather returns detached copies; the local slot must be the autograd-tracked input.
    gathered[rank] = tensor
    return torch.cat(gathered, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own slice.

    Written out rather than taken from torch: ``torch.distributed.nn.functional.all_gather`` is
    deprecated in recent torch, and its suggested replacement (the private, asynchronous
    ``_functional_collectives.all_gather_single``) leaves unwaited collectives behind when a gathered
    tensor goes unused. Backward is an all-reduce, which every backend (gloo included) supports,
    unlike reduce-scatter.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        rank, world_size = world_info()
        ctx.rank = rank
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor)
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss depends on every slice, so this slice's gradient is the sum over ranks.
        # A copy: all_reduce works in place, and autograd may share the incoming gradient elsewhere.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[ctx.rank]


def scale_gradient(tensor: Tensor, factor: float) -> Tensor:
    """``tensor`` unchanged in the forward pass; its gradient multiplied by ``factor`` in backward.

    The loss uses it where each rank already computes the *whole* gradient of the global loss for
    its own features, so that DDP's division by the world size is undone.
    """
    if factor == 1:
        return tensor
    return _ScaleGradient.apply(tensor, float(factor))


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def neighbour_exchange(tensor: Tensor) -> Tensor:
    """Send ``tensor`` to the next rank of the ring and return the one received from the previous rank.

    After ``k`` calls that pass on what was received, a rank holds the block of rank ``rank - k``
    (modulo the world size), so ``world - 1`` calls show every block to every rank, one at a time,
    without ever holding all of them at once. The backward pass sends gradients the opposite way,
    so every block receives the gradient of the losses that used it, on whichever rank.
    All ranks must pass tensors of the same shape.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor
    return _NeighbourExchange.apply(tensor)


def _ring_send_receive(tensor: Tensor, to_rank: int, from_rank: int) -> Tensor:
    received = torch.empty_like(tensor)
    # One batch of both operations: a blocking send on every rank at once would deadlock the ring.
    requests = dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, tensor, to_rank), dist.P2POp(dist.irecv, received, from_rank)]
    )
    for request in requests:
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        rank, world_size = world_info()
        ctx.next_rank, ctx.previous_rank = (rank + 1) % world_size, (rank - 1) % world_size
        return _ring_send_receive(tensor.contiguous(), ctx.next_rank, ctx.previous_rank)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # The block came from the previous rank: its gradient goes back there.
        return _ring_send_receive(grad.contiguous(), ctx.previous_rank, ctx.next_rank)


# --------------------------------------------------------------------------------------------------
# Launchers


def launcher_layout() -> tuple[int, int] | None:
    """``(processes per node, nodes)`` when an external launcher started this process, else None.

    torchrun sets ``LOCAL_WORLD_SIZE`` and ``WORLD_SIZE``; SLURM's ``srun`` sets ``SLURM_NTASKS`` and
    ``SLURM_NNODES``. Lightning checks that ``trainer.devices`` and ``trainer.num_nodes`` match them,
    so filling them in from here is what lets one YAML run under either launcher unchanged.
    """
    # Lightning's own detection, so that we agree with it about which launcher is in charge.
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        return per_node, int(os.environ["WORLD_SIZE"]) // per_node
    if SLURMEnvironment.detect():
        nodes = int(os.environ["SLURM_NNODES"])
        return int(os.environ["SLURM_NTASKS"]) // nodes, nodes
    return None


@contextmanager
def launched_process_group(device: torch.device) -> Iterator[None]:
    """Join the processes a launcher started (torchrun: ``WORLD_SIZE`` > 1, ``MASTER_ADDR``) for the
    duration, when no process group exists yet: gloo on the CPU, NCCL on CUDA. Code that runs without a
    Trainer (``vlm-lab eval``) then splits its work as a fit's processes do. Elsewhere it does nothing."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// reads the launcher's variables
    try:
        yield
    finally:
        dist.barrier()  # no process leaves while another still gathers
        dist.destroy_process_group()


def slurm_job_id() -> str:
    """This SLURM job's id: ``JOB``, or ``ARRAYJOB_TASK`` in a job array (what ``scontrol requeue`` takes)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ConfigError(f"SLURM job id {job!r} (SLURM_JOB_ID / SLURM_ARRAY_*) is not a job id")
    return job


def launch_run_id() -> str | None:
    """A name for this launch that every process of it computes alike, or None for a lone process.

    Each process of a multi-process launch runs the whole command, so a run directory named after
    its own clock could differ between ranks. The launchers give a shared id instead: SLURM's job id,
    torchrun's rendezvous id (``--rdzv-id``; ``--standalone`` makes one up). Lightning's own DDP
    launcher re-runs the command in child processes, which inherit the parent's run directory
    through ``VLM_LAB_RUN_DIR`` (see :func:`vlm_lab.api.fit`); that case is handled there.
    A multi-process torchrun launch without a rendezvous id has no shared name: ``ConfigError``.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect():  # one task too: a requeued job finds its run (vlm_lab/preemption.py)
        return f"slurm-{slurm_job_id()}"
    if TorchElasticEnvironment.detect() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id == "none":
            raise ConfigError(
                "torchrun started several processes with no shared run name: pass --run-dir DIR "
                "(run_dir= in Python), or launch with torchrun --standalone or --rdzv-id ID"
            )
        return f"torchrun-{run_id}"
    return None


@contextmanager
def share_run_dir(run_dir: Path) -> Iterator[None]:
    """While inside, processes started from this one (Lightning's DDP children) use ``run_dir``.

    Lightning's subprocess launcher re-runs the whole command in ``devices - 1`` child processes,
    copying this process's environment, once ``trainer.fit`` starts. The variable is removed again
    afterwards, so a later run in the same notebook picks its own directory.
    """
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def inherited_run_dir() -> Path | None:
    """The run directory of the process that launched this one (see :func:`share_run_dir`), if any."""
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None
