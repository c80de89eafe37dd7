"""``VisionLanguageModule``: one LightningModule that assembles towers, heads and a loss from config.

The module is built from the plain ``model`` and ``optim`` sections of a config and saves them as
hyperparameters (the recipe, for the record). Its checkpoints also carry the model as built, towers
as explicit architectures, and the tokenizer's files (``vlm_lab/checkpoint_format.py``), so
``VisionLanguageModule.load_from_checkpoint(path)`` rebuilds it from the checkpoint file alone, on any
machine, loading no pretrained weights. Every part is looked up by name in the registry::

    image ──vision tower──▶ pooled ──vision_head──▶ ┐
                                                    ├─ L2-normalise ─▶ loss (clip | align | siglip)
    text ───text tower────▶ pooled ──text_head────▶ ┘
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import math
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from vlm_lab import checkpoint_format, registry
from vlm_lab.contracts import ContrastiveLoss, TextTower, VisionTower
from vlm_lab.data.transforms import normalize_pixels
from vlm_lab.distillation import Teacher
from vlm_lab.distributed import any_rank
from vlm_lab.errors import ConfigError
from vlm_lab.eval.split_evaluation import SplitEvaluation
from vlm_lab.generation import generate_captions
from vlm_lab.gradient_cache import cached_encode, check_trainer
from vlm_lab.heads.coca import build_caption_head
from vlm_lab.locking import layer_decay_scales, lock_tower
from vlm_lab.losses import SimilarityDistillation
from vlm_lab.schema import GenerationSettings, ModelSettings, OptimSettings
from vlm_lab.sharding import configure_sharding
from vlm_lab.tokenizer import load_tokenizer, word_tokenizer_dir
from vlm_lab.towers.base import ImageConfig, TowerOutput


class VisionLanguageModule(L.LightningModule):
    """A dual-encoder (CLIP, ALIGN, SigLIP, LiT) built from the ``model`` and ``optim`` config sections."""

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], tokenizer: Any = None,
                 model_as_built: dict[str, Any] | None = None) -> None:
        """``model_as_built`` and ``tokenizer`` are what ``load_from_checkpoint`` passes from a checkpoint:
        the model section the module is then built from instead of ``model`` (which stays the
        hyperparameter: the recipe as written), and the loaded tokenizer to use. Neither is a hyperparameter."""
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "model_as_built"])
        # Typed, checked views of the two sections (vlm_lab/schema.py); keys that an older checkpoint's
        # saved sections lack take their defaults.
        model = model_as_built if model_as_built is not None else model
        settings = ModelSettings.from_config(model)
        self.optim_settings = OptimSettings.from_config(optim)
        self.vision = registry.build("vision_tower", settings.vision, contract=VisionTower)
        self.text, self.tokenizer = _text_tower_and_tokenizer(settings, tokenizer)
        # CoCa (vlm_lab/heads/coca.py): a weight of 0 means that part is not built at all.
        self.contrastive_weight = settings.contrastive_weight
        self.caption_weight = settings.caption_weight
        self.caption_head = build_caption_head(settings.caption_head, self.vision, self.text) \
            if self.caption_weight > 0 else None
        self.vision_head = self.text_head = self.loss = None
        if self.contrastive_weight > 0:
            embed_dim = settings.embed_dim
            image_dim = self.vision.output_dim if self._contrastive_pooler is None else self.caption_head.output_dim
            self.vision_head = registry.build("head", settings.vision_head, in_dim=image_dim, out_dim=embed_dim)
            self.text_head = registry.build("head", settings.text_head, in_dim=self.text.output_dim, out_dim=embed_dim)
            self.loss = registry.build("loss", settings.loss, contract=ContrastiveLoss)
        elif self.caption_head is not None:
            self.caption_head.contrastive_pooler = None  # captioning only: the pooler would get no gradient
        # Distillation (vlm_lab/distillation.py): the loss term now, the teacher from set_teacher().
        self.distill = settings.distill
        self.distill_loss = SimilarityDistillation() if self.distill.teacher is not None else None
        self._teacher: Teacher | None = None
        # model.compile, read now from the section the module is built from: in configure_model the
        # recipe as written (hparams) could name cards a checkpoint's reader does not have.
        self.compile_settings = (settings.compile, settings.compile_mode)
        self._compiled = False  # done once, in configure_model()
        # model.init_from: the module has the checkpoint's architecture (the config's model section
        # comes from it); vlm_lab.build_module loads its weights, as interop sits above the module.
        # Locking only flips requires_grad and train/eval modes, so it holds whatever is loaded later.
        self.vision_locked = lock_tower(self.vision, settings.vision_lock, "model.vision_lock")
        self.text_locked = lock_tower(self.text, settings.text_lock, "model.text_lock")
        tower_limit = self.text.max_length or math.inf
        self.max_length = int(min(settings.tokenizer.max_length, tower_limit))
        self.skipped_nonfinite_steps = 0
        # Checkpoints saved before the option existed have no value: one chunk, as they trained.
        self.contrastive_chunks = self.optim_settings.contrastive_chunks  # checked by the schema
        self._discard_gradients = False  # set when a non-finite loss is skipped (see _nonfinite)
        # Decided now, from the true shapes: under FSDP configure_optimizers sees flattened 1-D shards.
        self._no_decay_names = {name for name, p in self.named_parameters() if p.ndim < 2} | {
            f"loss.{name}" for name in (self.loss.no_weight_decay() if self.loss is not None else ())}
        # Layer-wise lr decay (optim.layer_decay) from the towers' layer groups, also decided now, while
        # the towers are unwrapped. Older checkpoints have no layer_decay: no decay, as they trained.
        self._layer_lr_scales = {f"{tower}.{name}": scale for tower in ("vision", "text")
                                 for name, scale in layer_decay_scales(
                                     getattr(self, tower), getattr(self.optim_settings.layer_decay, tower),
                                     f"optim.layer_decay.{tower}").items()}
        # What every checkpoint of this module carries to rebuild it without the recipe's files. Worked
        # out now: a tower that cannot say its architecture fails here, not at the first save, and the
        # tokenizer is saved as loaded (a fast tokenizer's file records the truncation of its last call).
        self.portable_model = checkpoint_format.PortableModel(
            checkpoint_format.portable_model_section(model, self.vision, self.text),
            checkpoint_format.tokenizer_files(self.tokenizer))

    # ---------------------------------------------------------------------------------------------
    # Checkpoints (vlm_lab/checkpoint_format.py)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[checkpoint_format.KEY] = self.portable_model.entry()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path | IO[bytes], map_location: Any = None,
                             hparams_file: str | Path | None = None, strict: bool | None = None,
                             weights_only: bool | None = None, **kwargs: Any) -> "VisionLanguageModule":
        """Lightning's ``load_from_checkpoint``, rebuilding the model from the checkpoint file alone.

        The architecture and the tokenizer come from the checkpoint's ``vlm_lab`` entry: no card, weight
        file, folder, package or captions file is read, and no pretrained weights are loaded. A
        checkpoint written before that entry existed re-runs the recipe in its hyperparameters, which
        needs the files it names; if one is gone, the error says how to convert the checkpoint.
        """
        if not isinstance(checkpoint_path, (str, Path)):  # a file object: read once, serve twice
            checkpoint_path = io.BytesIO(checkpoint_path.read())
        source = checkpoint_path if isinstance(checkpoint_path, (str, Path)) else "the checkpoint"
        portable = checkpoint_format.portable_model(
            checkpoint_format.read_checkpoint(checkpoint_path, weights_only), source)
        if isinstance(checkpoint_path, io.BytesIO):
            checkpoint_path.seek(0)
        load = super().load_from_checkpoint
        if portable is not None:
            kwargs = {"model_as_built": portable.model, "tokenizer": portable.tokenizer(), **kwargs}
            return load(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)
        try:
            return load(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)
        except ConfigError as error:
            raise checkpoint_format.legacy_rebuild_error(source, error) from None

    # ---------------------------------------------------------------------------------------------
    # Encoding (the public API for notebooks and evaluation)

    @property
    def image_config(self) -> ImageConfig:
        """How the vision tower wants its images: data modules build their transforms from it."""
        return self.vision.image_config

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels (or ``uint8`` ones) -> ``[B, embed_dim]`` image embeddings."""
        return self._image_embedding(self.vision_tower_output(pixel_values), normalize)

    def encode_batch_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A batch's image embeddings, from its pixels or from the locked tower's cached outputs."""
        return self._image_embedding(self.batch_vision_output(batch))

    def batch_vision_output(self, batch: dict[str, torch.Tensor]) -> TowerOutput:
        """The vision tower's output for a batch: computed, or served by the embedding cache
        (vlm_lab/embedding_cache.py; ``tokens`` is None there unless the cache stores them)."""
        if "vision_pooled" in batch:
            if self.caption_head is not None and "vision_tokens" not in batch:
                raise ConfigError("the embedding cache served no image tokens, which the caption head needs; "
                                  "set embedding_cache.tokens=true")
            return TowerOutput(pooled=batch["vision_pooled"], tokens=batch.get("vision_tokens"))
        return self.vision_tower_output(batch["pixel_values"])

    def _image_embedding(self, vision: TowerOutput, normalize: bool = True) -> torch.Tensor:
        # CoCa pools the image tokens with a 1-query attentional pooler; CLIP uses the tower's pooled output.
        pooled = vision.pooled if self._contrastive_pooler is None else self.caption_head.pool_contrastive(vision.tokens)
        features = self.vision_head(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def _text_embedding(self, text: TowerOutput, normalize: bool = True) -> torch.Tensor:
        # The text tower's pooled output through the text head, as encode_text, training and evaluation share it.
        features = self.text_head(text.pooled)
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def _contrastive_pooler(self) -> torch.nn.Module | None:
        return None if self.caption_head is None else self.caption_head.contrastive_pooler

    @property
    def vision_outputs_cacheable(self) -> bool:
        """Whether training may read the vision tower's cached outputs instead of pixels
        (vlm_lab/embedding_cache.py): the tower is fully locked and no distillation teacher needs the pixels
        (there is none, or its cache serves its image features: vlm_lab/distillation.py)."""
        teacher_reads_pixels = self.distill_loss is not None and not (self._teacher is not None and self._teacher.images_cached)
        return self.vision_locked.fully_locked and not teacher_reads_pixels

    @property
    def needs_vision_tokens(self) -> bool:
        """Whether training reads the vision tower's tokens (the embedding cache must store them)."""
        return self.caption_head is not None

    @property
    def generation_settings(self) -> GenerationSettings:
        """``model.generation`` as saved in the hyperparameters (evaluation may swap it: see
        ``vlm_lab.api``), with defaults for keys an older checkpoint lacks."""
        return GenerationSettings.from_config(self.hparams.model.get("generation"))

    def generate(self, images: torch.Tensor, settings: GenerationSettings | None = None, **changes: Any) -> list[str]:
        """Captions for ``[B, 3, H, W]`` normalised images, decoded as ``settings`` say (default: the
        config's ``model.generation``) with ``changes`` on top: ``generate(pixels, num_beams=3)``.
        A misspelt setting fails at once, naming the closest (``vlm_lab.schema.GenerationSettings``)."""
        settings = (settings or self.generation_settings).replace(**changes)
        return generate_captions(self, self.vision_tower_output(images.to(self.device)).tokens, settings)

    def encode_text(self, text: Sequence[str] | torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """Captions (strings, or token ids with their mask) -> ``[T, embed_dim]`` text embeddings."""
        if not isinstance(text, torch.Tensor):
            tokens = self.tokenize(text)
            text, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        return self._text_embedding(self._text_output({"input_ids": text, "attention_mask": attention_mask}), normalize)

    def vision_tower_output(self, pixel_values: torch.Tensor) -> TowerOutput:
        """The vision tower's output; a fully locked tower runs without recording a graph.

        ``uint8`` pixels (``build_transform(..., normalize=False)``) are normalised here, on the
        module's device, to exactly what the float transform gives (``normalize_pixels``).
        """
        if pixel_values.dtype == torch.uint8:
            # In the weights' dtype, as Lightning's precision plugins convert float batches (64-true, bf16-true).
            weights_dtype = next(self.vision.parameters()).dtype
            pixel_values = normalize_pixels(pixel_values, self.image_config).to(weights_dtype)
        with torch.no_grad() if self.vision_locked.fully_locked else contextlib.nullcontext():
            return self.vision(pixel_values)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(captions), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    # ---------------------------------------------------------------------------------------------
    # Training

    def configure_model(self) -> None:
        # trainer.strategy: fsdp2 shards towers, heads and loss over the processes (vlm_lab/sharding.py);
        # any other strategy leaves the module as built. model.compile then compiles the towers (after
        # sharding, as FSDP2 asks; before the strategy wraps the module in DDP).
        configure_sharding(self)
        self.compile_towers()

    def train(self, mode: bool = True) -> "VisionLanguageModule":
        """Switch train/eval mode; locked parts stay in eval mode whatever ``mode`` is."""
        super().train(mode)
        self._keep_locked_parts_in_eval()
        return self

    def compile_towers(self) -> None:
        """``model.compile``: compile both towers with ``torch.compile`` (``model.compile_mode``), once.

        A Trainer calls this in ``configure_model`` (fit, validate, test), before DDP wraps the module; a
        plain training loop calls it itself. Towers are compiled in place (``nn.Module.compile``), not wrapped, so parameter names and
        state-dict keys stay as they are and checkpoints of compiled and eager runs are interchangeable.
        Compilation happens at the first forward pass (and again for each new input shape or grad mode).
        """
        compile_, mode = self.compile_settings
        if self._compiled or not compile_:
            return
        for tower in (self.vision, self.text):
            tower.compile(mode=mode)
        self._compiled = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A state dict saved from a module wrapped by torch.compile (rather than compiled in place, as
        # compile_towers does) has "_orig_mod." levels in its keys; they name the same parameters.
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {key.replace("_orig_mod.", ""): value
                                        for key, value in checkpoint["state_dict"].items()}

    def on_fit_start(self) -> None:
        # Known only now: what the trainer's accumulation and strategy mean for the contrastive batch.
        check_trainer(self.trainer, self.contrastive_chunks, self.loss is not None, self)

    def on_train_epoch_start(self) -> None:
        # Lightning restores the train/eval flags it captured before validation module by module,
        # bypassing train(); re-apply the locks at every epoch so no path leaves them in train mode.
        self._keep_locked_parts_in_eval()

    def on_train_start(self) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch (Lightning skips it).
        self._keep_locked_parts_in_eval()

    def _keep_locked_parts_in_eval(self) -> None:
        # train() also runs while __init__ is still building the towers, before anything is locked.
        for parts in (getattr(self, "vision_locked", None), getattr(self, "text_locked", None)):
            if parts is not None:
                parts.apply_eval_mode()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        loss, size = losses["loss"], len(batch["image_ids"])
        # Decided by all ranks together: a rank that skipped alone would never join the gradient
        # all-reduce (and the sync_dist logging below) that the other ranks wait in.
        if any_rank(not torch.isfinite(loss), loss.device):
            return self._nonfinite(loss)
        # Under DDP each rank's loss covers its share of the global batch and their mean is the loss
        # of the whole batch (what one process would log), so log that mean rather than rank 0's share.
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=size, sync_dist=True)
        if self.loss is not None:
            self.log("train/logit_scale", self.loss.logit_scale_value(), batch_size=size)
        return loss

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss`` (the weighted sum) and, with both heads built, ``contrastive_loss`` and ``caption_loss``.

        The batch holds one caption per image (training). The text tower runs once: its pooled output
        feeds the contrastive loss and its token states the caption decoder. With
        ``optim.contrastive_chunks: N`` the towers run on N chunks of the batch in turn, with gradient
        caching (vlm_lab/gradient_cache.py): the same loss and gradients, a fraction of the memory.
        """
        if self.contrastive_chunks > 1:
            encoded = cached_encode(self.encode_pairs, batch, self.contrastive_chunks, self._encoder_parameters(),
                                    freeze=self.frozen_outputs)
        else:
            encoded = self.encode_pairs(batch)
        terms: dict[str, torch.Tensor] = {}
        if self.loss is not None:
            terms["contrastive_loss"] = self.loss(encoded["image_features"], encoded["text_features"],
                                                  **self.loss_image_ids(batch["image_ids"]))
            if self.distill_loss is not None:  # on the whole batch's features, also with chunks
                terms["distill_loss"] = self._distillation(batch, encoded["image_features"], encoded["text_features"])
        if self.caption_head is not None:
            terms["caption_loss"] = self.caption_head.caption_loss_from_sum(encoded["caption_token_losses"],
                                                                            batch["attention_mask"])
        weights = {"contrastive_loss": self.contrastive_weight, "caption_loss": self.caption_weight,
                   "distill_loss": self.distill.weight}
        loss = sum(weights[name] * value for name, value in terms.items())
        if "unread_pooled" in encoded:
            loss = loss + encoded["unread_pooled"]
        return {"loss": loss, **terms} if len(terms) > 1 else {"loss": loss}

    def loss_image_ids(self, image_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the loss takes besides the features: the pairs' image ids for a multi-positive loss
        (``model.loss.multi_positive``: pairs of one image are each other's positives), else nothing."""
        return {"image_ids": image_ids} if getattr(self.loss, "multi_positive", False) else {}

    def encode_pairs(self, batch: dict[str, torch.Tensor], frozen: dict[str, TowerOutput] | None = None
                     ) -> dict[str, torch.Tensor]:
        """The part of the training loss that treats each pair on its own (what chunks may split).

        ``image_features`` and ``text_features`` (``[B, embed_dim]``, normalised) with a contrastive
        loss; ``caption_token_losses``, the caption cross-entropy summed over the batch's tokens, with a
        caption head. ``frozen`` holds tower outputs already computed (``frozen_outputs``).
        """
        frozen = frozen or {}
        vision = frozen["vision"] if "vision" in frozen else self.batch_vision_output(batch)
        text = frozen["text"] if "text" in frozen else self._text_output(batch)
        encoded: dict[str, torch.Tensor] = {}
        if self.loss is not None:
            encoded["image_features"] = self._image_embedding(vision)
            encoded["text_features"] = self._text_embedding(text)
        if self.caption_head is not None:
            logits = self.caption_head.decode(text.tokens, self.caption_head.pool_caption(vision.tokens))
            encoded["caption_token_losses"] = self.caption_head.caption_token_losses(
                logits, batch["input_ids"], batch["attention_mask"])
            if self._contrastive_pooler is not None or self.loss is None:
                # CoCa reads the vision tower's tokens, never its pooled output, so the parameters behind
                # only the pooled output (clip_vit's post_layernorm) would get no gradient, which DDP
                # refuses. A zero-weighted term gives them a zero gradient and changes nothing else.
                encoded["unread_pooled"] = 0.0 * vision.pooled.sum()
        return encoded

    def frozen_outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, TowerOutput]:
        """The outputs of towers with nothing to train: a fully locked tower, or the embedding cache's
        rows. The chunked step computes them once, without a graph, and never recomputes them."""
        frozen = {}
        if "vision_pooled" in batch or self.vision_locked.fully_locked:
            frozen["vision"] = self.batch_vision_output(batch)
        if self.text_locked.fully_locked:
            frozen["text"] = self._text_output(batch)
        return frozen

    def _text_output(self, batch: dict[str, torch.Tensor | None]) -> TowerOutput:
        """The text tower's output for ``input_ids`` and ``attention_mask`` (None: no padding); a fully
        locked tower runs without recording a graph."""
        with torch.no_grad() if self.text_locked.fully_locked else contextlib.nullcontext():
            return self.text(batch["input_ids"], batch["attention_mask"])

    def _encoder_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable weights ``encode_pairs`` uses: all but the loss's temperature and bias."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("loss.")]

    def set_teacher(self, teacher: torch.nn.Module) -> None:
        """Attach the frozen teacher ``model.distill`` distils from (``vlm_lab.interop.load_teacher(path)``;
        ``vlm_lab.build_module`` does this). It is frozen here and kept out of this module's parameters
        and state dict."""
        if self.distill_loss is None:
            raise ConfigError("set_teacher: this module was built without model.distill.teacher")
        self._teacher = Teacher(teacher, self.distill.teacher or "the teacher")

    @property
    def teacher(self) -> Teacher | None:
        """The attached distillation teacher (``set_teacher``), or None."""
        return self._teacher

    def _distillation(self, batch: dict[str, Any], image_features: torch.Tensor,
                      text_features: torch.Tensor) -> torch.Tensor:
        if self._teacher is None:
            raise ConfigError(f"model.distill.teacher={self.distill.teacher!r} is set but no teacher is attached; "
                              f"build the module with vlm_lab.build_module(cfg), or call "
                              f"module.set_teacher(vlm_lab.interop.load_teacher(path))")
        teacher_image, teacher_text, teacher_scale = self._teacher.features(batch, self.image_config)
        return self.distill_loss(image_features, text_features, self.loss.logit_scale_value(),
                                 teacher_image, teacher_text, teacher_scale)

    def _nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """A NaN/Inf loss on some rank: stop with a clear message, or skip the optimizer step
        (``optim.nonfinite_loss``). Every rank comes here together (see ``training_step``).

        Skipping returns the loss anyway, so backward runs as usual on every rank: DDP's gradient
        hooks and all-reduce happen as in any step (Lightning refuses a ``None`` loss under DDP), and
        ``on_before_optimizer_step`` then throws the gradients away.
        """
        step = self.trainer.global_step if self._trainer is not None else -1
        if self.optim_settings.nonfinite_loss == "error":
            value = loss.item() if not torch.isfinite(loss) else "non-finite on another rank"
            raise FloatingPointError(
                f"the training loss is {value} at step {step}{self._logit_scale_note()}; lower optim.lr, "
                f"check the data, or set "
                f"optim.nonfinite_loss=skip to skip such steps"
            )
        self.skipped_nonfinite_steps += 1
        self.log("train/skipped_nonfinite_steps", float(self.skipped_nonfinite_steps), batch_size=1)
        self._discard_gradients = True
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The second half of skipping a non-finite step: with no gradients the optimizer changes neither
        # the parameters nor its moments (gradient accumulation: the whole accumulated step is skipped).
        if self._discard_gradients:
            optimizer.zero_grad(set_to_none=True)
            self._discard_gradients = False

    def _logit_scale_note(self) -> str:
        return "" if self.loss is None else f" (logit scale {float(self.loss.logit_scale_value()):.3g})"

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_settings
        scale = dataclasses.asdict(cfg.lr_scale)
        groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            name = _unwrapped_name(name)
            # Biases, norm gains, embeddings of rank < 2 and temperatures must not shrink towards 0.
            decays = name not in self._no_decay_names
            lr_scale = scale.get(name.split(".", 1)[0], 1.0) * self._layer_lr_scales.get(name, 1.0)
            groups.setdefault((lr_scale, decays), []).append(parameter)
        # Decaying groups first. LambdaLR scales each group's own initial lr, so lr_scale holds throughout.
        optimizer = torch.optim.AdamW(
            # "name": how the lr_monitor callback labels the group's learning rate (train/lr/decay_x1).
            [{"params": params, "lr": cfg.lr * lr_scale, "weight_decay": cfg.weight_decay if decays else 0.0,
              "name": f"{'decay' if decays else 'no_decay'}_x{lr_scale:g}"}
             for (lr_scale, decays), params in sorted(groups.items(), key=lambda g: (not g[0][1], g[0][0]))],
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
            fused=_fused_adamw([p for params in groups.values() for p in params]),
        )
        # The schedule's length: estimating it reads the training loader (which also surfaces a bad training
        # file before the sanity check). Under a strategy that restores its checkpoint after setup (fsdp2)
        # reading it now would start the first pass before the data module gets its checkpointed position
        # back, so there it is asked for when a step first needs it.
        def length() -> int:
            return max(1, int(self.trainer.estimated_stepping_batches))

        total = length if self.trainer.strategy.restore_checkpoint_after_setup else length()
        schedule = cosine_with_warmup(cfg.warmup_steps, total, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    # ---------------------------------------------------------------------------------------------
    # Validation and test: the losses. The splits' retrieval and caption metrics (val/i2t_R@1,
    # val/cider...) come from the split evaluation, a callback (vlm_lab/eval/split_evaluation.py).

    def configure_callbacks(self) -> list[Callback]:
        # Every Trainer that fits, validates or tests this module (a notebook's own too) scores its splits.
        return [SplitEvaluation()]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor] | None:
        return self._evaluation_losses(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor] | None:
        return self._evaluation_losses(batch, "test")

    def _evaluation_losses(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor] | None:
        """Log ``<stage>/loss`` (the weighted sum, as in training) and, with both heads built, its
        ``contrastive_loss`` and ``caption_loss``, on the first caption of each image. Returns the
        embeddings of the images and of all their captions (with a contrastive loss), which the split
        evaluation scores retrieval with instead of encoding the batch again."""
        vision, text = self.batch_vision_output(batch), self._text_output(batch)
        size = len(batch["image_ids"])
        first = _first_caption_positions(batch["text_image_index"], size)
        terms: dict[str, torch.Tensor] = {}
        embeddings = None
        if self.loss is not None:
            embeddings = {"image_features": self._image_embedding(vision),
                          "text_features": self._text_embedding(text)}
            terms["contrastive_loss"] = self.loss(embeddings["image_features"], embeddings["text_features"][first],
                                                 **self.loss_image_ids(batch["image_ids"]))
        if self.caption_head is not None:
            input_ids, mask = batch["input_ids"][first], batch["attention_mask"][first]
            logits = self.caption_head.decode(text.tokens[first], self.caption_head.pool_caption(vision.tokens))
            # This rank's per-token mean: no collective, so ranks with unequal batch counts never wait.
            tokens = (mask[:, 1:] != 0).sum().clamp_min(1)
            terms["caption_loss"] = self.caption_head.caption_token_losses(logits, input_ids, mask) / tokens
        weights = {"contrastive_loss": self.contrastive_weight, "caption_loss": self.caption_weight}
        loss = sum(weights[name] * value for name, value in terms.items())
        for name, value in ({"loss": loss, **terms} if len(terms) > 1 else {"loss": loss}).items():
            self.log(f"{stage}/{name}", value, batch_size=size, sync_dist=True)
        return embeddings


