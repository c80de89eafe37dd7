"""Handing pixel batches from loader workers to the main process through reused shared memory.

PyTorch's DataLoader puts every batch a worker stacks into fresh shared memory: the kernel faults in
and zeroes its pages in the worker (19 MB for 32 float images at 224 px), and the main process maps
the memory and later unmaps and frees it. For small images that costs as much as loading them, and
two workers on two cores then load little faster than none (benchmarks/README.md, "Data throughput").

:class:`WorkerSlots` hands pixels over in a fixed pool of shared-memory slots instead, each slot the
size of a batch, allocated before the workers start, so its pages are faulted in once and then
reused:

- a worker stacks a batch's pixels into a free slot of its own (worker ``i`` owns slots
  ``i * per_worker`` to ``(i + 1) * per_worker - 1``) and sends a small :class:`SlotTicket` in
  their place;
- the main process turns the ticket into a tensor over the slot's memory, without a copy
  (:meth:`WorkerSlots.receive`);
- the slot is free again when the last tensor using that memory (the batch's, or any view of it) is
  gone: the tensor is built on a numpy array that carries a finalizer. A batch kept by the caller
  therefore stays intact; its worker uses its other slots meanwhile.

A worker that finds none of its slots free, or a batch that does not fit in a slot, gets PyTorch's own
hand-off, so this never blocks and never changes what a batch contains.

The workers also keep the memory they free (:func:`keep_freed_memory`): without a batch-sized
allocation of their own, glibc gives the few hundred KB each image's tensors take back to the kernel
after every image and faults it in again for the next, which doubled the cost of ``ToTensor``.

The batch's small tensors (token ids, masks, indices) travel by value, as numpy arrays pickled into
the worker's result pipe: PyTorch would give each its own shared memory, whose file descriptor the
main process fetches over a socket. With the pixels' fresh shared memory, PyTorch's hand-off costs
the main process 0.13-0.15 ms of CPU per image, this one 0.02 (``benchmarks/data_throughput.py``).

Leases: a worker marks the slot it fills with the loader's pass number, and the main process clears
it. A batch that is never received (its pass abandoned by ``break`` or ``limit_train_batches``) would
hold its slot forever. Loaders whose workers start afresh each pass get a new pool each pass (the old
one is freed with the last tensor using it); loaders with persistent workers keep one pool, and a new
pass, or the end of a whole pass, frees the slots earlier passes leased and no tensor holds (see
:meth:`WorkerSlots.start_pass` and :meth:`WorkerSlots.receive`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

log = logging.getLogger(__name__)

# Tensors up to this size travel by value (see above); bigger ones as PyTorch sends them.
INLINE_BYTES = 1 << 20
# glibc's mallopt parameters, and the values a worker sets (see keep_freed_memory).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD = 32 << 20, 64 << 20
# The pool may take at most this share of the free shared memory (/dev/shm); beyond it the loader
# uses PyTorch's hand-off, which needs only the batches in flight.
MAX_SHARED_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class SlotTicket:
    """What a worker sends in place of a batch's pixels: which slot holds them, and their layout."""

    slot: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InlineArray:
    """A small tensor sent by value: numpy arrays pickle their bytes, tensors their shared memory."""

    array: np.ndarray


class SlotPool:
    """The shared memory behind a :class:`WorkerSlots`: ``slots`` slots of ``slot_bytes`` bytes each.

    ``leases[s]`` is 0 when slot ``s`` is free, else the number of the pass whose worker filled it.
    Both tensors are shared memory, allocated without touching their pages (as ``default_collate``
    allocates its batches), so slots a loader never fills cost no memory.
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        # Lightning starts evaluation passes under inference mode; tensors made there could not be
        # written outside it (by the workers, and by the finalizers that free slots).
        with torch.inference_mode(False):
            self.memory = _shared_bytes(slots * slot_bytes)
            self.leases = torch.zeros(slots, dtype=torch.int64).share_memory_()
        self.held: set[int] = set()  # main process: slots a live tensor uses

    def view(self, ticket: SlotTicket) -> torch.Tensor:
        """The slot's memory as a tensor of the ticket's dtype and shape (no copy)."""
        nbytes = _nbytes(ticket.dtype, ticket.shape)
        start = ticket.slot * self.slot_bytes
        return self.memory[start:start + nbytes].view(ticket.dtype).view(ticket.shape)

    def lend(self, ticket: SlotTicket) -> torch.Tensor:
        """A tensor over the ticket's slot that frees the slot when the last tensor using it is gone."""
        # torch.from_numpy keeps this very array alive for as long as any tensor shares its memory,
        # so the array's finalizer runs exactly when the slot is no longer in use.
        array = self.view(ticket).numpy()
        self.held.add(ticket.slot)
        weakref.finalize(array, self._release, ticket.slot)
        return torch.from_numpy(array)

    def free_unheld(self, before_pass: int | None = None) -> None:
        """Free the leases no tensor holds (only those taken before pass ``before_pass``, if given)."""
        for slot in range(len(self.leases)):
            # A worker leases only free slots, so no worker changes a lease between read and write.
            lease = int(self.leases[slot])
            if lease and slot not in self.held and (before_pass is None or lease < before_pass):
                self.leases[slot] = 0

    def _release(self, slot: int) -> None:
        self.held.discard(slot)
        self.leases[slot] = 0


