"""The ``captioning`` evaluator: BLEU-4 and CIDEr-D of a captioner's (CoCa's) captions on a data module's split.

The figures are the module's own caption evaluation (``vlm_lab/eval/caption_metrics.py``: the COCO
caption protocol, every reference caption of an image), here as an evaluator: each rank captions its
share of the images with ``module.generate`` (decoding as the module's ``model.generation`` says) and
:class:`~vlm_lab.eval.caption_metrics.CaptionScorer` puts the captions of every rank together (short
strings, exchanged as objects; no feature matrix travels).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from vlm_lab.errors import ConfigError
from vlm_lab.eval.caption_metrics import CaptionScorer, batch_references
from vlm_lab.eval.image_text_retrieval import check_data_spec, split_share_loader
from vlm_lab.eval.suite import Evaluator
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
        if getattr(module, "caption_head", None) is None:
            raise ConfigError("captioning: the model has no caption head (train it with model.caption_weight > 0)")
        scorer = CaptionScorer()
        loader = split_share_loader(module, self.data, self.split, self.batch_size, "captioning", self.max_images)
        for batch in progress(loader, desc="captioning", unit="batch"):
            scorer.add(batch["image_ids"].tolist(), module.generate(batch["pixel_values"]),
                       batch_references(batch, module.tokenizer))
        metrics, rows = scorer.compute()
        return {**metrics, "images": float(len(rows))}
