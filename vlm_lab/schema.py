"""The experiment config's schema: one typed declaration for every section, and nothing declared twice.

Each section is a frozen dataclass. A field's annotation is the setting's type (``Literal[...]`` for
a setting that takes one of a few words), its default is the setting's default, and its metadata
holds a one-line ``help``. Everything else is derived from these declarations:

* the defaults a config starts from (``defaults()``);
* the checks of ``vlm_lab.config.load_config``: unknown keys (with the closest valid one), types and
  choices (``vlm_lab/typecheck.py``), and each section's own ``check`` (rules between fields);
* the settings objects the code works with (``OptimSettings.from_config(section)``...): an older
  checkpoint whose saved config lacks a newer key gets that key's default;
* the reference of every key (``vlm_lab.config.reference_markdown()``, ``vlm-lab config-reference``).

Sections that name a registered part (``model.vision``, ``model.loss``, ``data``...) are *specs*:
``{name: ..., <arguments>}``. Their arguments are declared by the constructor they name (its
signature and type hints) and checked by ``vlm_lab.registry.spec_arguments``, so a new tower or data
module brings its own settings without touching this file. ``trainer`` is passed to
``lightning.Trainer`` and checked against its signature.

Adding a setting is one line in the dataclass of its section.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, TypeVar

from vlm_lab import registry
from vlm_lab.errors import ConfigError, did_you_mean
from vlm_lab.paths import cache_root
from vlm_lab.typecheck import type_problem

S = TypeVar("S", bound="Section")


# --------------------------------------------------------------------------------------------------
# Declaring


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A plain setting: its default and one line of help."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def subsection(cls: type, help: str) -> Any:
    """A nested section (its own dataclass, its own table in the reference)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def spec(kind: str, default: str, help: str, provided: tuple[str, ...] = ()) -> Any:
    """A registry spec ``{name: ..., <arguments>}`` of ``kind``; ``provided`` are the constructor
    arguments vlm-lab supplies (a head's ``in_dim``), which a config may not set."""
    return dataclasses.field(default_factory=lambda: {"name": default},
                             metadata={"help": help, "spec": kind, "provided": provided})


def spec_list(kind: str, default: list[dict[str, Any]], help: str, provided: tuple[str, ...] = ()) -> Any:
    """A list of registry specs of ``kind`` (``loggers: [{name: csv}, {name: tensorboard}]``), each checked
    like a spec; an error names its position (``loggers[1]: ...``)."""
    return dataclasses.field(default_factory=lambda: copy.deepcopy(default),
                             metadata={"help": help, "spec_list": kind, "provided": provided})


