"""Contrastive batches larger than memory, exactly: gradient caching (GradCache, Gao et al. 2021).

A contrastive loss couples every pair of a batch with every other, so the batch cannot be cut
into independent pieces the way Lightning's ``accumulate_grad_batches`` cuts it (that trains N
small contrastive problems, each with N times fewer negatives). What *does* split is the towers:
a pair's embedding depends on that pair only. ``optim.contrastive_chunks: N`` therefore trains on
the whole batch of ``B`` pairs while holding the autograd graph of only ``B / N`` pairs at a time:

1. **First pass, no graph.** Each chunk runs through the towers and heads without recording a
   graph; only its embeddings are kept (``B x D`` in all). The random state each chunk started
   from is saved, so that step 3 draws the same dropout masks.
2. **The loss on the whole batch.** The embeddings enter the loss exactly as an unchunked step's
   would (with the distributed gather, so the negatives are ``B x world size``); the learnable
   temperature (and SigLIP's bias) get their gradient here. Backpropagating it stops at the
   embeddings: their gradient ``dL/de`` is the *cached gradient*.
3. **Second pass, one chunk at a time.** Each chunk runs again, with a graph, under its saved
   random state, and backpropagates its slice of the cached gradient into the weights. The chunk
   gradients add up to the full-batch gradient, because ``dL/dw = sum_i dL/de_i . de_i/dw`` and
   ``de_i/dw`` depends on pair ``i`` alone.

Steps 1 and 3 live in one ``torch.autograd.Function`` (:class:`_CachedEncode`): its forward is
step 1 and its backward is step 3, and autograd calls that backward after the loss's own backward
(step 2) has produced ``dL/de``. So the chunked step is a plain loss to whoever calls backward:
Lightning's automatic optimization, its precision plugins, gradient clipping, gradient
accumulation and the non-finite-loss guard need no change, and under DDP each weight receives its
gradient once (the Function returns the chunks' sum), so DDP's all-reduce runs once per step as
always. Per-pair outputs that are scalar sums (CoCa's per-token caption loss) are summed over the
chunks in step 1 and recomputed chunk by chunk in step 3 in the same way.

Parts with nothing to train (a fully locked tower, the embedding cache) are computed once, in
step 1 (``frozen``), and never recomputed. Memory: the chunk gradients are added into one
accumulator per weight as they are produced (tensor hooks), so besides one chunk's activations
the step holds one set of gradients, as an unchunked step does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from vlm_lab.errors import ConfigError

# The batch entries that hold one row per pair and feed the towers (vlm_lab/data/collate.py). Other
# entries (image ids, the caption-to-image index) are not needed to encode a pair.
PAIR_KEYS = ("pixel_values", "vision_pooled", "vision_tokens", "input_ids", "attention_mask")

Encode = Callable[[Mapping[str, Tensor], Mapping[str, Any]], dict[str, Tensor]]
Freeze = Callable[[Mapping[str, Tensor]], dict[str, Any]]


def chunk_rows(batch_size: int, chunks: int) -> list[slice]:
    """The rows of each chunk: ``chunks`` runs of consecutive rows whose sizes differ by at most one
    (as ``torch.tensor_split``), fewer when the batch has fewer rows than that; never an empty one.

    A batch need not divide evenly: an epoch's last batch is often smaller, and the loss sees the
    whole batch whatever the chunk sizes.
    """
    chunks = max(1, min(chunks, batch_size))
    base, extra = divmod(batch_size, chunks)
    bounds = [0]
    for index in range(chunks):
        bounds.append(bounds[-1] + base + (index < extra))
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def cached_encode(encode: Encode, batch: Mapping[str, Tensor], chunks: int, parameters: Sequence[Tensor],
                  freeze: Freeze | None = None) -> dict[str, Tensor]:
    """``encode(batch, frozen)`` computed chunk by chunk with gradient caching (module docstring).

    Args:
        encode: the per-pair part of the loss on a sub-batch: ``(sub_batch, frozen) -> {name: tensor}``
            where each tensor is either per pair (``[rows, ...]``, concatenated over the chunks) or a
            0-dim sum over the sub-batch's pairs (summed over the chunks). It must not mix pairs.
        batch: the batch; the entries in ``PAIR_KEYS`` are cut into chunks.
        chunks: how many chunks (at most one per row).
        parameters: the trainable weights ``encode`` uses; they receive the gradient in backward.
        freeze: what ``encode`` needs that has no trainable weight behind it (``(sub_batch) ->
            {name: value}``): computed once per chunk in the first pass, then reused.

    Returns the same dictionary ``encode(batch, freeze(batch))`` gives, differentiable in
    ``parameters``; its backward runs the second pass.
    """
    present = [key for key in PAIR_KEYS if key in batch]
    if not present:
        raise ValueError(f"cached_encode: the batch holds none of {', '.join(PAIR_KEYS)}")
    inputs = [{key: batch[key][rows] for key in present} for rows in chunk_rows(len(batch[present[0]]), chunks)]
    if len(inputs) == 1:  # a batch of one pair: nothing to split, no second pass to pay for
        return encode(inputs[0], freeze(inputs[0]) if freeze is not None else {})
    run = _ChunkedRun(encode, freeze, inputs, [p for p in parameters if p.requires_grad],
                      _device_of(batch[key] for key in present))
    outputs = _CachedEncode.apply(run, *run.parameters)
    return dict(zip(run.keys, outputs))


def check_trainer(trainer: Any, chunks: int, contrastive: bool, towers: torch.nn.Module) -> None:
    """What the trainer's setup does to a contrastive batch: one line each, when a fit starts.

    * ``trainer.accumulate_grad_batches > 1`` with a contrastive loss: a warning, not an error. It
      is a legitimate choice (N independent small contrastive problems per optimizer step) but rarely
      what was meant, and it silently changes the loss: the warning says so and names the exact option.
    * ``contrastive_chunks > 1`` under a strategy other than one device, DDP or vlm-lab's FSDP2
      (``trainer.strategy: fsdp2``, a ``ModelParallelStrategy``): ``ConfigError``. Under FSDP2 the
      second pass backpropagates each chunk into the shards' ``.grad`` through FSDP2's own hooks
      (``_ChunkedRun.second_pass``; tests/test_sharding.py checks it against DDP). Lightning's FSDP1
      and DeepSpeed strategies gather and free weights by hooks of their own that are untested here,
      so they are refused.
    * ``contrastive_chunks > 1`` with BatchNorm layers that train: a warning. They normalise over each
      chunk, not the batch, so the chunked step is no longer exactly the unchunked one (as with
      Lightning's accumulation, and open_clip's --accum-freq), and their running statistics are
      updated in both passes.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy
    from lightning.pytorch.utilities import rank_zero_warn

    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1))
    if contrastive and accumulate > 1:
        rank_zero_warn(f"trainer.accumulate_grad_batches={accumulate} trains {accumulate} separate contrastive problems "
                       f"per step, each with {accumulate}x fewer negatives than one batch of {accumulate}x the size; "
                       f"for that batch, raise the data's batch_size {accumulate}x and set "
                       f"optim.contrastive_chunks={accumulate} (docs/how-to/contrastive-chunks.md)")
    if chunks == 1:
        return
    strategy = trainer.strategy
    supported = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
    if not isinstance(strategy, supported) or isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError(f"optim.contrastive_chunks={chunks} works with one device, the DDP strategies or "
                          f"trainer.strategy=fsdp2, not {type(strategy).__name__}; set optim.contrastive_chunks=1 "
                          f"or trainer.strategy=ddp|fsdp2")
    batch_norm = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    batch_norms = [name for name, m in towers.named_modules() if isinstance(m, batch_norm) and m.training]
    if batch_norms:
        rank_zero_warn(f"optim.contrastive_chunks={chunks}: {len(batch_norms)} BatchNorm layers in training mode "
                       f"(e.g. {batch_norms[0]}) normalise over each chunk, not over the batch, so the chunked step "
                       f"differs from the unchunked one; lock them (freeze_bn_stats) for an exact step")


