"""The Python API: the same path the CLI takes, step by step, for notebooks and scripts.

    from vlm_lab import load_config, build_module, build_datamodule, fit
    cfg = load_config("experiments/quickstart.yaml", overrides=["trainer.max_epochs=1"])
    metrics = fit(cfg, run_dir="runs/try")

A run directory holds ``config.yaml`` (the resolved config), ``checkpoints/`` (``last.ckpt`` and
the per-epoch ones), ``logs/version_N/metrics.csv`` (the training log, one version per launch; other
loggers of ``loggers:`` write beside it: docs/how-to/tracking.md) and ``metrics.json`` (the latest evaluation
metrics, flat keys such as ``val/i2t_R@1``, read by sweeps and benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from vlm_lab import checkpoint_format, config, registry
from vlm_lab.callbacks import build_callbacks
from vlm_lab.config import to_yaml
from vlm_lab.data.collate import image_to_tensor
from vlm_lab.distillation import TeacherCache
from vlm_lab.distributed import (inherited_run_dir, launch_run_id, launched_process_group, launcher_layout,
                                 process_rank, share_run_dir)
from vlm_lab.embedding_cache import CacheSettings, LockedTowerCache
from vlm_lab.errors import ConfigError
from vlm_lab.eval.suite import EvaluationSuite, build_evaluators, run_evaluators
from vlm_lab.interop.pretrained import init_model_section, load_into_module
from vlm_lab.interop.teacher import load_teacher
from vlm_lab.module import VisionLanguageModule
from vlm_lab.preemption import AtomicCheckpointIO, Preemption, best_checkpoint, requeued_run, step_checkpoints
from vlm_lab.schema import CheckpointSettings, EvalSettings
from vlm_lab.seeding import EpochSeeding
from vlm_lab.tracking import ConfigHyperparameters, build_loggers, finishing_runs, quiet_lightning_tips
from vlm_lab.sharding import build_strategy

RUNS_DIR = Path("runs")


def load_config(*files: str | Path, overrides: Iterable[str] = (), allow_import_paths: bool = False) -> DictConfig:
    """The experiment config of ``files`` (merged left to right) and ``overrides``, checked.

    ``load_config("experiments/quickstart.yaml", overrides=["optim.lr=1e-3"])``. See
    ``vlm_lab.config.load_config``; here ``model.init_from`` also works: the pretrained checkpoint's
    architecture goes under the files.
    """
    return config.load_config(*files, overrides=overrides, allow_import_paths=allow_import_paths,
                              pretrained_model_section=init_model_section)


def build_module(cfg: DictConfig) -> VisionLanguageModule:
    """The LightningModule a config describes (``model`` and ``optim`` sections), with the pretrained
    weights of ``model.init_from`` loaded (towers, projections and logit scale) and the distillation
    teacher ``model.distill.teacher`` names attached."""
    module = VisionLanguageModule(model=_plain(cfg.model), optim=_plain(cfg.optim))
    if cfg.model.init_from:
        load_into_module(module, cfg.model.init_from)
    if module.distill.teacher is not None:
        module.set_teacher(load_teacher(module.distill.teacher))
    return module


def build_datamodule(cfg: DictConfig, module: VisionLanguageModule) -> L.LightningDataModule:
    """The data module of ``cfg.data``, fed with the module's tokenizer and image preprocessing."""
    return registry.build("datamodule", _plain(cfg.data), tokenizer=module.tokenizer,
                          image_config=module.image_config, max_length=module.max_length)


