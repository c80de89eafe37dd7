"""Contrastive losses for paired image and text embeddings: CLIP, ALIGN and SigLIP.

One class per loss, in the style of open_clip's ``loss.py``. Every loss owns its learnable
temperature (and SigLIP its bias), so swapping the loss in a config swaps those parameters too.

Common interface:

* ``forward(image_features, text_features) -> Tensor``: a scalar loss for a batch of ``B`` pairs,
  ``[B, D]`` each, where row ``i`` of one matches row ``i`` of the other. The features must already
  be L2-normalised: the model normalises them once and reuses them for retrieval metrics, so the
  losses do not normalise again.
* ``multi_positive``: when true, ``forward`` also takes ``image_ids`` (``[B]``, the batch's dataset-wide
  image ids) and every pair whose image is the same counts as a positive, not only pair ``i`` with
  itself (see :func:`_positives`); the module passes them only to a loss that sets it.
* ``logit_scale_value() -> Tensor``: the multiplier the loss currently applies to cosine
  similarities (for logging; the training loop also compares it across losses).
* ``no_weight_decay() -> set[str]``: names of the loss's parameters. Decaying a temperature towards
  zero would pull the logits towards uniform, so the optimiser leaves these out of weight decay.

Under data parallelism the losses score the local batch against features gathered from every rank
(see :mod:`vlm_lab.distributed`). Each rank's loss is scaled so that the mean over ranks is the loss
of the whole global batch, and DDP's averaged gradients are its exact gradient (tested against one
process in ``tests/test_distributed.py``). Logits and losses are always computed in float32 (or
float64 for a float64 model), never lower: with bf16 a scale of 100 times a similarity near 1 has a
rounding step near 0.5, which swamps the differences the softmax is meant to separate.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_lab.distributed import all_gather_batch, gather_features, neighbour_exchange, scale_gradient, world_info
from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_loss


def _at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is of a lower precision (fp16, bf16); float64 stays float64."""
    return tensor.float() if tensor.is_floating_point() and tensor.dtype.itemsize < 4 else tensor


def _float32(
    image_features: Tensor, text_features: Tensor
) -> tuple[contextlib.AbstractContextManager, Tensor, Tensor]:
    """A region where matmuls stay in float32 even inside the trainer's autocast, plus fp32 inputs."""
    device_type = image_features.device.type
    if torch.amp.is_autocast_available(device_type):
        region = torch.autocast(device_type=device_type, enabled=False)
    else:  # e.g. "meta": no autocast to switch off, and torch.autocast would reject the device
        region = contextlib.nullcontext()
    return region, _at_least_float32(image_features), _at_least_float32(text_features)


def _positives(loss: str, image_ids: Tensor | None, batch: int, local_rows: bool) -> Tensor:
    """``[rows, columns]`` booleans: which columns share the row's image (multi-positive losses).

    Columns are the global batch (every rank's ids, gathered in rank order as the features are);
    rows are this rank's pairs (``local_rows``) or the global batch too. The ids are gathered on every
    rank and every step, so all ranks run the same collectives whatever their batches hold. Each row's
    own pair is always among its positives; with no image twice in the global batch, the positives
    are exactly the one-positive losses' labels.
    """
    if image_ids is None or tuple(image_ids.shape) != (batch,):
        got = "none" if image_ids is None else f"shape {tuple(image_ids.shape)}"
        raise ValueError(f"{loss} loss: multi_positive needs the image id of each of the {batch} pairs "
                         f"(image_ids=batch['image_ids']), got {got}")
    all_ids = all_gather_batch(image_ids, gather_with_grad=False)
    rows = image_ids if local_rows else all_ids
    return rows[:, None] == all_ids[None, :]


