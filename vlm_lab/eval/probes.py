"""Classifiers trained on frozen image features: the ``linear_probe`` and ``fewshot`` evaluators.

Both read a train and a test image folder (``ROOT/<class>/<images>``, the same class folders; or two
splits of a ``datasets`` dataset), encode
them once with the module's ``encode_image`` (L2-normalised features, each rank its share, gathered
back in order: ``vlm_lab/eval/image_folder.py``) and fit a classifier on the train features. The
classifier is fitted identically on every rank from the gathered features, so all ranks report the
same figures. Unreadable images are counted skips (``skipped``).

* ``linear_probe``: CLIP_benchmark's linear probe (``clip_benchmark.metrics.linear_probe``), step
  for step: a ``Linear`` layer trained with AdamW, cross-entropy and a cosine schedule; its weight
  decay chosen on a held-out part of the train images (``val_proportion``) by CLIP_benchmark's
  search over ``logspace(-6, 2, 97)`` (7 coarse points, then halving steps around the best), then
  trained on train + held-out with that decay and scored on test: ``top1``, ``top5``,
  ``mean_per_class_recall`` and ``weight_decay``. The random draws (initialisation, batch order)
  happen in a forked RNG, so the global one is left as it was.
* ``fewshot``: big_vision's closed-form few-shot classifier (``big_vision/evaluators/fewshot.py``):
  for each seed, ``shots`` train images per class drawn at random, features whitened, a bias feature
  of 100 appended, targets one-hot in {-1, 1}, L2-regularised least squares solved in closed form
  (through the eigendecomposition of the smaller Gram matrix), test accuracy of the argmax.
  Reported per shot count: ``<k>shot`` (mean over seeds, percent) and ``<k>shot_std`` (their spread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from vlm_lab.errors import ConfigError
from vlm_lab.eval.image_folder import ImageFolder, image_features, read_labelled_images
from vlm_lab.eval.suite import Evaluator
from vlm_lab.eval.zeroshot import classification_metrics
from vlm_lab.registry import register_evaluator

# big_vision's constant bias feature: large, so its weight is almost unregularised.
BIAS_CONSTANT = 100.0


@dataclass(frozen=True)
class LabelledData:
    """Where a probe's train and test images are: two image folders, or two splits of a ``datasets``
    dataset (``image_column``, integer ``label_column``)."""

    root: str | None = None
    test_root: str | None = None
    dataset: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"

    def read(self, max_per_class: int | None, kind: str) -> tuple[ImageFolder, ImageFolder]:
        if self.dataset is None and (self.root is None or self.test_root is None):
            raise ConfigError(f"{kind}: give root and test_root (two image folders with the same classes) "
                              f"or dataset (with train_split and test_split)")
        train = read_labelled_images(self.root, self.dataset, self.train_split, self.image_column, self.label_column,
                                     None, max_per_class, where=kind)
        test = read_labelled_images(self.test_root, self.dataset, self.test_split, self.image_column,
                                    self.label_column, None, None, where=f"{kind}.test")
        if train.classnames != test.classnames:
            raise ConfigError(f"{kind}: the classes of the train ({len(train.classnames)}) and test "
                              f"({len(test.classnames)}) images differ; both need the same classes")
        return train, test


def readable_features(module: Any, train: ImageFolder, test: ImageFolder, batch_size: int, num_workers: int,
                      what: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], int]:
    """``((train features, labels), (test features, labels), skipped)``: the unreadable images left out
    and counted."""
    pairs, skipped = [], 0
    for images, split in ((train, "train"), (test, "test")):
        features, labels = image_features(module, images, batch_size, num_workers, desc=f"{what} {split} images")
        readable = labels >= 0
        skipped += int((~readable).sum())
        pairs.append((features[readable], labels[readable]))
    return pairs[0], pairs[1], skipped


# --------------------------------------------------------------------------------------------------
# Linear probe (CLIP_benchmark)


def weight_decay_grid() -> list[float]:
    """CLIP_benchmark's 97 candidate weight decays, ``logspace(-6, 2, 97)``."""
    return np.logspace(-6, 2, num=97).tolist()


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                       lr: float, epochs: int, batch_size: int, seed: int) -> torch.nn.Linear:
    """A ``Linear`` classifier trained as CLIP_benchmark's ``linear_probe.train`` trains it (AdamW,
    cross-entropy, cosine learning rate per step without warm-up, shuffled batches); the draws are
    seeded with ``seed`` in a forked RNG."""
    # enable_grad: evaluators run under no_grad (run_evaluators), the probe itself must learn.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = torch.nn.Linear(features.shape[1], num_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        loader = DataLoader(TensorDataset(features, labels), batch_size=batch_size, shuffle=True)
        steps = epochs * len(loader)
        for epoch in range(epochs):
            for i, (x, y) in enumerate(loader):
                step = i + epoch * len(loader)
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * step / steps)) * lr
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
    return model


