"""The split evaluation: retrieval (and caption) metrics of the split a Trainer validates or tests on.

``VisionLanguageModule.configure_callbacks`` adds :class:`SplitEvaluation` to every Trainer that fits,
validates or tests it (``vlm-lab fit/validate/test``, ``vlm_lab.fit``, a notebook's own
``lightning.Trainer``). The module itself computes and logs only its losses (``val/loss``...); this
callback scores the same batches with the evaluators' own pieces, the pattern of the ``eval:``
section (``vlm_lab/eval/suite.py``):

* a model with a contrastive loss: image-text retrieval under the multi-caption protocol,
  ``<stage>/i2t_R@K`` and ``<stage>/t2i_R@K`` (K = 1, 5, 10) with ``<stage>/chance_<metric>``
  (:class:`~vlm_lab.eval.image_text_retrieval.RetrievalFeatures`, fed the embeddings that
  ``validation_step`` returns, so nothing is encoded twice);
* a model with a caption head (CoCa): ``<stage>/bleu4`` and ``<stage>/cider`` of the captions it
  generates (:func:`~vlm_lab.eval.captioning.caption_batch`, ``CaptionScorer``), on the first
  ``model.generation.max_images`` images, with a few examples logged.

``<stage>`` is ``val`` or ``test``. Every rank collects its own batches (the distributed sampler's
share, padding included); at the end of the epoch the pieces are all-gathered as fixed-size tensors
and de-duplicated by image id, so 2 processes report what 1 process does. Nothing is computed during
Lightning's sanity check (its metrics are discarded).
"""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback

from vlm_lab.distributed import shard_indices
from vlm_lab.eval.caption_metrics import CaptionScorer, batch_references, log_caption_examples
from vlm_lab.eval.captioning import caption_batch
from vlm_lab.eval.image_text_retrieval import RetrievalFeatures, encode_pairs

KS = [1, 5, 10]


class SplitEvaluation(Callback):
    """Logs ``val/<metric>`` (``test/<metric>``) of retrieval and captioning on the Trainer's own
    validation (test) batches; see the module docstring."""

    def __init__(self) -> None:
        self.retrieval: RetrievalFeatures | None = None
        self.captions: CaptionScorer | None = None
        self.caption_budget: int | None = None  # how many more images this rank captions (None: all)

    # Lightning's hooks, the same for both stages.
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._add(pl_module, outputs, batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._add(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(pl_module, "test")

    def _start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.retrieval = self.captions = None
        if trainer.sanity_checking:
            return
        if getattr(pl_module, "loss", None) is not None:
            self.retrieval = RetrievalFeatures()
        if getattr(pl_module, "caption_head", None) is not None:
            self.captions = CaptionScorer()
            limit = pl_module.generation_settings.max_images
            # The distributed sampler deals the split out strided, as shard_indices does: this rank's
            # share of the first `limit` images is what one process's first `limit` images hold.
            self.caption_budget = None if limit is None else len(shard_indices(limit))

    def _add(self, pl_module: Any, outputs: Any, batch: dict[str, Any]) -> None:
        if self.retrieval is not None:
            if isinstance(outputs, Mapping) and "image_features" in outputs:
                features = outputs["image_features"], outputs["text_features"]
            else:  # a module whose validation_step returns no embeddings
                features = encode_pairs(pl_module, batch)
            self.retrieval.add(batch, *features)
        if self.captions is not None:
            keep = len(batch["image_ids"]) if self.caption_budget is None else self.caption_budget
            keep = min(keep, len(batch["image_ids"]))
            if keep > 0:
                self.captions.add(batch["image_ids"][:keep].tolist(), caption_batch(pl_module, batch, keep),
                                  batch_references(batch, pl_module.tokenizer)[:keep])
            if self.caption_budget is not None:
                self.caption_budget -= keep

    def _finish(self, pl_module: Any, stage: str) -> None:
        # Every rank gets here and gathers, and all score the same gathered features: the values agree,
        # and syncing them (a mean) changes nothing; it is what Lightning expects of epoch-level metrics.
        if self.retrieval is not None:
            recalls, chance, _, _ = self.retrieval.compute(pl_module, KS)
            for key, value in recalls.items():
                pl_module.log(f"{stage}/{key}", value, prog_bar=key.endswith("R@1"), sync_dist=True)
            for key, value in chance.items():
                pl_module.log(f"{stage}/chance_{key}", value, sync_dist=True)
        if self.captions is not None:
            metrics, rows = self.captions.compute(pl_module.device)
            for key, value in metrics.items():
                pl_module.log(f"{stage}/{key}", value, prog_bar=key == "cider", sync_dist=True)
            log_caption_examples(pl_module, stage, rows[:pl_module.generation_settings.log_examples])
        self.retrieval = self.captions = None
