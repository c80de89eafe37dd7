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
        # Imported here: torch.distributed.nn is missing on builds without distributed support.
        import torch.distributed.nn.functional as dist_fn

        all_images = torch.cat(dist_fn.all_gather(image_features), dim=0)
        all_texts = torch.cat(dist_fn.all_gather(text_features), dim=0)
        return all_images, all_texts

    gathered_images = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_images, image_features)
    dist.all_gather(gathered_texts, text_features)
    # dist.all_gather returns detached copies; the local slot must be the autograd-tracked input.
    gathered_images[rank] = image_features
    gathered_texts[rank] = text_features
    return torch.cat(gathered_images, dim=0), torch.cat(gathered_texts, dim=0)