class Section:
    """Base of the section dataclasses: building one from its config mapping, and its own checks."""

    where: ClassVar[str] = ""  # where the section sits in a config, for messages

    @classmethod
    def from_config(cls: type[S], section: Mapping[str, Any] | None, where: str | None = None) -> S:
        """The settings of a config section; missing keys (``None``: the whole section, as in a
        checkpoint written before it existed) take their defaults. Raises a one-line ``ConfigError``."""
        return from_section(cls, section, cls.where if where is None else where)

    def replace(self: S, where: str | None = None, **changes: Any) -> S:
        """A copy with ``changes``, checked as a config section is (a misspelt key names the closest)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values = {key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                  for key, value in values.items()}
        return from_section(type(self), {**values, **changes}, self.where if where is None else where)

    def check(self, where: str) -> None:
        """Rules between fields, beyond their types (a one-line ``ConfigError``); none by default."""


# --------------------------------------------------------------------------------------------------
# The sections


@dataclasses.dataclass(frozen=True)
class TokenizerSettings(Section):
    """``model.tokenizer``: what turns captions into token ids (``vlm_lab/tokenizer.py``)."""

    where: ClassVar[str] = "model.tokenizer"

    path: str | None = setting(None, "a local Hugging Face tokenizer folder (null: MiniLM's WordPiece, or a "
                                     "pretrained text tower's own tokenizer)")
    max_length: int = setting(32, "captions are cut to this many tokens (and to the text tower's context length)")
    train_from: str | None = setting(None, "a captions file to build a word-level vocabulary from, instead of path")
    min_count: int = setting(5, "train_from keeps the words seen at least this many times")

    def check(self, where: str) -> None:
        if self.path is not None and self.train_from is not None:
            raise ConfigError(f"{where}: set either path (an existing tokenizer) or train_from "
                              f"(build a word vocabulary from captions), not both")


@dataclasses.dataclass(frozen=True)
class TowerLock(Section):
    """How much of a tower to freeze (``model.vision_lock`` / ``model.text_lock``; ``vlm_lab/locking.py``).

    Attributes:
        lock: freeze the tower (all of it unless ``unlocked_groups`` says otherwise).
        unlocked_groups: the top N layer groups stay trainable (0: lock the whole tower).
        freeze_bn_stats: BatchNorm layers in the frozen groups keep their running statistics (eval
            mode). Without it they keep updating them in training, as open_clip's default does.
        freeze_layer_norm: LayerNorms in the frozen groups are frozen too. ``false`` leaves their
            gain and bias trainable (open_clip's ``--lock-text`` default): a cheap adaptation, but then
            the tower is no longer fully locked and runs with gradients.
    """

    where: ClassVar[str] = "model.vision_lock"

    lock: bool = setting(False, "freeze the tower (LiT), all of it unless unlocked_groups says otherwise")
    unlocked_groups: int = setting(0, "the top N layer groups stay trainable (0: the whole tower is locked)")
    freeze_bn_stats: bool = setting(True, "BatchNorm layers in frozen groups keep their running statistics")
    freeze_layer_norm: bool = setting(True, "LayerNorms in frozen groups are frozen too (false: their gain and "
                                            "bias still train)")

    def check(self, where: str) -> None:
        if self.unlocked_groups < 0:
            raise ConfigError(f"{where}.unlocked_groups={self.unlocked_groups} should be 0 or more")
        if self.unlocked_groups and not self.lock:
            raise ConfigError(f"{where}.unlocked_groups={self.unlocked_groups} only applies with {where}.lock: true")


@dataclasses.dataclass(frozen=True)
class GenerationSettings(Section):
    """``model.generation``: how captions are decoded (``vlm_lab/generation.py``).

    The defaults of evaluation, ``module.generate`` and ``vlm-lab caption``; ``max_images`` and
    ``log_examples`` apply to evaluation only.
    """

    where: ClassVar[str] = "model.generation"

    max_new_tokens: int = setting(20, "tokens generated after BOS at most (EOS included)")
    min_new_tokens: int = setting(0, "EOS is forbidden before this many tokens")
    num_beams: int = setting(1, "1: greedy or sampling; more: beam search")
    length_penalty: float = setting(1.0, "beam scores are sum(log p) / length ** length_penalty (> 0 favours "
                                         "longer captions)")
    do_sample: bool = setting(False, "sample instead of taking the most likely token (needs num_beams: 1)")
    temperature: float = setting(1.0, "sampling: divides the logits")
    top_k: int = setting(0, "sampling: keep the k most likely tokens (0: all)")
    top_p: float = setting(1.0, "sampling: keep the most likely tokens up to this probability mass (1: all)")
    repetition_penalty: float = setting(1.0, "CTRL's penalty on tokens already generated (1: off)")
    no_repeat_ngram_size: int = setting(0, "no n-gram of this many tokens appears twice in a caption (0: off)")
    use_cache: bool = setting(True, "reuse keys and values between steps (identical tokens, faster)")
    seed: int | None = setting(None, "seeds the sampler (null: torch's global generator)")
    max_images: int | None = setting(None, "evaluation captions at most this many images (null: all)")
    log_examples: int = setting(5, "evaluation logs this many generated captions beside a reference")

    def check(self, where: str) -> None:
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"{where}: need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, "
                              f"got {self.min_new_tokens} and {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"{where}: num_beams must be at least 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ConfigError(f"{where}: do_sample works with num_beams=1 only (beam sampling is not implemented)")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"{where}: no_repeat_ngram_size must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError(f"{where}: need temperature > 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0; "
                              f"got {self.temperature}, {self.top_p}, {self.top_k}, {self.repetition_penalty}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None, where: str | None = None,
                    **overrides: Any) -> "GenerationSettings":
        """The section's settings with keyword ``overrides`` on top (None values are ignored, so unset
        command-line options keep the section's values)."""
        values = {**(section or {}), **{key: value for key, value in overrides.items() if value is not None}}
        return from_section(cls, values, cls.where if where is None else where)


@dataclasses.dataclass(frozen=True)
class DistillSettings(Section):
    """``model.distill``: distillation from a frozen teacher CLIP (``vlm_lab/distillation.py``; open_clip's
    ``--distill``)."""

    where: ClassVar[str] = "model.distill"

    teacher: str | None = setting(None, "a teacher CLIP: a vlm-lab .ckpt file or a Hugging Face / open_clip CLIP "
                                        "folder (null: no distillation)")
    weight: float = setting(1.0, "weight of the distillation loss (KL between the teacher's and the student's "
                                 "image-text similarities)")
    cache: bool = setting(True, "compute the teacher's image and caption features once, when the fit starts, where "
                                "the training images are deterministic (no augmentation; storage as the "
                                "embedding_cache section says), instead of every step")

    def check(self, where: str) -> None:
        if self.weight <= 0:
            raise ConfigError(f"{where}.weight={self.weight} should be above 0; to train without a teacher "
                              f"set {where}.teacher=null")


@dataclasses.dataclass(frozen=True)
class ModelSettings(Section):
    """``model``: the parts of the model and how they are combined (``vlm_lab/module.py``)."""

    where: ClassVar[str] = "model"

    vision: dict[str, Any] = spec("vision_tower", "clip_vit_tiny", "the vision tower")
    text: dict[str, Any] = spec("text_tower", "clip_text_tiny", "the text tower")
    vision_head: dict[str, Any] = spec("head", "linear", "maps the vision tower's output into the joint space",
                                       provided=("in_dim", "out_dim"))
    text_head: dict[str, Any] = spec("head", "linear", "maps the text tower's output into the joint space",
                                     provided=("in_dim", "out_dim"))
    loss: dict[str, Any] = spec("loss", "clip", "the contrastive loss (clip, align, siglip)")
    embed_dim: int = setting(256, "width of the joint image-text embedding space")
    tokenizer: TokenizerSettings = subsection(TokenizerSettings, "the tokenizer")
    vision_lock: TowerLock = subsection(TowerLock, "LiT-style locking of the vision tower")
    text_lock: TowerLock = subsection(TowerLock, "LiT-style locking of the text tower")
    init_from: str | None = setting(None, "a pretrained CLIP directory (Hugging Face or open_clip): its architecture "
                                          "under the config files, its weights loaded")
    contrastive_weight: float = setting(1.0, "weight of the contrastive loss (0: no heads or contrastive loss "
                                             "are built)")
    caption_weight: float = setting(0.0, "weight of CoCa's captioning loss (0: no caption head is built)")
    caption_head: dict[str, Any] = spec("head", "coca_decoder", "CoCa's poolers and multimodal decoder "
                                        "(built when caption_weight > 0)", provided=("in_dim", "out_dim", "text_dim"))
    generation: GenerationSettings = subsection(GenerationSettings, "caption decoding")
    distill: DistillSettings = subsection(DistillSettings, "distillation from a frozen teacher CLIP")
    compile: bool = setting(False, "torch.compile the towers when a Trainer sets the module up (fit, validate, test; "
                                   "docs/how-to/compile.md)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = setting(
        "default", "torch.compile's mode (reduce-overhead: CUDA graphs; max-autotune: tuned GEMM kernels)")

    def check(self, where: str) -> None:
        if self.contrastive_weight <= 0 and self.caption_weight <= 0:
            raise ConfigError(f"{where}.contrastive_weight and {where}.caption_weight are both 0: nothing to train")
        if self.distill.teacher is not None and self.contrastive_weight <= 0:
            raise ConfigError(f"{where}.distill distils image-text similarities, which a captioning-only model "
                              f"({where}.contrastive_weight: 0) does not compute")


@dataclasses.dataclass(frozen=True)
class LrScale(Section):
    """``optim.lr_scale``: per-tower multipliers of ``optim.lr``."""

    where: ClassVar[str] = "optim.lr_scale"

    vision: float = setting(1.0, "multiplies optim.lr for the vision tower (e.g. 0.1 to tune a pretrained tower "
                                 "gently)")
    text: float = setting(1.0, "multiplies optim.lr for the text tower")


@dataclasses.dataclass(frozen=True)
class LayerDecay(Section):
    """``optim.layer_decay``: layer-wise learning-rate decay within each tower (``vlm_lab.locking.layer_decay_scales``)."""

    where: ClassVar[str] = "optim.layer_decay"

    vision: float = setting(1.0, "each layer group of the vision tower learns this times as fast as the one above "
                                 "(open_clip's --image-layer-decay; 1: off)")
    text: float = setting(1.0, "the same for the text tower (open_clip's --text-layer-decay; 1: off)")

    def check(self, where: str) -> None:
        for tower in ("vision", "text"):
            decay = getattr(self, tower)
            if not 0.0 < decay <= 1.0:
                raise ConfigError(f"{where}.{tower}={decay} should be above 0 and at most 1 (1: no decay; open_clip "
                                  f"uses 0.65-0.9)")


@dataclasses.dataclass(frozen=True)
class OptimSettings(Section):
    """``optim``: AdamW, its cosine schedule with warm-up, and what to do with a non-finite loss."""

    where: ClassVar[str] = "optim"

    lr: float = setting(5.0e-4, "peak learning rate (heads, poolers and decoder; towers: times lr_scale)")
    weight_decay: float = setting(0.1, "AdamW weight decay (never on biases, norms and temperatures)")
    betas: list[float] = setting([0.9, 0.98], "AdamW's two moment decay rates")
    eps: float = setting(1.0e-6, "AdamW's epsilon")
    warmup_steps: int = setting(100, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = setting(0.0, "the cosine decay ends at lr * min_lr_ratio")
    lr_scale: LrScale = subsection(LrScale, "per-tower learning-rate multipliers")
    layer_decay: LayerDecay = subsection(LayerDecay, "layer-wise learning-rate decay within each tower, on top of "
                                                     "lr_scale")
    nonfinite_loss: Literal["error", "skip"] = setting("error", "a NaN/Inf training loss stops the run (error) or "
                                                                "skips the optimizer step (skip)")
    contrastive_chunks: int = setting(1, "run the towers on N chunks of each batch with cached embedding gradients: "
                                         "the whole batch's loss and negatives, 1/N of the graph "
                                         "(docs/how-to/contrastive-chunks.md)")

    def check(self, where: str) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"{where}.betas={self.betas!r} should be two numbers")
        if self.contrastive_chunks < 1:
            raise ConfigError(f"{where}.contrastive_chunks={self.contrastive_chunks} should be a positive integer: the "
                              f"number of chunks a batch's towers run in (1: the whole batch at once)")


def check_evaluators(evaluators: Any, where: str) -> None:
    """``eval.evaluators``: ``{<name>: <evaluator spec>}``; each name becomes ``eval/<name>/<metric>``."""
    if not isinstance(evaluators, Mapping):
        raise ConfigError(f"{where}={evaluators!r} should map a name to an evaluator spec, e.g. "
                          f"{{cifar10: {{name: zeroshot, root: DIR}}}}")
    for name, spec in evaluators.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{where}: evaluator name {name!r} should be letters, digits, _ . or - "
                              f"(it becomes the metric names eval/<name>/...)")
        try:
            registry.spec_arguments("evaluator", spec)
        except ConfigError as e:
            raise ConfigError(f"{where}.{name}: {e}") from None


