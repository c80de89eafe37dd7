"""The ``retrieval`` evaluator: image-text retrieval R@1/5/10 both ways on a data module's split.

The data comes from any data module, given as its spec: map-style (``coco_captions`` JSON captions,
``hf_dataset``, ``synthetic_shapes``) or streamed (``cc3m`` webdataset shards, ``hf_dataset`` with
``streaming: true``); it is built with the evaluated module's tokenizer and preprocessing. Every image is scored
against all its captions (the multi-caption protocol of ``vlm_lab/eval/retrieval.py``) and the chance
levels are reported beside the recalls.

Each rank encodes its share of the images (``shard_indices``, or the stream's share of the shards)
with their captions; the features
are gathered with fixed-size all-gathers, then ordered by image id (and caption position), so any
number of processes scores the same matrix in the same order. An image read twice (one the data
module replaced as unreadable, a counted bad sample, or one a stream's short share reads again)
appears once.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

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
        batch_size: images per batch (their captions come along); a stream batches itself with the
            data module's ``eval_batch_size`` (give it in ``data``).
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
        features = RetrievalFeatures()
        for batch in progress(loader, desc="retrieval", unit="batch"):
            batch = batch_to(batch, module.device)
            features.add(batch, *encode_pairs(module, batch))
        metrics, self._chance, images, texts = features.compute(module, self.ks, self.chunk_size)
        return {**metrics, "images": float(images), "texts": float(texts)}

    def chance(self) -> dict[str, float]:
        return dict(self._chance)


def encode_pairs(module: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's image embeddings and the embeddings of all its captions (pixels or the embedding
    cache's rows: ``encode_batch_images``)."""
    return module.encode_batch_images(batch), module.encode_text(batch["input_ids"], batch["attention_mask"])


class RetrievalFeatures:
    """The image and caption embeddings of this rank's batches, scored together over all ranks.

    What the ``retrieval`` evaluator collects from its own loader, and the split evaluation
    (``vlm_lab/eval/split_evaluation.py``) from the trainer's validation batches. :meth:`compute`
    all-gathers the features with fixed-size tensors (``gather_uneven``), keeps each image (by id)
    and each caption (by image id and position) once, in id order, and scores them.
    """

    def __init__(self) -> None:
        self.pieces: dict[str, list[torch.Tensor]] = {key: [] for key in _KEYS}

    def add(self, batch: dict[str, Any], image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """One batch: its ``image_ids`` and ``text_image_index`` (each caption's image in the batch,
        ascending), and the embeddings of its images and of all its captions."""
        owners = batch["text_image_index"].to(image_features.device)
        image_ids = batch["image_ids"].to(image_features.device)
        first = torch.searchsorted(owners, owners)  # owners ascend: each caption's position among its image's
        for key, value in zip(_KEYS, (image_features.float(), text_features.float(), image_ids, image_ids[owners],
                                      torch.arange(len(owners), device=owners.device) - first)):
            self.pieces[key].append(value.detach())

    def compute(self, module: Any, ks: list[int], chunk_size: int = DEFAULT_CHUNK_SIZE
                ) -> tuple[dict[str, float], dict[str, float], int, int]:
        """``(recalls, chance levels, images, captions)`` over every rank's batches (empty dicts when
        no rank saw a batch); clears the state. Every rank of a distributed run must call it; all
        get the same figures."""
        width = module.encode_text(["a"]).shape[1] if not self.pieces["images"] else self.pieces["images"][0].shape[1]
        local = {key: torch.cat(pieces) if pieces else _empty(key, width, module.device)
                 for key, pieces in self.pieces.items()}
        self.pieces = {key: [] for key in _KEYS}
        gathered = {key: gather_uneven(value.to(module.device)).cpu() for key, value in local.items()}
        if len(gathered["images"]) == 0:
            return {}, {}, 0, 0
        image_features, text_features, text_to_image = _in_id_order(gathered)
        chance = chance_levels(text_to_image, len(image_features), ks)
        metrics = retrieval_metrics(image_features, text_features, text_to_image, ks, chunk_size)
        return metrics, chance, len(image_features), len(text_features)


_KEYS = ("images", "texts", "image_ids", "text_ids", "text_ranks")


def _empty(key: str, width: int, device: torch.device) -> torch.Tensor:
    if key in ("images", "texts"):
        return torch.zeros(0, width, device=device)
    return torch.zeros(0, dtype=torch.long, device=device)


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (lists such as raw captions stay as they are)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def split_share_loader(module: Any, data: dict[str, Any], split: str, batch_size: int, kind: str,
                       limit: int | None = None) -> Iterable[dict[str, Any]]:
    """Batches of this rank's share of ``split`` of the data module ``data``, built with the module's
    tokenizer and preprocessing; every caption of an image comes with it.

    Map-style data: every world-size-th image (``shard_indices``) of the first ``limit`` (None: all),
    ``batch_size`` images per batch. A stream (webdataset shards, a streamed ``datasets`` dataset): the
    data module's own loader of the split, which deals the shards out over the ranks and loader
    workers as in training and batches itself (``data.eval_batch_size``); a reader with a short share
    reads some of it twice, which the evaluators drop by image id. ``limit`` needs map-style data.
    """
    datamodule = registry.build("datamodule", data, tokenizer=module.tokenizer,
                                image_config=module.image_config, max_length=module.max_length)
    dataset = datamodule.dataset(split)
    if isinstance(dataset, IterableDataset):
        if limit is not None:
            raise ConfigError(f"{kind}: max_images picks the first images of a split, and the {split} split of data "
                              f"module {data['name']!r} is a stream; leave max_images out or use map-style data")
        return getattr(datamodule, f"{split}_dataloader")()
    if not hasattr(dataset, "__getitem__"):
        raise ConfigError(f"{kind}: the {split} split of data module {data['name']!r} is neither map-style nor a "
                          f"stream the {kind} evaluator can read")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    collate = ImageTextCollate(module.tokenizer, module.max_length, train=False)
    return DataLoader(Subset(dataset, list(shard_indices(count))), batch_size=batch_size, collate_fn=collate,
                      generator=torch.Generator())  # its own generator: the global RNG stays as it was


def check_data_spec(data: dict[str, Any]) -> None:
    """A data module spec an evaluator reads, checked now (the evaluator supplies the tokenizer and preprocessing)."""
    registry.spec_arguments("datamodule", data, provided={name: None for name in _PROVIDED})


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