def _soft_targets(labels: Tensor, positives: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The cross-entropy target of each row: ``labels`` (one positive, today's loss bit for bit), or,
    when some row has more than one positive, a distribution uniform over that row's positives."""
    if positives is None or int(positives.sum()) == len(positives):  # one sync: a host-side decision
        return labels
    positives = positives.to(dtype)
    return positives / positives.sum(dim=1, keepdim=True)


def _contrastive_similarities(
    image_features: Tensor, text_features: Tensor, local_loss: bool, gather_with_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine similarities for a symmetric contrastive loss, and the positive column of each row.

    Returns ``(sim_per_image, sim_per_text, labels)``. On one process both matrices are ``[B, B]``
    and the positives lie on the diagonal. With ``world`` ranks:

    * ``local_loss=True``: the local ``B`` rows against all ``world * B`` columns; this rank's
      positives sit in its own block of columns, hence the ``rank * B`` offset. Each rank computes a
      ``B x world*B`` slice instead of the whole matrix, and the mean over ranks (which DDP's gradient
      averaging takes) equals the global loss.
    * ``local_loss=False``: every rank computes the full ``world*B x world*B`` matrix, so each rank's
      loss is already the global loss. ``world`` times the compute; kept for parity with open_clip.

    Gradients are exact (equal to one process on the global batch, after DDP averages them) in
    every mode with ``gather_with_grad=True``, and in global mode without it: there a rank's own,
    tracked slot receives the whole gradient of the global loss, which DDP would then divide by
    ``world``, so it is scaled back up. Local mode without ``gather_with_grad`` is an approximation
    (a rank's features miss the gradient of the other ranks' rows), as in open_clip.
    """
    rank, world_size = world_info()
    batch = image_features.shape[0]
    if world_size == 1:
        sim_per_image = image_features @ text_features.T
        labels = torch.arange(batch, device=image_features.device)
        return sim_per_image, sim_per_image.T, labels

    if not local_loss and not gather_with_grad:
        image_features = scale_gradient(image_features, world_size)
        text_features = scale_gradient(text_features, world_size)
    all_images, all_texts = gather_features(image_features, text_features, gather_with_grad)
    if local_loss:
        sim_per_image = image_features @ all_texts.T
        sim_per_text = text_features @ all_images.T
        labels = torch.arange(batch, device=image_features.device) + rank * batch
    else:
        sim_per_image = all_images @ all_texts.T
        sim_per_text = sim_per_image.T
        labels = torch.arange(all_images.shape[0], device=image_features.device)
    return sim_per_image, sim_per_text, labels


def _parameter_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters()}


@register_loss("clip")
class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE: cross-entropy over texts for each image and over images for each text.

    ``logits = exp(logit_scale) * image @ text.T`` with a learnable ``logit_scale`` initialised at
    ``log(1 / 0.07)``. The applied scale is capped at ``max_logit_scale`` (100, as in CLIP), beyond
    which the softmax is nearly one-hot and training becomes unstable. The cap is an out-of-place
    clamp in ``forward``: past it the parameter gets no gradient, and the stored value is never
    modified behind the optimiser's back.

    ``multi_positive``: a row's target is uniform over every column of the same image (captions of
    one image drawn into one batch are not scored as each other's negatives); with no image twice in
    the global batch the loss is the one-positive loss, computed by the same code.
    """

    def __init__(
        self,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        learnable_scale: bool = True,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        multi_positive: bool = False,
    ) -> None:
        super().__init__()
        if max_logit_scale <= 0:
            raise ConfigError(f"clip loss: max_logit_scale must be positive, got {max_logit_scale}")
        # A frozen scale stays a (non-trainable) parameter so checkpoints have the same keys.
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learnable_scale)
        self.max_logit_scale = float(max_logit_scale)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.multi_positive = multi_positive

    def logit_scale_value(self) -> Tensor:
        """The multiplier applied to similarities: ``exp(logit_scale)``, at most ``max_logit_scale``."""
        return _at_least_float32(self.logit_scale).clamp(max=math.log(self.max_logit_scale)).exp()

    def no_weight_decay(self) -> set[str]:
        return _parameter_names(self)

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """``image_ids`` (``[B]``): with ``multi_positive``, pairs of one image are each other's positives."""
        positives = _positives("clip", image_ids, len(image_features), self.local_loss) if self.multi_positive else None
        region, image_features, text_features = _float32(image_features, text_features)
        with region:
            sim_per_image, sim_per_text, labels = _contrastive_similarities(
                image_features, text_features, self.local_loss, self.gather_with_grad
            )
            # Both directions share the targets: text i's image is image i, so the mask is the same.
            targets = _soft_targets(labels, positives, sim_per_image.dtype)
            scale = self.logit_scale_value()
            return (
                F.cross_entropy(scale * sim_per_image, targets) + F.cross_entropy(scale * sim_per_text, targets)
            ) / 2


@register_loss("align")
class AlignLoss(nn.Module):
    """ALIGN's symmetric contrastive loss with label smoothing and a learnable temperature.

    Matches Hugging Face's ``AlignModel``: ``logits = image @ text.T / temperature`` with
    ``temperature`` initialised at 1.0, and the mean of the image-to-text and text-to-image
    cross-entropies, each with ``label_smoothing=0.1``. The temperature used is clamped from below at
    ``min_temperature``, because nothing else stops it collapsing to zero (or below, where the loss
    flips sign) as it sharpens the softmax. ``multi_positive`` as for :class:`ClipLoss`.
    """

    def __init__(
        self,
        init_temperature: float = 1.0,
        label_smoothing: float = 0.1,
        min_temperature: float = 0.01,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        multi_positive: bool = False,
    ) -> None:
        super().__init__()
        if init_temperature <= 0 or min_temperature <= 0:
            raise ConfigError(
                f"align loss: temperatures must be positive, got init_temperature={init_temperature}, "
                f"min_temperature={min_temperature}"
            )
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"align loss: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.temperature = nn.Parameter(torch.tensor(float(init_temperature)))
        self.label_smoothing = float(label_smoothing)
        self.min_temperature = float(min_temperature)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.multi_positive = multi_positive

    def effective_temperature(self) -> Tensor:
        return _at_least_float32(self.temperature).clamp(min=self.min_temperature)

    def logit_scale_value(self) -> Tensor:
        """The multiplier applied to cosine similarities: ``1 / temperature``."""
        return 1.0 / self.effective_temperature()

    def no_weight_decay(self) -> set[str]:
        return _parameter_names(self)

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """``image_ids`` (``[B]``): with ``multi_positive``, pairs of one image are each other's positives
        (the smoothing then mixes the uniform distribution into the one over the positives)."""
        positives = _positives("align", image_ids, len(image_features), self.local_loss) if self.multi_positive else None
        region, image_features, text_features = _float32(image_features, text_features)
        with region:
            sim_per_image, sim_per_text, labels = _contrastive_similarities(
                image_features, text_features, self.local_loss, self.gather_with_grad
            )
            targets = _soft_targets(labels, positives, sim_per_image.dtype)
            # Divide rather than multiply by 1/temperature, as Hugging Face does, to match it bit for bit.
            temperature, smoothing = self.effective_temperature(), self.label_smoothing
            image_loss = F.cross_entropy(sim_per_image / temperature, targets, label_smoothing=smoothing)
            text_loss = F.cross_entropy(sim_per_text / temperature, targets, label_smoothing=smoothing)
            return (image_loss + text_loss) / 2


@register_loss("siglip")
class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023), as open_clip's ``SigLipLoss``.

    Every image-text pair is an independent binary problem: ``logits = exp(logit_scale) * image @
    text.T + logit_bias``, label +1 for matching pairs and -1 otherwise, and the loss is
    ``-sum(logsigmoid(label * logits)) / batch``. The bias starts at -10 because almost all pairs
    are negatives; starting at 0 would spend the first steps just learning that.

    Distributed, the local images are scored against the texts of every rank, one block of texts
    per rank, with positives only in this rank's own block. ``exchange`` says how the texts travel:

    * ``"gather"``: one all-gather of all text blocks (``gather_with_grad`` as for CLIP);
    * ``"neighbour"``: open_clip's neighbour exchange: ``world - 1`` steps round a ring of
      point-to-point sends, each passing one block on, so a rank never holds all blocks' features
      at once and the transfers are between neighbours only. Gradients always travel back.

    Both give the same loss and the same (exact) gradients; dividing by the local batch makes the
    mean over ranks equal to the loss of the global batch. ``multi_positive``: every pair of one image
    (in any rank's block) is labelled +1, not only the diagonal.
    """

    def __init__(
        self,
        init_logit_scale: float = math.log(10),
        init_logit_bias: float = -10.0,
        max_logit_scale: float = 100.0,
        exchange: Literal["gather", "neighbour"] = "gather",
        gather_with_grad: bool = True,
        multi_positive: bool = False,
    ) -> None:
        super().__init__()
        if max_logit_scale <= 0:
            raise ConfigError(f"siglip loss: max_logit_scale must be positive, got {max_logit_scale}")
        if exchange not in ("gather", "neighbour"):
            raise ConfigError(f"siglip loss: exchange must be 'gather' or 'neighbour', got {exchange!r}")
        if exchange == "neighbour" and not gather_with_grad:
            raise ConfigError(
                "siglip loss: gather_with_grad: false applies to exchange: gather only "
                "(the neighbour exchange always sends gradients back)"
            )
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_logit_scale = float(max_logit_scale)
        self.exchange = exchange
        self.gather_with_grad = gather_with_grad
        self.multi_positive = multi_positive

    def logit_scale_value(self) -> Tensor:
        """The multiplier applied to similarities: ``exp(logit_scale)``, at most ``max_logit_scale``."""
        return _at_least_float32(self.logit_scale).clamp(max=math.log(self.max_logit_scale)).exp()

    def no_weight_decay(self) -> set[str]:
        return _parameter_names(self)

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """``image_ids`` (``[B]``): with ``multi_positive``, every pair of one image is labelled +1."""
        rank, world_size = world_info()
        if self.multi_positive:  # [B, world * B] -> one [B, B] block of positives per rank's texts
            positive_blocks = _positives("siglip", image_ids, len(image_features), local_rows=True).chunk(world_size, 1)
        else:  # the block of this rank's own texts: row i matches column i
            positive_blocks = tuple(owner == rank for owner in range(world_size))
        region, image_features, text_features = _float32(image_features, text_features)
        with region:
            if self.exchange == "neighbour":
                # Start with this rank's own texts; step k holds the block of rank (rank - k) mod world.
                total = self._block_loss(image_features, text_features, positive_blocks[rank])
                texts = text_features
                for step in range(1, world_size):
                    texts = neighbour_exchange(texts)
                    total = total + self._block_loss(image_features, texts, positive_blocks[(rank - step) % world_size])
            else:
                blocks = all_gather_batch(text_features, self.gather_with_grad).chunk(world_size)
                total = sum(
                    self._block_loss(image_features, block, positive_blocks[owner])
                    for owner, block in enumerate(blocks)
                )
            return total / image_features.shape[0]

    def _block_loss(self, image_features: Tensor, text_features: Tensor, positives: bool | Tensor) -> Tensor:
        """``-sum(logsigmoid(label * logits))`` of local images against one rank's block of texts.

        ``positives``: True for this rank's own block (row i matches column i), False for another
        rank's, or the block's ``[B, B]`` mask of same-image pairs (multi-positive)."""
        logits = self.logit_scale_value() * image_features @ text_features.T + _at_least_float32(self.logit_bias)
        labels = -torch.ones_like(logits)
        if isinstance(positives, Tensor):
            labels.masked_fill_(positives, 1.0)
        elif positives:
            labels.diagonal().fill_(1.0)
        return -F.logsigmoid(labels * logits).sum()


class SimilarityDistillation(nn.Module):
    """Distillation from a teacher CLIP: KL(teacher || student) between image-text similarity distributions.

    open_clip's ``DistillClipLoss`` term (Li et al.'s recipe behind ``--distill``): each image's softmax
    over the batch's texts, and each text's over the images, as the student scores them
    (``student_scale * image @ text.T``), are pulled towards the teacher's (its own features and
    scale), and the two directions are averaged. open_clip reports the cross-entropy
    ``-sum(p_teacher * log p_student)``; this is that minus the teacher's entropy, a constant for the
    student, so the gradients are the same and the value is 0 when the student agrees with the teacher.

    Distributed, it scores the local rows against every rank's columns, as ``ClipLoss`` with
    ``local_loss`` does (the teacher's features gathered without a graph), so the mean over ranks is
    the loss of the global batch. Not a registry loss: it is added to the contrastive loss, not chosen
    instead of it (``model.distill``; ``vlm_lab/distillation.py``).
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                teacher_image_features: Tensor, teacher_text_features: Tensor, teacher_logit_scale: Tensor) -> Tensor:
        """All features L2-normalised, ``[B, D]`` (the teacher's ``D`` may differ); scales are multipliers."""
        region, image_features, text_features = _float32(image_features, text_features)
        _, teacher_image_features, teacher_text_features = _float32(teacher_image_features, teacher_text_features)
        with region:
            per_image, per_text, _ = _contrastive_similarities(image_features, text_features, self.local_loss,
                                                               self.gather_with_grad)
            teacher_per_image, teacher_per_text, _ = _contrastive_similarities(
                teacher_image_features.detach(), teacher_text_features.detach(), self.local_loss, False)
            scale, teacher_scale = _at_least_float32(logit_scale), _at_least_float32(teacher_logit_scale).detach()
            return (_kl_rows(teacher_scale * teacher_per_image, scale * per_image)
                    + _kl_rows(teacher_scale * teacher_per_text, scale * per_text)) / 2


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher row) || softmax(student row))."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)
