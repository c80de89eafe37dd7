"""Everything the losses need from ``torch.distributed``, kept in one place.

Contrastive losses get better with more negatives, so under data parallelism every rank scores its
batch against the features of all ranks. The losses call :func:`gather_features` and
:func:`world_info` and contain no other distributed code; on one process both are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(
    image_features: Tensor, text_features: Tensor, gather_with_grad: bool = True
) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's features along the batch, in rank order: ``[world * batch, dim]``.

    All ranks must pass the same batch size (``all_gather`` needs equal shapes, and the losses find
    their positives at ``rank * batch``).

    ``gather_with_grad=True`` backpropagates through the gather, so a rank's features also receive
    the gradient of other ranks' losses (the exact gradient of the global loss). ``False`` is cheaper:
    the gathered copies are constants and only this rank's slot, put back as the original tensor,
    carries gradient.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return image_features, text_features

    if gather_with_grad:
        return _AllGatherWithGrad.apply(image_features), _AllGatherWithGrad.apply(text_features)

    gathered_images = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_images, image_features)
    dist.all_gather(gathered_texts, text_features)
    # dist.all_gather returns detached copies; the local slot must be the autograd-tracked input.
    gathered_images[rank] = image_features
    gathered_texts[rank] = text_features
    return torch.cat(gathered_images, dim=0), torch.cat(gathered_texts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own slice.

    Written out rather than taken from torch: ``torch.distributed.nn.functional.all_gather`` is
    deprecated in recent torch, and its suggested replacement (the private, asynchronous
    ``_functional_collectives.all_gather_single``) leaves unwaited collectives behind when a gathered
    tensor goes unused, as SigLIP's gathered images do. Backward is an all-reduce, which every
    backend (gloo included) supports, unlike reduce-scatter.
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