def build_trainer(cfg: DictConfig, run_dir: str | Path) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer``, logging and checkpointing into ``run_dir``."""
    run_dir = Path(run_dir)
    options = _plain(cfg.trainer)
    options.setdefault("default_root_dir", str(run_dir))
    layout = launcher_layout()
    if layout is not None:
        # Under torchrun or SLURM the launcher already fixed the process layout; Lightning insists that
        # devices and num_nodes repeat it, so the YAML need not (and the laptop YAML runs unchanged).
        options.setdefault("devices", layout[0])
        options.setdefault("num_nodes", layout[1])
    # Checkpoints are written to a sibling temporary file and renamed into place (vlm_lab/preemption.py).
    plugins = options.get("plugins") or []
    plugins = plugins if isinstance(plugins, list) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        options["plugins"] = [*plugins, AtomicCheckpointIO()]
    # trainer.strategy: fsdp2 (or {name: fsdp2, ...}) becomes a strategy object (vlm_lab/sharding.py).
    options["strategy"] = build_strategy(options)
    # trainer.logger is Lightning's switch: false turns every logger off; else the `loggers` list.
    loggers = build_loggers(_plain(cfg.get("loggers", [])), run_dir, cfg.name or "run") \
        if options.get("logger", True) is not False else []
    options["logger"] = loggers or False
    # Every logger gets the whole resolved config (ConfigHyperparameters), not only the module's arguments.
    options.setdefault("enable_autolog_hparams", False)
    quiet_lightning_tips()
    # Written at the end of every epoch (atomically); --resume continues from last.ckpt, always that
    # name: without a version counter a fresh fit in the same directory overwrites it, not last-v1.ckpt.
    checkpoints = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True,
                                  filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                  enable_version_counter=False)
    # Each epoch's random draws depend on (seed, epoch) only, so a resumed epoch repeats the lost one.
    callbacks: list[Callback] = [MetricsFile(run_dir / "metrics.json"), EpochSeeding(cfg.seed)]
    cache_settings = CacheSettings.from_config(_plain(cfg.get("embedding_cache")))
    if cfg.model.get("caption_weight", 0) > 0:  # CoCa's poolers read the image tokens: the cache keeps them too
        cache_settings = dataclasses.replace(cache_settings, tokens=True)
    if (_plain(cfg.model).get("distill") or {}).get("teacher") is not None:
        callbacks.append(TeacherCache(cache_settings))  # before LockedTowerCache: a teacher cache may enable it
    if cache_settings.enabled:
        callbacks.append(LockedTowerCache(cache_settings))  # acts only when the vision tower is fully locked
    eval_settings = EvalSettings.from_config(_plain(cfg.get("eval")))
    if eval_settings.evaluators and eval_settings.every_n_epochs > 0:  # built now: a missing folder fails before training
        callbacks.append(EvaluationSuite(build_evaluators(eval_settings), eval_settings.every_n_epochs))
    if options.get("enable_checkpointing", True):
        # Step checkpoints and preemption (vlm_lab/preemption.py): mid-epoch ones, which resume exactly.
        settings = CheckpointSettings.from_config(_plain(cfg.get("checkpoint")))
        callbacks += [checkpoints, *step_checkpoints(settings, run_dir / "checkpoints"),
                      *best_checkpoint(settings, run_dir / "checkpoints")]
        if settings.on_signal:
            callbacks.append(Preemption(run_dir / "checkpoints" / "last.ckpt"))
    if loggers:
        callbacks.append(ConfigHyperparameters(_plain(cfg)))
    # The config's callbacks (vlm_lab/callbacks.py): the default logging ones (lr, gradient norm, samples/s), the user's.
    callbacks += build_callbacks(_plain(cfg.get("callbacks", [])), _plain(cfg.get("default_callbacks", [])),
                                 logging=bool(loggers))
    return L.Trainer(callbacks=callbacks, **options)


def fit(cfg: DictConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict[str, float]:
    """Train as ``cfg`` says; return the final validation metrics (also in ``run_dir/metrics.json``).

    ``resume=True`` continues from ``run_dir/checkpoints/last.ckpt`` (with no ``run_dir``: the most
    recent run of the same name).
    """
    # A requeued SLURM job (vlm_lab/preemption.py) resumes by itself, in the run directory it had.
    resume = resume or (requeued_run() and _run_dir(cfg, run_dir, False).joinpath("checkpoints", "last.ckpt").exists())
    run_dir = _run_dir(cfg, run_dir, resume)
    ckpt_path = None
    if resume:
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.exists():  # a file, or a directory with checkpoint: sharded (vlm_lab/sharding.py)
            raise ConfigError(f"--resume: no checkpoint to resume from at {last}")
        ckpt_path = str(last)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    trainer = build_trainer(cfg, run_dir)
    _save_config(cfg, run_dir)
    with share_run_dir(run_dir), finishing_runs(trainer), warnings.catch_warnings():
        # Lightning warns on a mid-epoch resume unless the loader object keeps a state; vlm-lab's data
        # modules keep the position in theirs and skip exactly the batches trained (data/epochs.py).
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return read_metrics(run_dir)


def validate(cfg: DictConfig, ckpt_path: str | None = None, run_dir: str | Path | None = None) -> dict[str, float]:
    """Validation metrics of a checkpoint (or of a fresh module when ``ckpt_path`` is None)."""
    return _evaluate("validate", cfg, ckpt_path, run_dir)


def test(cfg: DictConfig, ckpt_path: str | None = None, run_dir: str | Path | None = None) -> dict[str, float]:
    """Test metrics of a checkpoint, on the data module's test split."""
    return _evaluate("test", cfg, ckpt_path, run_dir)