def _top1(model: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(features).argmax(dim=1) == labels).float().mean().item()


def choose_weight_decay(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                        num_classes: int, **training: Any) -> float:
    """CLIP_benchmark's search: the best of 7 evenly spaced decays, then around the best at steps of 8,
    4, 2 and 1 grid points; the first of equally good candidates wins. As in its ``find_peak``, a round
    where no candidate beats 0% accuracy returns the grid's first decay."""
    grid = weight_decay_grid()

    def peak(indices: list[int]) -> int:
        best, best_accuracy = 0, 0.0
        for index in indices:
            accuracy = _top1(train_linear_probe(*train, num_classes, grid[index], **training), *val)
            if accuracy > best_accuracy:
                best, best_accuracy = index, accuracy
        return best

    index = peak([i for i, value in enumerate(grid) if value in np.logspace(-6, 2, num=7).tolist()])
    step = 8
    while step > 0:
        index = peak([max(index - step, 0), index, min(index + step, len(grid) - 1)])
        step //= 2
    return grid[index]


@register_evaluator("linear_probe")
class LinearProbeEvaluator(Evaluator):
    """Logistic regression on frozen image features, CLIP_benchmark's way.

    Args:
        root: the train image folder (or give dataset).
        test_root: the test image folder (the same class folders).
        dataset: a ``datasets`` dataset with an image and an integer label column, instead of folders.
        train_split: its train split.
        test_split: its test split.
        image_column: its image column.
        label_column: its integer label column.
        val_proportion: the share of the train images held out to choose the weight decay.
        lr: AdamW's peak learning rate.
        epochs: passes over the train features per fit.
        batch_size: features per step of the probe (and images per encoding batch).
        seed: the held-out split, the initialisation and the batch order.
        max_per_class: the first N train images of each class (null: all).
        num_workers: image loader worker processes.
    """

    def __init__(self, root: str | None = None, test_root: str | None = None, dataset: str | None = None,
                 train_split: str = "train", test_split: str = "test", image_column: str = "image",
                 label_column: str = "label", val_proportion: float = 0.2, lr: float = 0.1, epochs: int = 10,
                 batch_size: int = 64, seed: int = 0, max_per_class: int | None = None, num_workers: int = 0) -> None:
        if not 0.0 < val_proportion < 1.0:
            raise ConfigError(f"linear_probe.val_proportion={val_proportion} should be between 0 and 1")
        data = LabelledData(root, test_root, dataset, train_split, test_split, image_column, label_column)
        self.train, self.test = data.read(max_per_class, "linear_probe")
        self.val_proportion, self.lr, self.epochs = val_proportion, lr, epochs
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def evaluate(self, module: Any) -> dict[str, float]:
        (train_x, train_y), (test_x, test_y), skipped = readable_features(
            module, self.train, self.test, self.batch_size, self.num_workers, "probe")
        num_classes = len(self.train.classnames)
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.seed))
        held_out = int(round(len(order) * self.val_proportion))
        fit, val = order[held_out:], order[:held_out]
        training = {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed}
        decay = choose_weight_decay((train_x[fit], train_y[fit]), (train_x[val], train_y[val]), num_classes, **training)
        # The final fit sees every train image, the held-out ones last (as CLIP_benchmark concatenates them).
        everything = torch.cat([fit, val])
        model = train_linear_probe(train_x[everything], train_y[everything], num_classes, decay, **training)
        with torch.no_grad():
            metrics = classification_metrics(model(test_x), test_y, num_classes)
        return {**metrics, "weight_decay": decay, "skipped": float(skipped)}

    def chance(self) -> dict[str, float]:
        classes = len(self.train.classnames)
        return {"top1": 100.0 / classes, "top5": 100.0 * min(5, classes) / classes}


