"""Callbacks by name: the ``callbacks:`` and ``default_callbacks:`` lists of a config.

::

    callbacks:                        # added to the run, in this order
      - {name: ema, decay: 0.999}
      - {name: early_stopping, monitor: val/i2t_R@1, mode: max, patience: 3}
    default_callbacks: [lr_monitor, grad_norm, throughput]   # on unless removed from this list

Each name is registered with ``vlm_lab.register_callback`` (a Lightning ``Callback`` class or a
function returning one) and its arguments are checked against the signature before anything is
built, like towers and losses. The built-in ones:

==================  =====================================================================================
``lr_monitor``      Lightning's ``LearningRateMonitor``: ``train/lr/<group>`` for every parameter group
``grad_norm``       :class:`GradientNorm`: ``train/grad_norm/total`` and one per part (``.../vision``...)
``throughput``      :class:`Throughput`: ``train/samples_per_sec``; FLOP/s and MFU where FLOPs are known
``ema``             :class:`EMA`: a moving average of the weights, validated and saved as the checkpoint
``early_stopping``  Lightning's ``EarlyStopping`` on a logged metric
``optuna_pruning``  Optuna's Lightning pruning callback: a sweep's ``sampler: tpe`` adds it to each trial
==================  =====================================================================================

A callback in ``callbacks`` that builds the same class as one in ``default_callbacks`` replaces
that default (``callbacks: [{name: throughput, window: 50}]`` changes its window). The defaults
only log, so a run without loggers (``loggers: []`` or ``trainer.logger: false``) leaves them out.
docs/how-to/tracking.md shows how to register your own.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Literal, Mapping, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as ThroughputWindow
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from vlm_lab import registry
from vlm_lab.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# Logging what training does


class GradientNorm(Callback):
    """Logs the gradient norm before every optimizer step: ``train/grad_norm/total`` over all parameters
    and ``train/grad_norm/<part>`` for each top-level part of the module (vision, text, vision_head...).
    (Not ``train/grad_norm`` beside ``train/grad_norm/vision``: MLflow's file store keeps a metric in a
    file named after it, so no metric name may be the folder of another.)

    Measured after Lightning unscales mixed-precision gradients and before gradient clipping
    (``trainer.gradient_clip_val``), so it is the norm clipping compares with. Under DDP the gradients
    are already averaged over ranks; under FSDP each rank sees its own shard, and the norm is that shard's.

    Args:
        norm_type: the p of the p-norm (``.inf`` in YAML for the largest absolute value).
        per_part: also log each part's norm.
    """

    def __init__(self, norm_type: float = 2.0, per_part: bool = True) -> None:
        if norm_type <= 0:
            raise ConfigError(f"callback grad_norm: norm_type={norm_type} should be positive (2.0, or .inf)")
        self.norm_type = float(norm_type)
        self.per_part = per_part

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        per_part: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, parameter in pl_module.named_parameters():
            if parameter.grad is not None:
                # At least float32 (bf16 gradients would round the norm), float64 for a float64 run
                # (vector_norm refuses to narrow). stack below needs one dtype: a module's gradients share one.
                dtype = torch.promote_types(parameter.grad.dtype, torch.float32)
                norm = torch.linalg.vector_norm(parameter.grad.detach(), self.norm_type, dtype=dtype)
                per_part[name.split(".", 1)[0]].append(norm)
        if not per_part:
            return  # every parameter is locked, or the step has no gradients
        # The p-norm of all gradients is the p-norm of the per-tensor p-norms (the max for inf).
        parts = {part: torch.linalg.vector_norm(torch.stack(norms), self.norm_type) for part, norms in per_part.items()}
        total = torch.linalg.vector_norm(torch.stack(list(parts.values())), self.norm_type)
        pl_module.log("train/grad_norm/total", total, on_step=True, on_epoch=False)
        if self.per_part:
            for part, norm in parts.items():
                pl_module.log(f"train/grad_norm/{part}", norm, on_step=True, on_epoch=False)


class Throughput(Callback):
    """Logs training throughput: ``train/samples_per_sec`` (all processes together) and, where the
    FLOPs of a step are measured, ``train/flops_per_sec`` (per device) and ``train/mfu``, the model
    FLOP utilisation (achieved FLOP/s over the device's peak for the run's precision).

    A rolling average over the last ``window`` training batches, timed on the wall clock with
    validation left out (data loading included, as a user experiences it). Rates appear once the
    window is full. The counting uses Lightning's ``Throughput`` and its table of peak FLOP/s
    (``get_available_flops``: recent NVIDIA GPUs and TPUs; none for CPUs).

    FLOPs per batch come from torch's ``FlopCounterMode`` (Lightning's ``measure_flops``) over one
    extra forward and backward pass of the first training batch, in eval mode with a forked random
    state and without writing any gradient, so training itself is unchanged. They count what runs
    (a locked tower's forward, no backward; nothing for a cached tower) and not what gradient
    checkpointing recomputes, which is what MFU counts. Measured on one device or under DDP only.

    Args:
        window: batches in the rolling average (at least 2).
        flops: measure FLOPs per batch: true, false, or null to measure only where MFU can be computed
            (the device's peak is known), which leaves CPU runs without the extra pass.
    """

    def __init__(self, window: int = 20, flops: bool | None = None) -> None:
        if window < 2:
            raise ConfigError(f"callback throughput: window={window} should be at least 2 batches")
        self.window = window
        self.flops = flops
        self.flops_per_batch: int | None = None
        self._counter: ThroughputWindow | None = None  # made when a fit is set up
        self._measure = False
        self._elapsed, self._started, self._paused = 0.0, None, False
        self._batches = self._samples = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        peak = get_available_flops(trainer.strategy.root_device, _compute_dtype(trainer.precision))
        self._counter = ThroughputWindow(available_flops=peak, world_size=trainer.world_size, window_size=self.window)
        measurable = isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        self._measure = (peak is not None if self.flops is None else self.flops) and measurable
        if self.flops and not measurable:
            rank_zero_warn(f"throughput: FLOPs are not measured under {type(trainer.strategy).__name__}; "
                           "samples/s only")
        self._elapsed, self._started, self._paused = 0.0, None, False
        self._batches = self._samples = 0

    # The clock runs during training epochs and stops for validation.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()  # a run resumed mid-epoch gets no on_train_epoch_start for its first epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = self._started is not None
        self._stop()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused:
            self._start()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._measure and self.flops_per_batch is None:
            self._stop()  # the measurement is not training time
            self.flops_per_batch = training_flops(trainer, pl_module, batch)
            rank_zero_info(f"throughput: {self.flops_per_batch / 1e9:.3g} GFLOPs per training batch "
                           f"and device (forward and backward)")
            self._start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is None:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # the clock must wait for the step's kernels
        self._batches += 1
        self._samples += len(batch["image_ids"])
        self._counter.update(time=self._now(), batches=self._batches, samples=self._samples,
                             flops=self.flops_per_batch)
        metrics = self._counter.compute()
        if "device/samples_per_sec" not in metrics:
            return  # the window is not full yet
        # Lightning adds the all-process figures only with several processes; with one they are equal.
        pl_module.log("train/samples_per_sec", metrics.get("samples_per_sec", metrics["device/samples_per_sec"]),
                      on_step=True, on_epoch=False)
        for key, name in (("device/flops_per_sec", "train/flops_per_sec"), ("device/mfu", "train/mfu")):
            if key in metrics:
                pl_module.log(name, metrics[key], on_step=True, on_epoch=False)

    def _start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            self._elapsed += time.perf_counter() - self._started
            self._started = None

    def _now(self) -> float:
        return self._elapsed + (time.perf_counter() - self._started if self._started is not None else 0.0)


def training_flops(trainer: L.Trainer, pl_module: Any, batch: Mapping[str, Any]) -> int:
    """FLOPs of one training step (forward and backward) on ``batch``, on this process.

    Runs the step once more without changing anything: eval mode (batch-norm statistics stay put;
    dropout adds no counted FLOPs), a forked random state, and gradients from ``torch.autograd.grad``,
    which writes no ``.grad`` (and so fires none of DDP's gradient hooks). 0 for a module without
    ``losses(batch)`` (``VisionLanguageModule``'s).
    """
    if not hasattr(pl_module, "losses"):
        return 0
    trainable = [p for p in pl_module.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with trainer.precision_plugin.forward_context():
            loss = pl_module.losses(batch)["loss"]
        if trainable:
            torch.autograd.grad(loss, trainable, allow_unused=True)
        return loss

    device = trainer.strategy.root_device
    was_training = pl_module.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pl_module.eval()
        try:
            return measure_flops(pl_module, step)
        finally:
            pl_module.train(was_training)


def _compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision setting, for the device's peak FLOP/s."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------------------------------
# A moving average of the weights


class EMA(Callback):
    """An exponential moving average (EMA) of the weights, evaluated and saved in their place.

    After every ``every_n_steps``-th optimizer step from ``start_step`` on, ``average = decay *
    average + (1 - decay) * weights``; before ``start_step`` the average simply follows the weights.
    It covers the trainable parameters and the floating-point buffers (batch-norm statistics); locked
    parameters never change, so they are not copied (a LiT run keeps no second image tower).

    * Validation during the fit, and the zero-shot evaluation with it, run on the averaged weights.
    * A checkpoint's ``state_dict`` holds the averaged weights, so everything that loads one
      (``vlm-lab validate/test/eval ckpt_path=...``, ``vlm-lab export``) uses them;
      the raw weights are kept beside them under ``current_model_state`` (the key Lightning's own
      ``WeightAveraging`` uses), and ``--resume`` restores both, so the average carries on.
    * When the fit ends, the module holds the averaged weights (as the last checkpoint does).

    Args:
        decay: weight of the past per update, in [0, 1): 0.999 averages over about 1000 updates.
        every_n_steps: update after every n-th optimizer step.
        start_step: follow the raw weights until this optimizer step, then average.
    """

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"callback ema: decay={decay} should be in [0, 1), e.g. 0.999")
        if every_n_steps < 1 or start_step < 0:
            raise ConfigError(f"callback ema: every_n_steps={every_n_steps} should be at least 1 and "
                              f"start_step={start_step} at least 0")
        self.decay, self.every_n_steps, self.start_step = decay, every_n_steps, start_step
        self.updates = 0
        self._live: dict[str, torch.Tensor] = {}  # the module's tensors that are averaged, by state_dict key
        self._average: dict[str, torch.Tensor] | None = None
        self._from_checkpoint: dict[str, torch.Tensor] | None = None  # restored before the fit starts
        self._swapped = False  # during validation the module holds the average and _average the raw weights
        self._last_step = -1
        self._groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    @property
    def average(self) -> dict[str, torch.Tensor] | None:
        """The averaged tensors by ``state_dict`` key (None outside a fit)."""
        return self._average

    # The checkpointed counters (the averaged weights themselves are the checkpoint's state_dict).
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in setup: the strategy has moved the module to its device by now, so the average lives there.
        self._live = _averaged_tensors(pl_module)
        source = self._from_checkpoint or {}
        self._average = {name: (source[name] if name in source else tensor).detach().to(
            device=tensor.device, dtype=tensor.dtype, copy=True) for name, tensor in self._live.items()}
        self._from_checkpoint = None
        self._groups = _by_device_and_dtype(self._average, self._live)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._average is None or step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = step
        if step <= self.start_step:
            with torch.no_grad():
                for name, tensor in self._live.items():
                    self._average[name].copy_(tensor)
        elif (step - self.start_step) % self.every_n_steps == 0:
            update = get_ema_multi_avg_fn(self.decay)
            for averaged, live in self._groups:
                update(averaged, live, None)
            self.updates += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average is not None and not self._swapped:
            self._swap()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not ..._epoch_end: the zero-shot callback evaluates at the epoch end. The
        # checkpoint callbacks, which Lightning always calls last, save after this.
        if self._swapped:
            self._swap()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average is not None:
            with torch.no_grad():
                for name, tensor in self._live.items():
                    tensor.copy_(self._average[name])
            self._average, self._live, self._groups = None, {}, []

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._average is None:
            return
        module_state = checkpoint["state_dict"]  # what the module holds now
        if self._swapped:  # saved during validation: the module holds the average
            raw, averaged = {**module_state, **self._average}, module_state
        else:
            raw, averaged = module_state, {**module_state, **self._average}
        checkpoint["current_model_state"] = raw
        checkpoint["state_dict"] = averaged

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if "current_model_state" not in checkpoint:
            rank_zero_info("ema: the checkpoint has no averaged weights; the average starts from its weights")
            return
        # Lightning has just loaded the averaged weights into the module: training goes on from the raw ones.
        averaged = checkpoint["state_dict"]
        pl_module.load_state_dict(checkpoint["current_model_state"], strict=pl_module.strict_loading)
        if self._average is None:
            self._from_checkpoint = averaged  # taken up in on_fit_start
        else:  # strategies that restore after setup (FSDP, DeepSpeed)
            with torch.no_grad():
                for name, tensor in self._average.items():
                    tensor.copy_(averaged[name])

    def _swap(self) -> None:
        assert self._average is not None
        with torch.no_grad():
            for name, tensor in self._live.items():
                held = tensor.detach().clone()
                tensor.copy_(self._average[name])
                self._average[name].copy_(held)
        self._swapped = not self._swapped


def _averaged_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's trainable parameters and floating-point buffers, by ``state_dict`` key, each once
    (a tied weight appears under its first key only)."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        trainable = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
        if trainable or (not isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point()):
            found[name] = tensor
    return found


def _by_device_and_dtype(average: dict[str, torch.Tensor],
                         live: dict[str, torch.Tensor]) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    # torch's multi-tensor EMA update takes lists of one device and dtype.
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, tensor in live.items():
        averaged, current = groups.setdefault((tensor.device, tensor.dtype), ([], []))
        averaged.append(average[name])
        current.append(tensor.detach())
    return list(groups.values())


# --------------------------------------------------------------------------------------------------
# Stopping early


def early_stopping(monitor: str, mode: Literal["min", "max"] = "min", patience: int = 3, min_delta: float = 0.0,
                   stopping_threshold: float | None = None, divergence_threshold: float | None = None,
                   check_finite: bool = True) -> EarlyStopping:
    """Lightning's ``EarlyStopping``: stop when ``monitor`` (a logged metric such as ``val/i2t_R@1``,
    mode max, or ``val/loss``, mode min) has not improved by ``min_delta`` for ``patience`` validations.

    ``stopping_threshold`` stops once the metric is that good, ``divergence_threshold`` once it is
    that bad; ``check_finite`` stops on NaN or infinity.
    """
    return EarlyStopping(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta,
                         stopping_threshold=stopping_threshold, divergence_threshold=divergence_threshold,
                         check_finite=check_finite)


def optuna_pruning(storage: str, study: str, trial: int, monitor: str, n_startup_trials: int = 2,
                   n_warmup_steps: int = 0) -> Callback:
    """Optuna's ``PyTorchLightningPruningCallback`` (optuna-integration) for trial number ``trial`` of
    the study ``study`` in ``storage``: reports ``monitor`` after every validation and stops the run
    once Optuna's ``MedianPruner`` says the trial is worse than the median of the earlier trials at
    the same epoch (never before ``n_startup_trials`` trials finished, nor before epoch
    ``n_warmup_steps``). A sweep with ``sampler: tpe`` adds it to every trial (vlm_lab/sweep.py); it
    needs the ``optuna`` extra.

    The trial runs in its own ``vlm-lab fit`` process, so the callback reaches the study through its
    shared storage (SQLite) rather than an in-memory ``Trial``; and because Optuna does not store a
    study's pruner, the pruner is this callback's, here.
    """
    try:
        import optuna
        from optuna_integration import PyTorchLightningPruningCallback
    except ImportError:
        raise ConfigError("callback optuna_pruning needs Optuna: pip install \"vlm-lab[optuna]\"") from None
    pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    bound = optuna_trial(storage, study, trial, pruner)

    class StopWhenPruned(PyTorchLightningPruningCallback):
        # Optuna's callback raises TrialPruned out of trainer.fit. Here the trial is a separate process,
        # where that exception would look like a crash (a traceback, exit status 1, no metrics.json);
        # stopping the trainer instead ends the run cleanly (checkpoint and metrics written) and the
        # sweep reads the "pruned_at_epoch" attribute to tell Optuna the trial was pruned.
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            try:
                super().on_validation_end(trainer, pl_module)
            except optuna.TrialPruned:
                bound.set_user_attr("pruned_at_epoch", pl_module.current_epoch)
                trainer.should_stop = True

    return StopWhenPruned(bound, monitor=monitor)


def optuna_trial(storage: str, study: str, number: int, pruner: Any = None) -> Any:
    """Optuna's ``Trial`` for trial ``number`` of ``study``, asked for (``study.ask()``) in another
    process: looked up through the storage's public API, so it reports to the same trial;
    ``pruner`` judges its ``should_prune()``."""
    import optuna

    storage_ = optuna.storages.get_storage(storage)
    try:
        trial_id = storage_.get_trial_id_from_study_id_trial_number(storage_.get_study_id_from_name(study), number)
    except KeyError:
        raise ConfigError(f"optuna: no trial number {number} in study {study!r} of {storage}") from None
    return optuna.trial.Trial(optuna.load_study(study_name=study, storage=storage_, pruner=pruner), trial_id)


registry.register_callback("lr_monitor", LearningRateMonitor)
registry.register_callback("grad_norm", GradientNorm)
registry.register_callback("throughput", Throughput)
registry.register_callback("ema", EMA)
registry.register_callback("early_stopping", early_stopping)
registry.register_callback("optuna_pruning", optuna_pruning)


# --------------------------------------------------------------------------------------------------
# Building the lists


def build_callbacks(specs: Sequence[Mapping[str, Any]], defaults: Sequence[str], logging: bool) -> list[Callback]:
    """The callbacks of a config: ``defaults`` (names) unless ``logging`` is off or a spec in ``specs``
    builds the same constructor, then ``specs`` in order."""
    chosen = {registry.resolve("callback", spec["name"])[0] for spec in specs}
    callbacks = [_build({"name": name}, f"default_callbacks[{i}]") for i, name in enumerate(defaults)
                 if logging and registry.resolve("callback", name)[0] not in chosen]
    callbacks += [_build(spec, f"callbacks[{i}]") for i, spec in enumerate(specs)]
    if not logging and any(isinstance(c, LearningRateMonitor) for c in callbacks):
        raise ConfigError("callback lr_monitor writes to the loggers, and this run has none "
                          "(loggers: [] or trainer.logger: false)")
    return callbacks


def _build(spec: Mapping[str, Any], where: str) -> Callback:
    callback = registry.build("callback", spec)
    if not isinstance(callback, Callback):
        raise ConfigError(f"{where}: callback {spec['name']!r} built a {type(callback).__name__}, "
                          f"not a lightning.pytorch.Callback")
    return callback