def _evaluate(stage: str, cfg: DictConfig, ckpt_path: str | None, run_dir: str | Path | None) -> dict[str, float]:
    run_dir = _run_dir(cfg, run_dir, resume=False)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = _module_to_evaluate(cfg, ckpt_path)
    datamodule = build_datamodule(cfg, module)
    trainer = build_trainer(cfg, run_dir)
    _save_config(cfg, run_dir)
    with share_run_dir(run_dir), finishing_runs(trainer):
        getattr(trainer, stage)(module, datamodule=datamodule)
    return read_metrics(run_dir)


def evaluate(cfg: DictConfig, ckpt_path: str | None = None, run_dir: str | Path | None = None) -> dict[str, float]:
    """Run the ``eval`` section's evaluators on a checkpoint (or a fresh module): what ``vlm-lab eval`` does.

    Returns ``eval/<name>/<metric>`` (and ``.../chance_<metric>``), also merged into ``run_dir/metrics.json``.
    Under a multi-process launch (torchrun) with a process group set up, every process must call it.
    """
    settings = EvalSettings.from_config(_plain(cfg.get("eval")))
    if not settings.evaluators:
        raise ConfigError("eval.evaluators is empty; list evaluators by name, e.g. "
                          "eval.evaluators.cifar10={name: zeroshot, root: ../shared/data/cifar10-test}")
    evaluators = build_evaluators(settings)
    run_dir = _run_dir(cfg, run_dir, resume=False)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = _module_to_evaluate(cfg, ckpt_path)
    # One GPU per process, as torchrun numbers them; the processes of a torchrun launch split the data.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    with launched_process_group(device):
        metrics = run_evaluators(module.to(device), evaluators)
    if process_rank() == 0:
        _save_config(cfg, run_dir)
        (run_dir / "metrics.json").write_text(json.dumps({**read_metrics(run_dir), **metrics}, indent=2,
                                                         sort_keys=True) + "\n")
    return metrics