class WorkerSlots:
    """Reused shared-memory slots for one loader's pixel batches (see the module docstring).

    Args:
        num_workers: the loader's worker count.
        slot_bytes: the largest pixel batch a slot takes, in bytes.
        per_worker: slots per worker: the batches a worker may have in flight or held by the caller
            before it falls back to PyTorch's hand-off (the DataLoader prefetches 2 per worker).
    """

    def __init__(self, num_workers: int, slot_bytes: int, per_worker: int = 4) -> None:
        if num_workers < 1 or per_worker < 1:
            raise ValueError(f"slots need at least one worker and one slot per worker, "
                             f"not num_workers={num_workers}, per_worker={per_worker}")
        self.num_workers, self.slot_bytes, self.per_worker = num_workers, slot_bytes, per_worker
        self.pool: SlotPool | None = None
        with torch.inference_mode(False):  # see SlotPool
            self._pass = torch.zeros(1, dtype=torch.int64).share_memory_()  # the workers stamp leases with it
        # True in the workers a SlotLoader starts (they inherit it, forked or pickled): see SlotLoader.
        self.armed = False
        self._warned = False
        self._tuned_process: int | None = None

    @classmethod
    def for_pixels(cls, num_workers: int, batch_size: int, image_size: tuple[int, int],
                   per_worker: int = 4) -> WorkerSlots | None:
        """Slots for batches of ``batch_size`` float32 (or smaller) ``[3, H, W]`` images, or None when
        there are no workers or no slots are wanted (``per_worker=0``)."""
        if num_workers < 1 or per_worker < 1:
            return None
        height, width = image_size
        return cls(num_workers, batch_size * 3 * height * width * 4, per_worker)

    # ---------------------------------------------------------------------------------------------
    # Main process

    def start_pass(self, fresh_workers: bool) -> SlotPool | None:
        """Call before a pass's iterator (and so any worker) is created; returns the pool to receive with.

        ``fresh_workers``: the pass starts new worker processes, which get a new pool. Otherwise the
        persistent workers keep theirs, whose slots leased by an earlier pass and held by no tensor
        are freed: their batches were dropped unreceived.
        """
        self._pass += 1
        if fresh_workers or self.pool is None:
            self.pool = self._new_pool()
        else:
            self.pool.free_unheld(before_pass=int(self._pass))
        return self.pool

    def receive(self, batches: Iterator[Any], pool: SlotPool | None) -> Iterator[Any]:
        """``batches`` with the values :meth:`pack` made of a dict batch's tensors turned back into tensors."""
        for batch in batches:
            if isinstance(batch, dict):
                batch = {key: _unpack(value, pool) for key, value in batch.items()}
            yield batch
        if pool is not None:
            # Every batch of the pass has arrived and the workers are idle: a lease no tensor holds
            # now is left from an abandoned pass.
            pool.free_unheld()

    def _new_pool(self) -> SlotPool | None:
        slots = self.num_workers * self.per_worker
        wanted = slots * self.slot_bytes
        free = _free_shared_memory()
        if free is not None and wanted > MAX_SHARED_MEMORY_SHARE * free:
            if not self._warned:
                self._warned = True
                log.warning("loader workers hand batches over as PyTorch does: %d slots of %.0f MB would take over "
                            "half the free shared memory (%.0f MB)", slots, self.slot_bytes / 2**20, free / 2**20)
            return None
        return SlotPool(slots, self.slot_bytes)

    # ---------------------------------------------------------------------------------------------
    # Loader workers

    def pack(self, batch: dict[str, Any], pixels: list[torch.Tensor], key: str = "pixel_values") -> dict[str, Any]:
        """``batch`` with ``pixels`` stacked under ``key``, made ready to send to the main process.

        In a loader worker the SlotLoader started, the pixels go into a free slot and the batch's small
        tensors become :class:`InlineArray` values; :meth:`receive` turns both back into tensors.
        Outside a worker the batch is returned as is, with the pixels stacked.
        """
        info = get_worker_info()
        if not self.armed or info is None or info.id >= self.num_workers:
            return {**batch, key: default_collate(pixels)}
        packed = {name: _inline(value) for name, value in batch.items()}
        return {**packed, key: self._stack(pixels, info.id)}

    def _stack(self, tensors: list[torch.Tensor], worker: int) -> torch.Tensor | SlotTicket:
        """In loader worker ``worker``: stack ``tensors`` into a free slot of its own and return the
        slot's ticket; with no slot free or a batch too big, ``default_collate`` them as PyTorch would."""
        first = tensors[0]
        shape = (len(tensors), *first.shape)
        if self.pool is None or first.dtype == torch.bfloat16 or _nbytes(first.dtype, shape) > self.slot_bytes:
            return default_collate(tensors)
        if self._tuned_process != os.getpid():  # once per worker process
            keep_freed_memory()
            self._tuned_process = os.getpid()
        leases = self.pool.leases
        for slot in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            if int(leases[slot]) == 0:
                leases[slot] = int(self._pass)
                ticket = SlotTicket(slot, first.dtype, shape)
                torch.stack(tensors, out=self.pool.view(ticket))
                return ticket
        return default_collate(tensors)