@dataclasses.dataclass(frozen=True)
class EvalSettings(Section):
    """``eval``: the evaluation suite, evaluators by name (``vlm_lab/eval/suite.py``; docs/how-to/evaluate.md)."""

    where: ClassVar[str] = "eval"

    evaluators: dict[str, Any] = setting({}, "{<name>: {name: <evaluator>, <its data and settings>}}: zeroshot, "
                                             "retrieval, linear_probe, fewshot, captioning (vlm-lab list --kind evaluator)",
                                         check=check_evaluators)
    every_n_epochs: int = setting(1, "during fit, after validation every N epochs (0: only with vlm-lab eval)")

    def check(self, where: str) -> None:
        if self.every_n_epochs < 0:
            raise ConfigError(f"{where}.every_n_epochs={self.every_n_epochs} should be 0 (never during fit) or more")


@dataclasses.dataclass(frozen=True)
class CacheSettings(Section):
    """``embedding_cache``: a fully locked vision tower's outputs, computed once (``vlm_lab/embedding_cache.py``)."""

    where: ClassVar[str] = "embedding_cache"

    enabled: bool = setting(True, "cache a fully locked vision tower's outputs on splits with deterministic images")
    storage: Literal["memory", "disk"] = setting("memory", "memory (each process its own copy) or disk (.npy "
                                                           "files, shared by runs)")
    dir: str | None = setting(None, "the disk cache's folder (null: $XDG_CACHE_HOME/vlm-lab/embeddings, else "
                                    "~/.cache/vlm-lab/embeddings)")
    tokens: bool = setting(False, "also store the token outputs (for heads that attend to them; large)")
    batch_size: int = setting(64, "images per batch while filling the cache")
    num_workers: int = setting(0, "loader worker processes while filling the cache")

    def directory(self) -> Path:
        """Where the disk cache lives."""
        return Path(self.dir) if self.dir is not None else cache_root() / "embeddings"


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(Section):
    """``checkpoint``: step checkpoints and preemption (``vlm_lab/preemption.py``; docs/how-to/resume.md).

    Epoch checkpoints (``epochNNN.ckpt`` and ``last.ckpt``) are always written. Step checkpoints are
    ``stepNNNNNNN.ckpt`` (the global step; ``stepNNNNNNN-timed.ckpt`` from ``every_n_minutes``) and refresh
    ``last.ckpt``, so ``--resume`` continues from the newest of either, mid-epoch included.
    """

    where: ClassVar[str] = "checkpoint"

    every_n_steps: int = setting(0, "also write a checkpoint every N optimizer steps (0: only at epoch ends)")
    every_n_minutes: float = setting(0.0, "also write a checkpoint (stepNNNNNNN-timed.ckpt) every T minutes of "
                                          "training (0: never)")
    keep: int = setting(2, "step checkpoints kept (the newest; per trigger when both are set; -1: all)")
    on_signal: bool = setting(True, "SIGTERM and SIGINT (on SLURM: SIGUSR1 and SIGTERM) write a checkpoint at the "
                                    "end of the current step and stop the run; on SLURM the job requeues itself")
    monitor: str | None = setting(None, "also keep the best checkpoint by this validation metric as "
                                        "checkpoints/best.ckpt, e.g. val/i2t_R@1 (null: none)")
    mode: Literal["max", "min"] | None = setting(None, "with monitor: whether the largest (R@k, BLEU-4, CIDEr) or "
                                                       "the smallest (a loss) value is best")

    def check(self, where: str) -> None:
        if self.monitor is not None and self.mode is None:
            raise ConfigError(f"{where}.monitor={self.monitor!r} needs {where}.mode: max (R@k, BLEU-4, CIDEr) or "
                              f"min (a loss)")
        if self.mode is not None and self.monitor is None:
            raise ConfigError(f"{where}.mode={self.mode!r} is set but {where}.monitor is not; name the metric, "
                              f"e.g. {where}.monitor=val/i2t_R@1")
        if self.monitor is not None and not self.monitor.strip():
            raise ConfigError(f"{where}.monitor is empty; name a validation metric, e.g. val/i2t_R@1")
        if self.every_n_steps < 0 or self.every_n_minutes < 0:
            raise ConfigError(f"{where}: every_n_steps={self.every_n_steps} and every_n_minutes={self.every_n_minutes} "
                              f"should be 0 (off) or more")
        if self.keep == 0 or self.keep < -1:
            raise ConfigError(f"{where}.keep={self.keep} should be the number of step checkpoints to keep (1 or "
                              f"more), or -1 for all")


