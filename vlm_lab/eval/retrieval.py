"""Image-text retrieval recall under the multi-caption protocol (COCO, Flickr30k).

Each image has one or more captions; ``text_to_image[j]`` is the image caption ``j`` describes.

* image-to-text (``i2t_R@K``): an image counts as found if *any* of its captions is among the K
  texts most similar to it.
* text-to-image (``t2i_R@K``): a caption counts as found if its image is among the K images most
  similar to it.

Results are percentages. Equal similarities are ordered by index (lower index ranks first), so the
metrics are deterministic and match a stable descending sort. Rather than taking a top-K, each query
gets the rank of its best correct candidate (how many candidates precede it), and R@K is the share
of ranks below K; this handles any K, including K at least the number of candidates (always found).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Query rows scored at once: 1024 x 25k captions is ~100 MB of float32 similarities, where the full
# 5k x 25k matrix of a COCO evaluation would be 500 MB.
DEFAULT_CHUNK_SIZE = 1024

# Rank given to an image with no captions: it can never be found, whatever K.
_NEVER = torch.iinfo(torch.long).max


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Recall@K in percent for both directions: keys ``i2t_R@{k}`` then ``t2i_R@{k}``.

    ``image_features`` is ``[N_img, D]``, ``text_features`` ``[N_txt, D]`` and ``text_to_image`` a
    ``[N_txt]`` integer tensor of image indices. Features are L2-normalised here (cosine
    similarity), in float32. Images without any caption count as misses.
    """
    _check_inputs(image_features, text_features, text_to_image, ks, chunk_size)
    images = F.normalize(image_features.detach().float(), dim=-1)
    texts = F.normalize(text_features.detach().float(), dim=-1)
    text_to_image = text_to_image.detach().to(device=images.device, dtype=torch.long)

    i2t_ranks = _image_to_text_ranks(images, texts, text_to_image, chunk_size)
    t2i_ranks = _text_to_image_ranks(images, texts, text_to_image, chunk_size)
    metrics = {f"i2t_R@{k}": _recall(i2t_ranks, k) for k in ks}
    metrics.update({f"t2i_R@{k}": _recall(t2i_ranks, k) for k in ks})
    return metrics


def chance_levels(text_to_image: Tensor, num_images: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected R@K in percent of a uniformly random ranking, with the keys of ``retrieval_metrics``.

    A random ranking of T texts puts K of them first; image i with c_i captions is missed only if all
    K come from the other T - c_i texts, so it is found with probability 1 - C(T - c_i, K) / C(T, K).
    A text's image is found with probability K / N_img. K is capped at the number of candidates.
    """
    num_texts = len(text_to_image)
    if num_images <= 0 or num_texts == 0:
        raise ValueError(f"need at least one image and one text, got {num_images} and {num_texts}")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image values must be image indices in [0, {num_images})")
    captions_per_image = torch.bincount(text_to_image.detach().long().cpu(), minlength=num_images).tolist()
    images_with_count = Counter(captions_per_image)

    metrics: dict[str, float] = {}
    for k in ks:
        k_texts = min(k, num_texts)
        all_draws = math.comb(num_texts, k_texts)
        found = sum(
            n * (1 - math.comb(num_texts - c, k_texts) / all_draws) for c, n in images_with_count.items()
        )
        metrics[f"i2t_R@{k}"] = 100.0 * found / num_images
    for k in ks:
        metrics[f"t2i_R@{k}"] = 100.0 * min(k, num_images) / num_images
    return metrics


def _image_to_text_ranks(images: Tensor, texts: Tensor, text_to_image: Tensor, chunk_size: int) -> Tensor:
    text_index = torch.arange(texts.shape[0], device=texts.device)
    ranks = []
    for start in range(0, images.shape[0], chunk_size):
        sims = images[start : start + chunk_size] @ texts.T  # [chunk, N_txt]
        image_index = torch.arange(start, start + sims.shape[0], device=sims.device)
        is_caption = text_to_image[None, :] == image_index[:, None]
        # The caption ranked best is the most similar one, the lowest index among equals; max()
        # returns the first maximum, which is exactly that one.
        best_sim, best_index = sims.masked_fill(~is_caption, -math.inf).max(dim=1)
        rank = _rank_of(sims, best_sim, best_index, text_index)
        ranks.append(rank.masked_fill(~is_caption.any(dim=1), _NEVER))
    return torch.cat(ranks)


def _text_to_image_ranks(images: Tensor, texts: Tensor, text_to_image: Tensor, chunk_size: int) -> Tensor:
    image_index = torch.arange(images.shape[0], device=images.device)
    ranks = []
    for start in range(0, texts.shape[0], chunk_size):
        sims = texts[start : start + chunk_size] @ images.T  # [chunk, N_img]
        target = text_to_image[start : start + chunk_size]
        target_sim = sims.gather(1, target[:, None]).squeeze(1)
        ranks.append(_rank_of(sims, target_sim, target, image_index))
    return torch.cat(ranks)


def _rank_of(sims: Tensor, target_sim: Tensor, target_index: Tensor, candidate_index: Tensor) -> Tensor:
    """Per row, how many candidates precede the target: more similar, or as similar with a lower index."""
    ahead = sims > target_sim[:, None]
    tied_before = (sims == target_sim[:, None]) & (candidate_index[None, :] < target_index[:, None])
    return (ahead | tied_before).sum(dim=1)


def _recall(ranks: Tensor, k: int) -> float:
    return 100.0 * (ranks < k).float().mean().item()


def _check_inputs(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, ks: Sequence[int], chunk_size: int
) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"expected [N_img, D] and [N_txt, D] features, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0 or text_features.shape[0] == 0:
        raise ValueError("need at least one image and one text")
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError(
            f"text_to_image must have one entry per text ({text_features.shape[0]}), "
            f"got shape {tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got {text_to_image.dtype}")
    if text_to_image.min() < 0 or text_to_image.max() >= image_features.shape[0]:
        raise ValueError(
            f"text_to_image values must be image indices in [0, {image_features.shape[0]}), got "
            f"[{int(text_to_image.min())}, {int(text_to_image.max())}]"
        )
    if not ks or any(not isinstance(k, int) or k <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
