"""The ``retrieval`` evaluator: image-text retrieval R@1/5/10 both ways on a data module's split.

The data comes from any map-style data module (``coco`` JSON captions, ``hf_dataset``...), given as
its spec; it is built with the evaluated module's tokenizer and preprocessing. Every image is scored
against all its captions (the multi-caption protocol of ``vlm_lab/eval/retrieval.py``) and the chance
levels are reported beside the recalls.

Each rank encodes its share of the images (``shard_indices``) with their captions; the features
are gathered with fixed-size all-gathers, then ordered by image id (and caption position), so any
number of processes scores the same matrix in the same order. An image the data module replaced
(unreadable: a counted bad sample) appears once.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Subset

from vlm_lab import registry
from vlm_lab.data.collate import ImageTextCollate
from vlm_lab.distributed import gather_uneven, shard_indices
from vlm_lab.errors import ConfigError
from vlm_lab.eval.retrieval import DEFAULT_CHUNK_SIZE, chance_levels, retrieval_metrics
from vlm_lab.eval.suite import Evaluator
from vlm_lab.progress import progress
from vlm_lab.registry import register_evaluator

# What the evaluator supplies to the data module it builds (the module's own tokenizer and preprocessing).
_PROVIDED = ("tokenizer", "image_config", "max_length")


@register_evaluator("retrieval")
class RetrievalEvaluator(Evaluator):
    """Image-text retrieval on ``split`` of the data module ``data``.

    Args:
        data: a data module spec, e.g. ``{name: coco, root: ../shared/data/flickr8k}``.
        split: val, test, or dev (the training images a data module's ``dev_split`` sets aside).
        batch_size: images per batch (their captions come along).
        chunk_size: query rows scored at once (bounds the memory of the similarity matrix).
        ks: the K of R@K.
    """

    def __init__(self, data: dict[str, Any], split: Literal["val", "test", "dev"] = "val", batch_size: int = 64,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, ks: list[int] = [1, 5, 10]) -> None:  # noqa: B006 (never mutated)
        check_data_spec(data)
        self.data, self.split, self.batch_size, self.chunk_size, self.ks = dict(data), split, batch_size, chunk_size, list(ks)
        self._chance: dict[str, float] = {}

    @torch.no_grad()
    def evaluate(self, module: Any) -> dict[str, float]:
        loader = split_share_loader(module, self.data, self.split, self.batch_size, "retrieval")
        images, image_ids, texts, text_ids, text_ranks = [], [], [], [], []
        for batch in progress(loader, desc="retrieval", unit="batch"):
            images.append(module.encode_image(batch["pixel_values"].to(module.device)).float())
            texts.append(module.encode_text(batch["input_ids"].to(module.device),
                                            batch["attention_mask"].to(module.device)).float())
            owners = batch["text_image_index"]
            image_ids.append(batch["image_ids"])
            text_ids.append(batch["image_ids"][owners])
            first = torch.searchsorted(owners, owners)  # owners ascend: each caption's position among its image's
            text_ranks.append(torch.arange(len(owners)) - first)
        width = images[0].shape[1] if images else module.encode_text(["a"]).shape[1]
        local = {
            "images": torch.cat(images) if images else torch.zeros(0, width, device=module.device),
            "texts": torch.cat(texts) if texts else torch.zeros(0, width, device=module.device),
            "image_ids": _ids(image_ids, module.device), "text_ids": _ids(text_ids, module.device),
            "text_ranks": _ids(text_ranks, module.device),
        }
        gathered = {key: gather_uneven(value).cpu() for key, value in local.items()}
        image_features, text_features, text_to_image = _in_id_order(gathered)
        self._chance = chance_levels(text_to_image, len(image_features), self.ks)
        metrics = retrieval_metrics(image_features, text_features, text_to_image, self.ks, self.chunk_size)
        return {**metrics, "images": float(len(image_features)), "texts": float(len(text_features))}

    def chance(self) -> dict[str, float]:
        return dict(self._chance)


def split_share_loader(module: Any, data: dict[str, Any], split: str, batch_size: int, kind: str,
                       limit: int | None = None) -> DataLoader:
    """Batches of this rank's share (``shard_indices``) of the first ``limit`` images (None: all) of
    ``split`` of the data module ``data``, built with the module's tokenizer and preprocessing; every
    caption of an image comes with it."""
    datamodule = registry.build("datamodule", data, tokenizer=module.tokenizer,
                                image_config=module.image_config, max_length=module.max_length)
    dataset = datamodule.dataset(split)
    if not hasattr(dataset, "__getitem__"):
        raise ConfigError(f"{kind}: the {split} split of data module {data['name']!r} is a stream; the {kind} "
                          f"evaluator needs map-style data (coco_captions, hf_dataset, synthetic_shapes)")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    collate = ImageTextCollate(module.tokenizer, module.max_length, train=False)
    return DataLoader(Subset(dataset, list(shard_indices(count))), batch_size=batch_size, collate_fn=collate,
                      generator=torch.Generator())  # its own generator: the global RNG stays as it was


def check_data_spec(data: dict[str, Any]) -> None:
    """A data module spec an evaluator reads, checked now (the evaluator supplies the tokenizer and preprocessing)."""
    registry.spec_arguments("datamodule", data, provided={name: None for name in _PROVIDED})


def _ids(pieces: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(pieces).long().to(device) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def _in_id_order(gathered: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images sorted by id (each once), their captions after them in caption order, and each caption's image."""
    unique_ids, first = _first_occurrences(gathered["image_ids"])
    image_features = gathered["images"][first]
    # A caption is (image id, position among its image's captions); a replaced image brings its captions twice.
    keys = torch.stack([gathered["text_ids"], gathered["text_ranks"]], dim=1)
    unique_keys, first_text = torch.unique(keys, dim=0, return_inverse=True)
    keep = torch.full((len(unique_keys),), len(keys), dtype=torch.long)
    keep.scatter_reduce_(0, first_text, torch.arange(len(keys)), reduce="amin")
    text_features = gathered["texts"][keep]
    text_to_image = torch.searchsorted(unique_ids, unique_keys[:, 0].contiguous())
    return image_features, text_features, text_to_image


def _first_occurrences(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted unique ``ids`` and, for each, the index of its first occurrence."""
    unique_ids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    first = torch.full((len(unique_ids),), len(ids), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids)), reduce="amin")
    return unique_ids, first