def check_trainer_arguments(trainer: Any, where: str) -> None:
    """``trainer`` holds ``lightning.Trainer`` arguments only, and a precision Lightning accepts."""
    import lightning as L

    if not isinstance(trainer, Mapping):
        raise ConfigError(f"{where} should be a mapping of lightning.Trainer arguments, got {trainer!r}")
    valid = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        if key not in valid:
            raise ConfigError(f"unknown config key '{where}.{key}' (not a lightning.Trainer argument)."
                              f"{did_you_mean(key, valid)}")
    if trainer.get("precision") is not None:
        _check_precision(trainer["precision"], f"{where}.precision")
    check_strategy(trainer)
    if trainer.get("logger") not in (True, False, None):
        raise ConfigError(f"{where}.logger={trainer['logger']!r} should be true or false; choose loggers with "
                          f"the top-level list, e.g. loggers: [{{name: csv}}, {{name: tensorboard}}]")


def check_callback_names(names: Any, where: str) -> None:
    """``default_callbacks``: a list of registered callback names."""
    if not isinstance(names, list):
        raise ConfigError(f"{where}={names!r} should be a list of callback names, e.g. [lr_monitor, grad_norm]")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ConfigError(f"{where}[{i}]={name!r} should be a callback name, e.g. grad_norm")
        try:
            registry.resolve("callback", name)
        except ConfigError as e:
            raise ConfigError(f"{where}[{i}]: {e}") from None