def cosine_with_warmup(warmup_steps: int, total_steps: int | Callable[[], int], min_ratio: float):
    """LR multiplier: linear warm-up to 1, then a cosine decay to ``min_ratio`` at ``total_steps``.

    ``total_steps`` may be a function, called once, at the first step past the warm-up that needs it.
    """
    total: list[int] = [] if callable(total_steps) else [total_steps]

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step == warmup_steps:
            return 1.0  # the cosine's start, whatever the total
        if not total:
            total.append(total_steps())
        progress = min(1.0, (step - warmup_steps) / max(1, total[0] - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def _fused_adamw(parameters: list[torch.nn.Parameter]) -> bool | None:
    """True where torch's fused AdamW takes every parameter (plain float tensors on CPU or CUDA), else
    None (torch's default).

    The unfused update makes a dozen elementwise passes over every parameter: on the CPU, for a CLIP
    with its 49k-token embedding, that was 10-20% of a training step (benchmarks/vs_open_clip_throughput.py
    --profile); the fused kernel makes one.
    """
    fusable = all(type(p) is torch.nn.Parameter and type(p.data) is torch.Tensor and p.is_floating_point()
                  and p.device.type in ("cpu", "cuda") for p in parameters)
    return True if parameters and fusable else None


def _unwrapped_name(name: str) -> str:
    """A parameter's name without the module levels that FSDP, activation-checkpoint and torch.compile
    wrappers add."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _text_tower_and_tokenizer(model: ModelSettings, tokenizer: Any = None) -> tuple[torch.nn.Module, Any]:
    """The text tower and the tokenizer that feeds it (``tokenizer``, when given, is that tokenizer).

    A tower that takes ``vocab_size`` and is not given one is sized to the tokenizer. A tower with a
    vocabulary of its own (a pretrained checkpoint's, via ``init_from`` or ``clip_text_pretrained``)
    uses the checkpoint's tokenizer unless ``model.tokenizer.path`` names one, and no tokenizer may
    produce ids beyond the tower's vocabulary. ``model.tokenizer.train_from`` swaps in a word-level
    vocabulary built from a captions file (vlm_lab/tokenizer.py).
    """
    spec, path = model.text, model.tokenizer.path
    if model.tokenizer.train_from is not None and tokenizer is None:  # (the schema refuses it with path)
        path = str(word_tokenizer_dir(model.tokenizer.train_from, model.tokenizer.min_count))
    init_from = model.init_from
    if tokenizer is None and path is None and checkpoint_format.is_checkpoint_file(init_from):
        tokenizer = checkpoint_format.read_portable_model(init_from, "model.init_from").tokenizer()
    constructor, preset = registry.resolve("text_tower", spec["name"])
    takes_vocab = "vocab_size" in inspect.signature(constructor).parameters
    if takes_vocab and "vocab_size" not in spec and "vocab_size" not in preset:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        return registry.build("text_tower", {**spec, "vocab_size": len(tokenizer)}, contract=TextTower), tokenizer

    text = registry.build("text_tower", spec, contract=TextTower)
    if tokenizer is None:
        if path is None:
            source = init_from or getattr(text, "pretrained_path", None)
            path = getattr(text, "tokenizer_path", None)
            if source and path is None:
                raise ConfigError(f"model.tokenizer.path: {source} has no tokenizer files; set model.tokenizer.path "
                                  f"to the tokenizer its text tower was trained with (docs/how-to/pretrained-clip.md)")
        tokenizer = load_tokenizer(path)
    if text.vocab_size is not None and len(tokenizer) > text.vocab_size:
        raise ConfigError(f"model.tokenizer.path: the tokenizer has {len(tokenizer)} tokens but the text tower's "
                          f"vocabulary only {text.vocab_size}; use the tokenizer the tower was trained with")
    return text, tokenizer


def _first_caption_positions(owners: torch.Tensor, num_images: int) -> torch.Tensor:
    """For each image of a batch, the position of its first caption (captions come grouped)."""
    positions = torch.full((num_images,), len(owners), dtype=torch.long, device=owners.device)
    return positions.scatter_reduce(0, owners, torch.arange(len(owners), device=owners.device), "amin")
