"""Zero-shot classification on an image folder or a ``datasets`` dataset, as CLIP evaluates it (the ``zeroshot`` evaluator).

Each class gets a text embedding: every prompt template filled with its name, encoded,
L2-normalised, averaged and normalised again (CLIP's prompt ensemble). An image is classified by the
class embedding closest to its own. Reported in percent: ``top1``, ``top5`` and
``mean_per_class_recall`` (the mean over classes of the share of their images classified right,
CLIP_benchmark's ``mean_per_class_recall``), beside ``images``, ``classes`` and ``skipped`` (unreadable
images, left out). Where the class names come from: ``vlm_lab/eval/image_folder.py``.

Both sides are split over the ranks of a distributed run: each encodes its share of the classes
and of the images, and fixed-size all-gathers put the rows back in order on every rank.

Differences from CLIP_benchmark by design: an image whose two best classes score exactly alike
counts as right only if the lower class index is the true one (``torch.topk`` there leaves ties in
an unspecified order); with float32 features such ties do not occur in practice.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlm_lab.distributed import gather_shards, shard_indices
from vlm_lab.eval.image_folder import image_features, read_labelled_images
from vlm_lab.eval.suite import Evaluator
from vlm_lab.eval.templates import resolve_templates
from vlm_lab.progress import progress
from vlm_lab.registry import register_evaluator


@torch.no_grad()
def class_embeddings(module: Any, classnames: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> torch.Tensor:
    """``[classes, embed_dim]`` float32: each class's prompt-ensemble text embedding (CLIP's recipe),
    this rank encoding its share of the classes, every rank returning all of them."""
    rows = []
    mine = [classnames[i] for i in shard_indices(len(classnames))]
    for name in progress(mine, desc="zero-shot classes", unit="class"):
        prompts = [template.format(name) for template in templates]
        embeddings = torch.cat([module.encode_text(prompts[i:i + batch_size])
                                for i in range(0, len(prompts), batch_size)])
        rows.append(F.normalize(embeddings.float().mean(dim=0), dim=-1))
    if rows:
        local = torch.stack(rows)
    else:  # more ranks than classes: this rank joins the gather with no rows
        local = module.encode_text([templates[0].format(classnames[0])]).float()[:0]
    return gather_shards(local, len(classnames))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``top1``, ``top5`` and ``mean_per_class_recall`` in percent of ``logits [N, C]`` against ``labels``;
    rows labelled -1 (unreadable images) are left out. Equal scores rank the lower class first."""
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    if len(labels) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_per_class_recall": float("nan")}
    k = min(5, num_classes)
    # A stable descending sort ranks equal scores by class index: the same answer on every machine.
    best = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    right = best[:, 0] == labels
    per_class_images = torch.bincount(labels, minlength=num_classes).float()
    per_class_right = torch.bincount(labels[right], minlength=num_classes).float()
    present = per_class_images > 0
    return {
        "top1": 100.0 * right.float().mean().item(),
        "top5": 100.0 * (best == labels[:, None]).any(dim=-1).float().mean().item(),
        "mean_per_class_recall": 100.0 * (per_class_right[present] / per_class_images[present]).mean().item(),
    }


@register_evaluator("zeroshot")
class ZeroShotEvaluator(Evaluator):
    """Zero-shot classification of the images of ``root`` (``ROOT/<class>/<images>``) or of a ``datasets`` dataset.

    Args:
        root: the image folder (or give dataset).
        dataset: a ``datasets`` dataset with an image and an integer label column: a saved folder,
            Parquet/Arrow files, an imagefolder, or a hub id.
        split: the dataset's split.
        image_column: the dataset's image column.
        label_column: the dataset's label column (its ClassLabel names are the class names, unless
            classnames is given).
        classnames: a shipped list (cifar10, cifar100, imagenet1k) or a file with one name per line in
            the sorted order of the folders (null: CLIP's ImageNet names for WordNet-id folders, else
            the folder names).
        templates: a template set (openai_imagenet, cifar, simple...: ``vlm_lab/eval/templates.py``), a
            file with one template per line, or a list of templates with ``{}`` for the class name.
        max_per_class: the first N images of each class (null: all).
        batch_size: images per batch.
        num_workers: image loader worker processes.
    """

    def __init__(self, root: str | None = None, dataset: str | None = None, split: str = "test",
                 image_column: str = "image", label_column: str = "label", classnames: str | None = None,
                 templates: str | list[str] = "openai_imagenet", max_per_class: int | None = None,
                 batch_size: int = 64, num_workers: int = 0) -> None:
        self.folder = read_labelled_images(root, dataset, split, image_column, label_column, classnames,
                                           max_per_class, where="zeroshot")
        self.templates = resolve_templates(templates)
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(self, module: Any) -> dict[str, float]:
        classes = self.folder.classnames
        classifier = class_embeddings(module, classes, self.templates).to(module.device)
        features, labels = image_features(module, self.folder, self.batch_size, self.num_workers,
                                          desc="zero-shot images")
        logits = features.to(module.device) @ classifier.T
        metrics = classification_metrics(logits.cpu(), labels, len(classes))
        skipped = int((labels < 0).sum())
        return {**metrics, "images": float(len(labels) - skipped), "classes": float(len(classes)),
                "skipped": float(skipped)}

    def chance(self) -> dict[str, float]:
        classes = len(self.folder.classnames)
        return {"top1": 100.0 / classes, "top5": 100.0 * min(5, classes) / classes,
                "mean_per_class_recall": 100.0 / classes}
