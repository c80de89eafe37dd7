"""The ``captioning`` evaluator: BLEU-4 and CIDEr-D of a captioner's (CoCa's) captions on a data module's split.

The figures are those of ``val/bleu4`` and ``val/cider`` (``vlm_lab/eval/caption_metrics.py``: the COCO
caption protocol, every reference caption of an image), here as an evaluator: each rank captions its
share of the images (decoding as the module's ``model.generation`` says) and
:class:`~vlm_lab.eval.caption_metrics.CaptionScorer` puts the captions of every rank together (as
UTF-8 bytes in tensors, ``vlm_lab.distributed.gather_strings``). The split evaluation
(``vlm_lab/eval/split_evaluation.py``) captions the trainer's validation batches with the same
:func:`caption_batch`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from vlm_lab.errors import ConfigError
from vlm_lab.eval.caption_metrics import CaptionScorer, batch_references
from vlm_lab.eval.image_text_retrieval import batch_to, check_data_spec, split_share_loader
from vlm_lab.eval.suite import Evaluator
from vlm_lab.generation import generate_captions
from vlm_lab.progress import progress
from vlm_lab.registry import register_evaluator


@register_evaluator("captioning")
class CaptioningEvaluator(Evaluator):
    """BLEU-4 and CIDEr-D of generated captions on ``split`` of the data module ``data``.

    Args:
        data: a data module spec, e.g. ``{name: coco_captions, root: ../shared/data/coco-mini}``.
        split: val or test.
        max_images: caption the first N images of the split (null: all).
        batch_size: images per batch.
    """

    def __init__(self, data: dict[str, Any], split: Literal["val", "test"] = "val", max_images: int | None = None,
                 batch_size: int = 32) -> None:
        check_data_spec(data)
        self.data, self.split, self.max_images, self.batch_size = dict(data), split, max_images, batch_size

    @torch.no_grad()
    def evaluate(self, module: Any) -> dict[str, float]:
        check_captioner(module)
        scorer = CaptionScorer()
        loader = split_share_loader(module, self.data, self.split, self.batch_size, "captioning", self.max_images)
        for batch in progress(loader, desc="captioning", unit="batch"):
            batch = batch_to(batch, module.device)
            scorer.add(batch["image_ids"].tolist(), caption_batch(module, batch), batch_references(batch, module.tokenizer))
        metrics, rows = scorer.compute(module.device)
        return {**metrics, "images": float(len(rows))}


def check_captioner(module: Any) -> None:
    if getattr(module, "caption_head", None) is None:
        raise ConfigError("captioning: the model has no caption head (train it with model.caption_weight > 0)")


def caption_batch(module: Any, batch: dict[str, Any], limit: int | None = None) -> list[str]:
    """Captions of a batch's images (the first ``limit``; None: all), from their pixels or from the
    embedding cache's image tokens, decoded as the module's ``model.generation`` says."""
    tokens = module.batch_vision_output(batch).tokens[:limit]
    return generate_captions(module, tokens, module.generation_settings)