def _check_precision(value: Any, where: str) -> None:
    """A precision Lightning accepts (else Lightning fails late, with a traceback)."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    choices = [choice for literal in typing.get_args(_PRECISION_INPUT) for choice in typing.get_args(literal)]
    if isinstance(value, bool) or value not in choices:
        words = list(dict.fromkeys(str(choice) for choice in choices))
        raise ConfigError(f"{where}={value!r} is not a Lightning precision (tested here: 32, bf16-mixed); "
                          f"valid: {', '.join(words)}.{did_you_mean(value, words)}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Section):
    """A whole experiment: what ``vlm-lab fit`` reads."""

    name: str | None = setting(None, "the run's name (null: the last config file's stem); runs go to runs/<name>/")
    seed: int = setting(0, "the global seed (model initialisation, data order, augmentation)")
    model: ModelSettings = subsection(ModelSettings, "the model")
    data: dict[str, Any] = spec("datamodule", "synthetic_shapes", "the data module",
                                provided=("tokenizer", "image_config", "max_length"))
    optim: OptimSettings = subsection(OptimSettings, "the optimizer and schedule")
    eval: EvalSettings = subsection(EvalSettings, "the evaluation suite: zero-shot, retrieval, probes")
    embedding_cache: CacheSettings = subsection(CacheSettings, "the locked-tower embedding cache")
    checkpoint: CheckpointSettings = subsection(CheckpointSettings, "step checkpoints and preemption (resume mid-epoch)")
    trainer: dict[str, Any] = setting({}, "lightning.Trainer arguments (max_epochs, precision, devices...)",
                                      check=check_trainer_arguments)
    # Tracking (vlm_lab/tracking.py, vlm_lab/callbacks.py; docs/how-to/tracking.md).
    loggers: list[dict[str, Any]] = spec_list("logger", [{"name": "csv"}],
                                              "where metrics go; [] (or trainer.logger: false) logs nothing",
                                              provided=("run_dir", "config_name"))
    callbacks: list[dict[str, Any]] = spec_list("callback", [], "Lightning callbacks by name (ema, early_stopping...)")
    default_callbacks: list[str] = setting(["lr_monitor", "grad_norm", "throughput"],
                                           "callbacks every run with a logger gets; one in callbacks replaces its default",
                                           check=check_callback_names)


# --------------------------------------------------------------------------------------------------
# Reading a section


def from_section(cls: type[S], section: Any, where: str, *, unknown: str = "key") -> S:
    """Check ``section`` against the dataclass ``cls`` and build it.

    Unknown keys fail with the closest valid one (``unknown`` words the message: ``"config key"``
    when a whole config is read); values must fit their annotations; nested sections and specs are
    checked in turn; missing keys take their defaults; the section's ``check`` runs last.
    """
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where or 'the config'} should be a mapping, got {section!r}")
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls)}
    for key in section:
        if key not in declared:
            raise ConfigError(f"unknown {unknown} {_join(where, key)!r}.{did_you_mean(key, declared)} "
                              f"Valid keys in {where or 'the top level'}: {', '.join(declared)}")
    values: dict[str, Any] = {}
    for name, value in section.items():
        declaration, path, hint = declared[name], _join(where, name), hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_section(hint, value, path, unknown=unknown)
        elif "spec" in declaration.metadata:
            provided = {argument: None for argument in declaration.metadata["provided"]}
            registry.spec_arguments(declaration.metadata["spec"], value, provided=provided)
            value = dict(value)
        elif "spec_list" in declaration.metadata:
            if not isinstance(value, list):
                raise ConfigError(f"{path}={value!r} should be a list of {{name: ...}} specs")
            provided = {argument: None for argument in declaration.metadata["provided"]}
            for i, item in enumerate(value):
                try:
                    registry.spec_arguments(declaration.metadata["spec_list"], item, provided=provided)
                except ConfigError as e:
                    raise ConfigError(f"{path}[{i}]: {e}") from None
            value = [dict(item) for item in value]
        elif "check" in declaration.metadata:
            declaration.metadata["check"](value, path)
        else:
            problem = type_problem(value, hint)
            if problem:
                raise ConfigError(f"{path}={value!r} {problem}")
        values[name] = value
    settings = cls(**values)
    settings.check(where)
    return settings


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


# --------------------------------------------------------------------------------------------------
# Derived views


def defaults() -> dict[str, Any]:
    """Every setting's default, as the nested plain mapping a config starts from."""
    return dataclasses.asdict(ExperimentConfig())