# --------------------------------------------------------------------------------------------------
# The two passes


@dataclass
class _Chunk:
    inputs: dict[str, Tensor]
    rows: slice = field(default_factory=lambda: slice(0))
    frozen: dict[str, Any] = field(default_factory=dict)
    random_state: "_RandomState | None" = None


class _ChunkedRun:
    """One chunked step's state between the first pass (forward) and the second (backward)."""

    def __init__(self, encode: Encode, freeze: Freeze | None, inputs: list[dict[str, Tensor]],
                 parameters: list[Tensor], device: torch.device) -> None:
        self.encode, self.freeze, self.parameters, self.device = encode, freeze, parameters, device
        self.chunks = [_Chunk(chunk_inputs) for chunk_inputs in inputs]
        self.keys: list[str] = []
        self.summed: set[str] = set()
        # The second pass runs in backward, outside the trainer's autocast region (bf16-mixed): it
        # re-enters the region the first pass ran in, as torch.utils.checkpoint does.
        self.autocast = {"device_type": device.type, "enabled": torch.is_autocast_enabled(device.type),
                         "dtype": torch.get_autocast_dtype(device.type),
                         "cache_enabled": torch.is_autocast_cache_enabled()}

    def first_pass(self) -> tuple[Tensor, ...]:
        """Every chunk without a graph; the per-pair outputs concatenated, the sums added up."""
        results: list[dict[str, Tensor]] = []
        start = 0
        for chunk in self.chunks:
            rows = len(next(iter(chunk.inputs.values())))
            chunk.rows, start = slice(start, start + rows), start + rows
            chunk.frozen = self.freeze(chunk.inputs) if self.freeze is not None else {}
            # Saved after the frozen parts ran, right where the second pass starts drawing.
            chunk.random_state = _RandomState.capture(self.device)
            results.append(self.encode(chunk.inputs, chunk.frozen))
        self.keys = list(results[0])
        self.summed = {key for key in self.keys if results[0][key].ndim == 0}
        for key in self.keys:
            for result, chunk in zip(results, self.chunks):
                if result.keys() != results[0].keys():
                    raise ValueError(f"cached_encode: the chunks returned different outputs: "
                                     f"{sorted(result)} and {sorted(results[0])}")
                value = result[key]
                if key not in self.summed and len(value) != chunk.rows.stop - chunk.rows.start:
                    raise ValueError(f"cached_encode: output {key!r} has {len(value)} rows for a chunk of "
                                     f"{chunk.rows.stop - chunk.rows.start} pairs (neither per pair nor a 0-dim sum)")
        return tuple(torch.stack([r[key] for r in results]).sum(0) if key in self.summed
                     else torch.cat([r[key] for r in results]) for key in self.keys)

    def second_pass(self, gradients: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Every chunk again, with a graph, backpropagating its slice of the cached gradients;
        returns the weights' gradients summed over the chunks (None for a weight none of them used)."""
        outer = _RandomState.capture(self.device)
        sharded = any(isinstance(p, DTensor) for p in self.parameters)
        # Sharded, the gradients land in the shards' .grad (FSDP2's hooks): nothing to add up here.
        sums = None if sharded else _GradientSums(self.parameters)
        try:
            with torch.enable_grad(), torch.autocast(**self.autocast), sums or contextlib.nullcontext():
                for chunk in self.chunks:
                    chunk.random_state.restore()
                    outputs = self.encode(chunk.inputs, chunk.frozen)
                    pairs = [(outputs[key], gradient if key in self.summed else gradient[chunk.rows])
                             for key, gradient in zip(self.keys, gradients)
                             if gradient is not None and outputs[key].requires_grad]
                    if pairs and self.parameters and sharded:
                        # FSDP2 (vlm_lab/sharding.py): the chunk's forward ran on the gathered weights,
                        # which are not the DTensor parameters autograd.grad would be asked about; its
                        # backward hooks reduce-scatter the gathered weights' gradients into the
                        # shards' .grad, adding to what earlier chunks left there (FSDP2 accumulates).
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                    elif pairs and self.parameters:
                        # autograd.grad rather than backward: nothing lands in .grad (DDP's hooks
                        # must see each weight once, when the outer backward receives the sums).
                        torch.autograd.grad([o for o, _ in pairs], self.parameters, [g for _, g in pairs],
                                            allow_unused=True)
                    del outputs, pairs  # this chunk's graph is gone before the next one is built
                return [None] * len(self.parameters) if sums is None else sums.result()
        finally:
            outer.restore()  # the recomputation leaves the caller's random streams as it found them


class _CachedEncode(torch.autograd.Function):
    """Forward: the first pass. Backward: the second pass, given the loss's gradient for each output."""

    @staticmethod
    def forward(ctx: Any, run: _ChunkedRun, *parameters: Tensor) -> tuple[Tensor, ...]:
        ctx.run = run
        ctx.set_materialize_grads(False)  # an output the loss did not use gets None: nothing to recompute
        return run.first_pass()

    @staticmethod
    def backward(ctx: Any, *gradients: Tensor | None) -> tuple[Tensor | None, ...]:
        run, ctx.run = ctx.run, None  # the chunks' inputs and frozen outputs are freed with this step
        return (None, *run.second_pass(gradients))


class _GradientSums:
    """Adds each weight's gradient from every chunk into one tensor, as the gradients are produced.

    ``torch.autograd.grad`` would otherwise hold all of a chunk's weight gradients until it returns,
    on top of the sums: a second copy of the gradients. A tensor hook on each weight takes its
    gradient the moment it exists, adds it in and hands autograd a zero that occupies no memory
    (an expanded scalar), which is what ``autograd.grad`` then returns and the caller drops.
    """

    def __init__(self, parameters: Sequence[Tensor]) -> None:
        self.parameters = list(parameters)
        self.sums: list[Tensor | None] = [None] * len(self.parameters)
        self.handles: list[Any] = []

    def __enter__(self) -> "_GradientSums":
        self.handles = [p.register_hook(self._hook(index)) for index, p in enumerate(self.parameters)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, index: int) -> Callable[[Tensor], Tensor]:
        def add(gradient: Tensor) -> Tensor:
            if self.sums[index] is None:
                # A copy: autograd may hand the same tensor to other nodes of this graph.
                self.sums[index] = gradient.clone()
            else:
                self.sums[index].add_(gradient)
            return torch.zeros((), dtype=gradient.dtype, device=gradient.device).expand_as(gradient)

        return add

    def result(self) -> list[Tensor | None]:
        sums, self.sums = self.sums, []  # no reference left here: the weight's .grad can take the tensor
        return sums


# --------------------------------------------------------------------------------------------------
# Random state


@dataclass
class _RandomState:
    """The CPU generator's state and, on an accelerator, that device's (dropout draws from it)."""

    cpu: Tensor
    device: torch.device
    accelerator: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> "_RandomState":
        module = _accelerator_module(device)
        return cls(torch.get_rng_state(), device, module.get_rng_state(device) if module is not None else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            _accelerator_module(self.device).set_rng_state(self.accelerator, self.device)


def _accelerator_module(device: torch.device) -> Any:
    """``torch.cuda`` (``torch.xpu``, ``torch.mps``...) for a tensor on that device; None on the CPU."""
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "get_rng_state"):
        raise RuntimeError(f"cached_encode: cannot save the random state of a {device.type} device")
    return module


def _device_of(tensors: Iterator[Tensor]) -> torch.device:
    """Where the towers run: the first batch tensor not on the CPU, else the CPU."""
    devices = [t.device for t in tensors]
    return next((d for d in devices if d.type != "cpu"), devices[0])

