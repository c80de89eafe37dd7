"""Zero-shot classification on an image folder, as CLIP evaluates it.

An image folder is ``ROOT/<class>/<image files>``. Each class gets a text embedding: every prompt
template filled with its name, encoded, L2-normalised, averaged and normalised again (CLIP's prompt
ensemble). An image is classified by the class embedding closest to its own; top-1 and top-5
accuracy are reported in percent.

Settings: the ``zeroshot`` config section (``ZeroShotSettings``, declared with every other section in
``vlm_lab/schema.py``; ``vlm-lab config-reference zeroshot`` lists its keys). ``root: null`` turns it off.

During fit the results are logged as ``val/zeroshot_top1`` and ``val/zeroshot_top5`` (and land in
``metrics.json``); ``vlm-lab zeroshot`` reports ``zeroshot/top1`` and ``zeroshot/top5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlm_lab.data.transforms import build_transform, decode_size, open_image
from vlm_lab.errors import ConfigError
from vlm_lab.eval.templates import resolve_templates
from vlm_lab.schema import ZeroShotSettings
from vlm_lab.progress import progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------------
# The image folder


@dataclass(frozen=True)
class ImageFolder:
    """Class names and ``(image path, class index)`` samples of a ``<class>/<images>`` folder."""

    classnames: list[str]
    samples: list[tuple[Path, int]]


def read_image_folder(root: str | Path, classnames: str | Path | None = None,
                      max_per_class: int | None = None) -> ImageFolder:
    """Scan ``root``: class folders in sorted order, their images in file-name order."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"zeroshot.root: no image folder at {root}")
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if not folders:
        raise ConfigError(f"zeroshot.root: {root} has no class folders (expected {root}/<class>/<images>)")
    names = [folder.name.replace("_", " ") for folder in folders]
    if classnames is not None:
        names = _read_classnames(Path(classnames), folders)
    samples: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ConfigError(f"zeroshot.root: class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples += [(path, label) for path in images[:max_per_class]]
    return ImageFolder(names, samples)


def _read_classnames(path: Path, folders: list[Path]) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"zeroshot.classnames: no file at {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ConfigError(f"zeroshot.classnames: {path} has {len(names)} names for {len(folders)} class folders; "
                          f"give one per line, in the sorted order of the folders ({folders[0].name}, ...)")
    return names


class _FolderImages(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[[Image.Image], torch.Tensor],
                 min_size: tuple[int, int]) -> None:
        self.samples, self.transform, self.min_size = samples, transform, min_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(open_image(path, self.min_size)), label


# --------------------------------------------------------------------------------------------------
# Classifying


@torch.no_grad()
def class_embeddings(module: Any, classnames: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> torch.Tensor:
    """``[classes, embed_dim]``: each class's prompt-ensemble text embedding (CLIP's recipe)."""
    rows = []
    for name in progress(classnames, desc="zero-shot classes", unit="class"):
        prompts = [template.format(name) for template in templates]
        embeddings = torch.cat([module.encode_text(prompts[i:i + batch_size])
                                for i in range(0, len(prompts), batch_size)])
        rows.append(F.normalize(embeddings.float().mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(module: Any, settings: ZeroShotSettings) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``module`` on ``settings.root``.

    ``module`` is a ``VisionLanguageModule`` (anything with ``encode_image``, ``encode_text`` and
    ``image_config``). Returns ``{"top1", "top5", "images", "classes"}``.
    """
    if settings.root is None:
        raise ConfigError("zeroshot.root is not set; give an image folder, e.g. zeroshot.root=../shared/data/cifar10-test")
    folder = read_image_folder(settings.root, settings.classnames, settings.max_per_class)
    was_training = module.training
    module.eval()
    try:
        classifier = class_embeddings(module, folder.classnames, resolve_templates(settings.templates))
        transform = build_transform(module.image_config, augment=False)
        loader = DataLoader(_FolderImages(folder.samples, transform, decode_size(module.image_config)),
                            batch_size=settings.batch_size, num_workers=settings.num_workers)
        k = min(5, len(folder.classnames))
        top1 = top5 = 0
        for pixels, labels in progress(loader, desc="zero-shot images", unit="batch"):
            logits = module.encode_image(pixels.to(module.device)).float() @ classifier.T.to(module.device)
            best = logits.topk(k, dim=-1).indices.cpu()
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(dim=-1).sum())
    finally:
        module.train(was_training)
    n = len(folder.samples)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": float(n),
            "classes": float(len(folder.classnames))}


class ZeroShotCallback(Callback):
    """Runs zero-shot classification after validation every ``every_n_epochs`` epochs of a fit.

    The process of global rank 0 evaluates the whole folder and logs ``val/zeroshot_top1`` and
    ``val/zeroshot_top5``; the others skip it.
    """

    def __init__(self, settings: ZeroShotSettings) -> None:
        self.settings = settings

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.settings.every_n_epochs
        if trainer.sanity_checking or every <= 0 or (trainer.current_epoch + 1) % every:
            return
        if not trainer.is_global_zero:
            return
        metrics = zero_shot_accuracy(pl_module, self.settings)
        pl_module.log("val/zeroshot_top1", metrics["top1"], rank_zero_only=True)
        pl_module.log("val/zeroshot_top5", metrics["top5"], rank_zero_only=True)


def format_zeroshot_table(metrics: Mapping[str, float]) -> str:
    """A short text table of ``zeroshot/top1`` and ``zeroshot/top5`` beside chance."""
    classes = metrics.get("zeroshot/classes", float("nan"))
    rows = [f"{'metric':<16}{'value':>9}{'chance':>9}"]
    for k in (1, 5):
        key = f"zeroshot/top{k}"
        if key in metrics:
            rows.append(f"{key:<16}{metrics[key]:>8.2f}%{100.0 * min(k, classes) / classes:>8.2f}%")
    rule = "-" * len(rows[0])
    where = f"{int(metrics.get('zeroshot/images', 0))} images, {int(classes)} classes"
    return "\n".join([where, rule, rows[0], rule, *rows[1:], rule])