def spec_fields(cls: type = ExperimentConfig, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dataclasses.Field]:
    """Where the registry specs sit in a config, and their declarations: ``{("model", "vision"): <field>, ...}``
    (``field.metadata["spec"]`` is the kind, ``["provided"]`` the arguments vlm-lab supplies)."""
    hints = typing.get_type_hints(cls)
    found: dict[tuple[str, ...], dataclasses.Field] = {}
    for declaration in dataclasses.fields(cls):
        path = prefix + (declaration.name,)
        if "spec" in declaration.metadata:
            found[path] = declaration
        elif dataclasses.is_dataclass(hints[declaration.name]):
            found.update(spec_fields(hints[declaration.name], path))
    return found


def spec_list_fields() -> dict[tuple[str, ...], dataclasses.Field]:
    """Where the lists of registry specs sit (top level only): ``{("loggers",): <field>, ...}``."""
    return {(f.name,): f for f in dataclasses.fields(ExperimentConfig) if "spec_list" in f.metadata}


def declarations(cls: type = ExperimentConfig) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, type hint)`` of each setting of a section, in declaration order (for the reference)."""
    hints = typing.get_type_hints(cls)
    return [(declaration, hints[declaration.name]) for declaration in dataclasses.fields(cls)]


# --------------------------------------------------------------------------------------------------
# trainer.strategy: the sharded strategy's options (built by vlm_lab/sharding.py)

STRATEGY_NAME = "fsdp2"
# Lightning's ModelParallelStrategy accepts these precisions (it refuses 64-true and 16-mixed).
SHARDED_PRECISIONS = ("32", "32-true", "bf16", "bf16-mixed", "bf16-true", "16-true")


@dataclasses.dataclass(frozen=True)
class ShardingSettings(Section):
    """``trainer.strategy: {name: fsdp2, ...}``: how vlm-lab shards with FSDP2 (``vlm_lab/sharding.py``)."""

    where: ClassVar[str] = "trainer.strategy"

    locked: Literal["shard", "replicate"] = setting(
        "shard", "frozen parameters (a locked tower): sharded like the rest and gathered for each forward "
                 "(shard), or kept whole on every process (replicate: more memory, no all-gather)")
    checkpoint: Literal["full", "sharded"] = setting(
        "full", "one ordinary checkpoint file written by rank 0 (full), or a directory of per-process shards "
                "(sharded; `vlm-lab consolidate DIR` makes one file)")
    reshard_after_forward: bool = setting(
        True, "free each block's gathered parameters after its forward (ZeRO-3, least memory) or keep them "
              "until backward (no second all-gather)")


def sharding_settings(value: Any) -> ShardingSettings | None:
    """The settings ``trainer.strategy`` asks for, or None when it names another strategy: ``fsdp2`` or
    ``{name: fsdp2, <options>}``; a mapping naming anything else or a bad option is a ``ConfigError``."""
    if isinstance(value, str):
        return ShardingSettings() if value == STRATEGY_NAME else None
    if not isinstance(value, Mapping):
        return None
    options = dict(value)
    name = options.pop("name", None)
    if name != STRATEGY_NAME:
        raise ConfigError(f"trainer.strategy: a mapping configures the sharded strategy and needs "
                          f"name: {STRATEGY_NAME} (got name: {name!r}); other strategies are given by name, "
                          f"e.g. trainer.strategy=ddp")
    return from_section(ShardingSettings, options, "trainer.strategy")


def check_strategy(trainer: Mapping[str, Any]) -> None:
    """``trainer.strategy`` (and what it implies for ``trainer.precision``), long before Lightning would
    fail with a traceback."""
    from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

    value = trainer.get("strategy", "auto")
    settings = sharding_settings(value)
    if settings is None:
        if not isinstance(value, str):
            raise ConfigError(f"trainer.strategy={value!r} should be a strategy name or a mapping with "
                              f"name: {STRATEGY_NAME}")
        names = ["auto", STRATEGY_NAME, *StrategyRegistry.available_strategies()]
        if value not in names:
            raise ConfigError(f"trainer.strategy={value!r} is not a strategy; valid: {', '.join(names)}."
                              f"{did_you_mean(value, names)}")
        if value in FSDPStrategy.get_registered_strategies() and trainer.get("accelerator", "auto") == "cpu":
            raise ConfigError(f"trainer.strategy={value} (Lightning's FSDPStrategy) needs a CUDA accelerator; "
                              f"on the CPU use trainer.strategy={STRATEGY_NAME}")
        return
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in SHARDED_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} does not work with trainer.strategy={STRATEGY_NAME} "
                          f"(Lightning's ModelParallelStrategy); valid: {', '.join(SHARDED_PRECISIONS)}")
