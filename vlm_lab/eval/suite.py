"""The evaluation suite: the evaluators a config lists, run during fit and by ``vlm-lab eval``.

The ``eval`` config section (``EvalSettings`` in ``vlm_lab/schema.py``) names each evaluator and gives
its registry spec::

    eval:
      every_n_epochs: 1
      evaluators:
        cifar10: {name: zeroshot, root: ../shared/data/cifar10-test, templates: cifar, classnames: cifar10}
        cifar10_probe: {name: linear_probe, root: ..., test_root: ...}

An evaluator is a class registered with ``vlm_lab.registry.register_evaluator``; its constructor
takes its data and settings (checked against its signature like any spec, and it should fail at
once, with one line, on a missing folder), and :meth:`Evaluator.evaluate` takes a module and returns
flat metrics. It uses only the module's ``encode_image`` / ``encode_text`` / ``generate`` (and
``image_config``, ``tokenizer``, ``device``). Every rank runs every evaluator: each encodes its
share of the data (``vlm_lab.distributed.shard_indices``) and the results are combined with
fixed-size all-gathers or sums, so all ranks return the same figures, equal to one process's.

The figures are named ``eval/<name>/<metric>``: logged during fit (and so in ``metrics.json``),
and written to ``metrics.json`` and printed as one table by ``vlm-lab eval``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vlm_lab import registry
from vlm_lab.errors import ConfigError
from vlm_lab.schema import EvalSettings

PREFIX = "eval"


class Evaluator:
    """Base of the evaluators: ``evaluate(module)`` returns ``{metric: value}`` (percentages for
    accuracies and recalls); the same on every rank. ``chance`` (optional) gives each metric's
    chance level for the table."""

    def evaluate(self, module: Any) -> dict[str, float]:
        raise NotImplementedError

    def chance(self) -> dict[str, float]:
        return {}


def build_evaluators(settings: EvalSettings) -> dict[str, Evaluator]:
    """The evaluators of an ``eval`` section, by name, built (and their data checked) now."""
    built = {}
    for name, spec in settings.evaluators.items():
        try:
            built[name] = registry.build("evaluator", spec)
        except ConfigError as error:
            raise ConfigError(f"eval.evaluators.{name}: {error}") from None
    return built


@torch.no_grad()
def run_evaluators(module: Any, evaluators: Mapping[str, Evaluator]) -> dict[str, float]:
    """Every evaluator's metrics as ``eval/<name>/<metric>``, with the module in eval mode (restored
    afterwards). Every rank of a distributed run must call it (the evaluators gather)."""
    was_training = module.training
    module.eval()
    try:
        metrics: dict[str, float] = {}
        for name, evaluator in evaluators.items():
            metrics.update({f"{PREFIX}/{name}/{key}": float(value) for key, value in evaluator.evaluate(module).items()})
            metrics.update({f"{PREFIX}/{name}/chance_{key}": float(value) for key, value in evaluator.chance().items()})
        return metrics
    finally:
        module.train(was_training)


class EvaluationSuite(Callback):
    """Runs the ``eval`` section's evaluators after validation every ``every_n_epochs`` epochs of a fit,
    on every rank, and logs ``eval/<name>/<metric>``."""

    def __init__(self, evaluators: Mapping[str, Evaluator], every_n_epochs: int = 1) -> None:
        self.evaluators, self.every_n_epochs = dict(evaluators), every_n_epochs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.every_n_epochs
        if trainer.sanity_checking or every <= 0 or (trainer.current_epoch + 1) % every:
            return
        for key, value in run_evaluators(pl_module, self.evaluators).items():
            # The evaluators combined every rank's share, so each rank holds the same value already.
            pl_module.log(key, value, sync_dist=False)


def format_eval_table(metrics: Mapping[str, float]) -> str:
    """One text table of every ``eval/<name>/<metric>`` beside its chance level (where known)."""
    pattern = re.compile(rf"^{PREFIX}/([^/]+)/(?!chance_)(.+)$")
    rows = [(m.group(1), m.group(2), value) for key, value in metrics.items() if (m := pattern.match(key))]
    if not rows:
        return "(no evaluation metrics were computed)"
    width = max(len(f"{name}/{metric}") for name, metric, _ in rows) + 2
    header = f"{'metric':<{width}}{'value':>10}{'chance':>10}"
    lines = []
    for name, metric, value in rows:
        chance = metrics.get(f"{PREFIX}/{name}/chance_{metric}", math.nan)
        chance_text = "" if math.isnan(chance) else f"{chance:10.2f}"
        lines.append(f"{name + '/' + metric:<{width}}{value:10.2f}{chance_text}")
    rule = "-" * len(header)
    return "\n".join([rule, header, rule, *lines, rule])