# --------------------------------------------------------------------------------------------------
# Few-shot (big_vision)


def least_squares_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                           test_y: torch.Tensor, num_classes: int, l2_reg: float) -> float:
    """Test accuracy (percent) of big_vision's closed-form L2-regularised least-squares classifier,
    in float64."""
    x, test = train_x.double(), test_x.double()
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, unbiased=False, keepdim=True) + 1e-5
    x = F.pad((x - mean) / std, (0, 1), value=BIAS_CONSTANT)
    test = F.pad((test - mean) / std, (0, 1), value=BIAS_CONSTANT)
    y = 2.0 * F.one_hot(train_y, num_classes).double() - 1.0
    # (x^T x + l2 I)^-1 x^T y, or x^T (x x^T + l2 I)^-1 y when there are fewer points than dimensions:
    # the eigendecomposition of the smaller Gram matrix gives either.
    if x.shape[0] >= x.shape[1]:
        eigs, q = torch.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ y), q
    else:
        eigs, q = torch.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ y, x.T @ q
    weights = (lhs / (eigs + l2_reg)[None, :]) @ rhs
    return 100.0 * ((test @ weights).argmax(dim=1) == test_y).double().mean().item()


def fewshot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """big_vision's draw: per class a permutation of its images (``default_rng(seed)``), the first ``shots``."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.where(labels == c)[0]) for c in range(num_classes)]
    return np.concatenate([indices[:shots] for indices in per_class])


@register_evaluator("fewshot")
class FewShotEvaluator(Evaluator):
    """big_vision's few-shot linear classifier on frozen image features.

    Args:
        root: the train image folder (the shots are drawn from it; or give dataset).
        test_root: the test image folder (the same class folders).
        dataset: a ``datasets`` dataset with an image and an integer label column, instead of folders.
        train_split: its train split.
        test_split: its test split.
        image_column: its image column.
        label_column: its integer label column.
        shots: train images per class, one result per count.
        seeds: draws per shot count (seeds 0..N-1); the mean and the standard deviation are reported.
        l2_reg: the ridge penalty (big_vision's configs use 2**10).
        batch_size: images per encoding batch.
        num_workers: image loader worker processes.
    """

    def __init__(self, root: str | None = None, test_root: str | None = None, dataset: str | None = None,
                 train_split: str = "train", test_split: str = "test", image_column: str = "image",
                 label_column: str = "label", shots: list[int] = [1, 5, 10, 25], seeds: int = 3,  # noqa: B006
                 l2_reg: float = 1024.0, batch_size: int = 64, num_workers: int = 0) -> None:
        if not shots or any(k < 1 for k in shots) or seeds < 1 or l2_reg <= 0:
            raise ConfigError(f"fewshot: need shots >= 1 (got {shots}), seeds >= 1 (got {seeds}), l2_reg > 0 (got {l2_reg})")
        data = LabelledData(root, test_root, dataset, train_split, test_split, image_column, label_column)
        self.train, self.test = data.read(None, "fewshot")
        self.shots, self.seeds, self.l2_reg = list(shots), seeds, l2_reg
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(self, module: Any) -> dict[str, float]:
        (train_x, train_y), (test_x, test_y), skipped = readable_features(
            module, self.train, self.test, self.batch_size, self.num_workers, "few-shot")
        num_classes = len(self.train.classnames)
        labels = train_y.numpy()
        metrics: dict[str, float] = {"skipped": float(skipped)}
        for shots in self.shots:
            accuracies = []
            for seed in range(self.seeds):
                chosen = torch.from_numpy(fewshot_indices(labels, num_classes, shots, seed))
                accuracies.append(least_squares_accuracy(train_x[chosen], train_y[chosen], test_x, test_y,
                                                         num_classes, self.l2_reg))
            metrics[f"{shots}shot"] = float(np.mean(accuracies))
            metrics[f"{shots}shot_std"] = float(np.std(accuracies))
        return metrics

    def chance(self) -> dict[str, float]:
        return {f"{shots}shot": 100.0 / len(self.train.classnames) for shots in self.shots}