def upgrade_checkpoint(old: str | Path, new: str | Path) -> Path:
    """Write ``new``: checkpoint ``old``, written before checkpoints were self-contained, plus what makes it
    so (the model as built and the tokenizer's files, ``vlm_lab/checkpoint_format.py``).

    Run it where the files ``old``'s config names exist (pretrained weights, ``init_from`` folder,
    captions file): the model is rebuilt from them once, and the saved weights must load into it.
    Everything else (optimizer, loops, callbacks) is kept, so training can resume from ``new``.
    """
    old, new = Path(old), Path(new)
    if new.exists():
        raise ConfigError(f"checkpoint upgrade: {new} exists; give a new file name")
    checkpoint = checkpoint_format.read_checkpoint(old)
    if checkpoint_format.portable_model(checkpoint, old) is not None:
        raise ConfigError(f"checkpoint upgrade: {old} is already self-contained (format {checkpoint_format.FORMAT})")
    hparams = checkpoint["hyper_parameters"]
    try:
        module = VisionLanguageModule(model=hparams["model"], optim=hparams["optim"])
    except ConfigError as error:
        raise ConfigError(f"checkpoint upgrade: rebuilding {old} from its config needs the files it names, and "
                          f"that failed: {error}. Run the upgrade where they exist") from None
    problems = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        raise ConfigError(f"checkpoint upgrade: the weights in {old} do not fit the model its config builds today "
                          f"(missing {len(problems.missing_keys)}, unexpected {len(problems.unexpected_keys)} keys); "
                          f"have the files it names changed?")
    checkpoint[checkpoint_format.KEY] = module.portable_model.entry()
    partial = new.with_name(new.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(new)  # atomic: a crash leaves no half-written checkpoint under the final name
    return new


def _module_to_evaluate(cfg: DictConfig, ckpt_path: str | None) -> VisionLanguageModule:
    if ckpt_path is None:
        return build_module(cfg)
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {ckpt_path}")
    module = VisionLanguageModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    # Decoding is an evaluation choice, not part of the weights: the config evaluated with sets it
    # (e.g. `vlm-lab test ... ckpt_path=CKPT model.generation.num_beams=3`).
    module.hparams.model["generation"] = _plain(cfg.model.generation)
    return module


def caption_images(ckpt_path: str | Path, image_paths: Sequence[str | Path], changes: Mapping[str, Any] | None = None,
                   batch_size: int = 16) -> list[str]:
    """One caption per image file, from a CoCa checkpoint (what ``vlm-lab caption`` prints).

    Decoding follows the checkpoint's ``model.generation`` with ``changes`` on top (``{"num_beams": 3}``);
    a misspelt setting fails at once, naming the closest.
    """
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"--ckpt: no checkpoint file at {ckpt_path}")
    # eval(): a module comes back from a checkpoint in train mode, where a locked tower would still
    # normalise with the batch's statistics (captions would depend on which images share a batch).
    module = VisionLanguageModule.load_from_checkpoint(str(ckpt_path), map_location="cpu", weights_only=True).eval()
    if module.caption_head is None:
        raise ConfigError(f"--ckpt: {ckpt_path} has no caption head (it was trained with model.caption_weight=0)")
    settings = module.generation_settings.replace(**dict(changes or {}))
    pixels = []
    for path in image_paths:
        try:
            with Image.open(path) as image:
                pixels.append(image_to_tensor(image, module.image_config))
        except (FileNotFoundError, UnidentifiedImageError) as e:
            raise ConfigError(f"cannot read image {path}: {e}") from None
    captions: list[str] = []
    for start in range(0, len(pixels), batch_size):
        captions += module.generate(torch.stack(pixels[start:start + batch_size]), settings)
    return captions


class MetricsFile(Callback):
    """Keeps ``metrics.json`` up to date with the latest evaluation metrics (flat keys)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, ("val/", "eval/"))  # eval/: the evaluation suite, run after validation

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, ("test/",))

    def _write(self, trainer: L.Trainer, prefix: tuple[str, ...]) -> None:
        if not trainer.is_global_zero:
            return
        metrics = read_metrics(self.path.parent)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)})
        metrics.update({"epoch": trainer.current_epoch, "step": trainer.global_step})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def read_metrics(run_dir: str | Path) -> dict[str, float]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def format_retrieval_table(metrics: dict[str, float], stage: str = "val") -> str:
    """A text table of R@K beside the chance level, from a metrics dict."""
    rows = [f"{'metric':<16}{'value':>9}{'chance':>9}"]
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            key = f"{stage}/{direction}_R@{k}"
            if key in metrics:
                chance = metrics.get(f"{stage}/chance_{direction}_R@{k}", float("nan"))
                rows.append(f"{key:<16}{metrics[key]:>8.2f}%{chance:>8.2f}%")
    for key in (f"{stage}/bleu4", f"{stage}/cider"):  # a CoCa model's captions (vlm_lab/eval/caption_metrics.py)
        if key in metrics:
            rows.append(f"{key:<16}{metrics[key]:>9.4f}{'':>9}")
    if len(rows) == 1:
        return f"(no {stage} retrieval metrics were computed)"
    rule = "-" * len(rows[0])
    return "\n".join([rule, rows[0], rule, *rows[1:], rule])


def _run_dir(cfg: DictConfig, run_dir: str | Path | None, resume: bool) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    # Every process of a multi-process launch runs this; they must all land in the same directory.
    inherited = inherited_run_dir()
    if inherited is not None:
        return inherited
    base = RUNS_DIR / (cfg.name or "run")
    if resume:
        # Newest by checkpoint time, not by name: launcher-named runs (slurm-123) do not sort by date.
        previous = sorted((p for p in base.glob("*") if (p / "checkpoints" / "last.ckpt").exists()),
                          key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime)
        if not previous:
            raise ConfigError(f"--resume: no earlier run with a checkpoint under {base}/; pass --run-dir")
        return previous[-1]
    return base / (launch_run_id() or time.strftime("%Y%m%d-%H%M%S"))


def _save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