class SlotLoader(DataLoader):
    """A DataLoader whose workers hand pixels over through ``slots`` (None: as PyTorch does).

    ``slots`` must be the ones its ``collate_fn`` (or its dataset, for a stream that batches itself)
    stacks into. The arguments are DataLoader's, named, so Lightning can rebuild the loader with a
    ``DistributedSampler`` under DDP.
    """

    def __init__(self, dataset: Dataset, batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler: Sampler | None = None, batch_sampler: Sampler | None = None, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None, drop_last: bool = False,
                 generator: torch.Generator | None = None, persistent_workers: bool = False,
                 slots: WorkerSlots | None = None) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         drop_last=drop_last, generator=generator, persistent_workers=persistent_workers)
        self.slots = slots

    def __iter__(self) -> Iterator[Any]:
        if self.slots is None or self.num_workers == 0:
            return super().__iter__()
        # Before super().__iter__(), which starts the pass's workers (or resets persistent ones).
        pool = self.slots.start_pass(fresh_workers=not self.persistent_workers or self._iterator is None)
        # Only workers started here use the slots: those of another loader over the same dataset
        # (a plain DataLoader, say) hand batches over as PyTorch does.
        self.slots.armed = True
        try:
            batches = super().__iter__()
        finally:
            self.slots.armed = False
        return self.slots.receive(batches, pool)


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory in this process rather than give it back to the kernel.

    glibc unmaps a freed block above its mmap threshold and trims the heap's free top above its trim
    threshold, and it raises both as the process frees bigger blocks. A loader worker frees nothing
    bigger than one image's tensors, so it keeps returning that memory and faulting it back in, page
    by page, for the next image: ``ToTensor`` took 0.31 ms per 224 px image in a worker against 0.15
    in a main process, where freeing a 19 MB batch had raised the thresholds. Fixed thresholds of 32
    and 64 MB (a worker then holds on to at most that much freed memory) make the two the same.
    Without glibc (macOS, musl) this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)


def _inline(value: Any) -> Any:
    if (isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype != torch.bfloat16
            and not value.requires_grad and value.numel() * value.element_size() <= INLINE_BYTES):
        return InlineArray(value.numpy())
    return value


def _unpack(value: Any, pool: SlotPool | None) -> Any:
    if isinstance(value, InlineArray):
        return torch.from_numpy(value.array)
    if isinstance(value, SlotTicket):
        if pool is None:
            raise RuntimeError("a loader worker sent pixels in a shared-memory slot, but its loader has no slots")
        return pool.lend(value)
    return value


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * dtype.itemsize


def _shared_bytes(nbytes: int) -> torch.Tensor:
    """A ``uint8`` tensor of ``nbytes`` in shared memory whose pages are not touched yet."""
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).new(storage)


def _free_shared_memory() -> int | None:
    """Free bytes in /dev/shm, where Linux keeps shared memory (None elsewhere)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None
