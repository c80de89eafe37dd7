"""Loggers by name (the ``loggers:`` list of a config) and what every run sends them.

::

    loggers:
      - {name: csv}                                # RUN_DIR/logs/version_N/metrics.csv (the default)
      - {name: tensorboard}                        # RUN_DIR/tensorboard/version_N/events.out.tfevents.*
      - {name: wandb, project: my-clip, mode: offline}   # RUN_DIR/wandb/
      - {name: mlflow}                             # RUN_DIR/mlruns (a local file store)

Each name is registered with ``vlm_lab.register_logger``: a function that takes the run directory
and the config's name (``run_dir``, ``config_name``, supplied by vlm-lab) and its own arguments, and
returns a Lightning ``Logger``. Arguments are checked against the signature before anything runs.
Every logger receives the resolved config as hyperparameters (:class:`ConfigHyperparameters`).

``trainer.logger`` is Lightning's own switch and stays one: ``false`` turns every logger off
(``loggers`` is then ignored), ``true`` (Lightning's default) uses ``loggers``. ``loggers: []``
also runs without any logger.

The tracking services' packages are optional (``pip install vlm-lab[tracking]``); a logger whose
package is missing fails when the run starts, with the ``pip install`` line to run.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vlm_lab import registry
from vlm_lab.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# The built-in loggers


def csv_logger(run_dir: str, config_name: str, folder: str = "logs", flush_logs_every_n_steps: int = 100) -> Logger:
    """CSV files: ``RUN_DIR/<folder>/version_N/metrics.csv`` (one version per launch, so a resumed run
    adds one) and ``hparams.yaml`` (the resolved config). ``vlm-lab sweep-report`` reads ``logs/``."""
    return CSVLogger(run_dir, name=folder, flush_logs_every_n_steps=flush_logs_every_n_steps)


def tensorboard_logger(run_dir: str, config_name: str, folder: str = "tensorboard", log_graph: bool = False) -> Logger:
    """TensorBoard event files in ``RUN_DIR/<folder>/version_N/``: ``tensorboard --logdir runs/``."""
    _require("tensorboard", "tensorboard")
    # default_hp_metric=False: no placeholder "hp_metric" curve of -1 in every run.
    return TensorBoardLogger(run_dir, name=folder, log_graph=log_graph, default_hp_metric=False)


def wandb_logger(run_dir: str, config_name: str, project: str = "vlm-lab", run_name: str | None = None,
                 entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 mode: Literal["online", "offline", "disabled"] | None = None, run_id: str | None = None,
                 log_model: bool | Literal["all"] = False) -> Logger:
    """Weights & Biases, files in ``RUN_DIR/wandb/``.

    ``mode: offline`` writes the run locally only (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads
    it later); null leaves the choice to W&B (``WANDB_MODE``, else online, which needs ``wandb login``).
    ``run_name`` defaults to ``<config name>/<run directory name>``; ``run_id`` continues an existing run.
    ``log_model`` uploads the checkpoints as artifacts (``all``: every one, as they are written).
    """
    _require("wandb", "wandb")
    return WandbLogger(save_dir=run_dir, project=project, name=run_name or _run_label(run_dir, config_name),
                       id=run_id, log_model=log_model, entity=entity, group=group, tags=tags, mode=mode)


def mlflow_logger(run_dir: str, config_name: str, experiment: str | None = None, run_name: str | None = None,
                  tracking_uri: str | None = None, tags: dict[str, str] | None = None,
                  log_model: bool = False) -> Logger:
    """MLflow. ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else a local file store in
    ``RUN_DIR/mlruns`` (``mlflow ui --backend-store-uri RUN_DIR/mlruns``); give one folder or a server
    to see several runs together. ``experiment`` defaults to the config's name, ``run_name`` to
    ``<config name>/<run directory name>``.

    MLflow 3 keeps its file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``: for a file store this logger sets that variable for the process
    (unless you set it yourself). A database store (``sqlite:///mlflow.db``) needs the full ``mlflow``
    package (SQLAlchemy and Alembic), which the ``tracking`` extra does not install.
    """
    _require("mlflow", "mlflow-skinny")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / "mlruns").as_uri()
    if urlparse(uri).scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return _QuietMLFlowLogger(experiment_name=experiment or config_name, run_name=run_name or _run_label(run_dir, config_name),
                        tracking_uri=uri, tags=tags, log_model=log_model)


class _QuietMLFlowLogger(MLFlowLogger):
    """MLflow's metric names allow no ``@``: Lightning's logger drops it with a warning per metric (a dozen
    lines at the first validation); this one drops it quietly, as documented (``val/i2t_R@1`` shows as
    ``val/i2t_R1`` in MLflow)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({mlflow_metric_name(k): v for k, v in metrics.items()}, step)


def mlflow_metric_name(name: str) -> str:
    """A metric's name in MLflow: the characters it refuses dropped, as Lightning's MLFlowLogger does."""
    return re.sub(r"[^a-zA-Z0-9_/. -]+", "", name)


registry.register_logger("csv", csv_logger)
registry.register_logger("tensorboard", tensorboard_logger)
registry.register_logger("wandb", wandb_logger)
registry.register_logger("mlflow", mlflow_logger)


def _run_label(run_dir: str, config_name: str) -> str:
    return f"{config_name}/{Path(run_dir).name}"


def _require(module: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"logger {module!r} needs the {package} package: pip install {package} "
                          f"(or pip install 'vlm-lab[tracking]')")


# --------------------------------------------------------------------------------------------------
# Building them


def build_loggers(specs: Sequence[Mapping[str, Any]], run_dir: str | Path, config_name: str) -> list[Logger]:
    """The loggers of a ``loggers:`` list, writing under ``run_dir``."""
    loggers = []
    for i, spec in enumerate(specs):
        logger = registry.build("logger", spec, run_dir=str(run_dir), config_name=config_name)
        if not isinstance(logger, Logger):
            raise ConfigError(f"loggers[{i}]: logger {spec['name']!r} built a {type(logger).__name__}, "
                              f"not a lightning.pytorch.loggers.Logger")
        loggers.append(logger)
    return loggers


class ConfigHyperparameters(Callback):
    """Sends the resolved config to every logger as hyperparameters when a fit, validation or test
    starts (nested sections; each logger flattens them its own way). It replaces Lightning's own
    logging of the module's arguments (``enable_autolog_hparams``), which sees only ``model`` and ``optim``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)  # loggers write on rank 0 only
            logger.save()


@contextmanager
def finishing_runs(trainer: L.Trainer) -> Iterator[None]:
    """Finish the runs that a tracking service keeps open after the trainer is done (W&B's).

    Otherwise the next fit in the same process (a notebook, a test) would log into the old run:
    Lightning's ``WandbLogger`` reuses a run that is still open.
    """
    try:
        yield
    except BaseException:
        _finish_wandb(trainer, exit_code=1)
        raise
    _finish_wandb(trainer, exit_code=0)


@rank_zero_only
def _finish_wandb(trainer: L.Trainer, exit_code: int) -> None:
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:  # the run the logger opened (or reused); none if it never logged
            wandb.run.finish(exit_code=exit_code)


# --------------------------------------------------------------------------------------------------
# A quiet console


LIGHTNING_CONSOLE_LOGGER = "lightning.pytorch.utilities.rank_zero"  # where Lightning's info lines come from


class _DropTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... litlogger", "... litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning_tips() -> None:
    """Switch off the "💡 Tip:" lines Lightning prints whenever a Trainer is made.

    Lightning 2.6 has no setting for them (Lightning-AI/pytorch-lightning#21294 asks for one). They
    go through Lightning's console logger, which its docs let users configure with Python's logging
    (the "Console logging" page); a filter on that logger drops these lines and keeps the others
    (devices, warnings). Calling this again changes nothing.
    """
    console = logging.getLogger(LIGHTNING_CONSOLE_LOGGER)
    if not any(isinstance(f, _DropTips) for f in console.filters):
        console.addFilter(_DropTips())
