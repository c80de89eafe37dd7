"""Handing pixel batches from loader workers to the main process through reused shared memory.

PyTorch's DataLoader puts every batch a worker stacks into fresh shared memory: the kernel faults in
and zeroes its pages in the worker (19 MB for 32 float images at 224 px), and the main process maps
the memory and later unmaps and frees it. For small images that costs as much as loading them, and
two workers on two cores then load little faster than none (``docs/explanation/data-handoff.md``).

:class:`WorkerSlots` hands pixels over in a fixed pool of shared-memory slots instead, each slot the
size of a batch, created before the workers start, so its pages are faulted in once and then
reused:

- a worker stacks a batch's pixels into a free slot of its own (worker ``i`` owns slots
  ``i * per_worker`` to ``(i + 1) * per_worker - 1``) and sends a small :class:`SlotTicket` in
  their place;
- the main process turns the ticket into a tensor over the slot's memory, without a copy
  (:meth:`WorkerSlots.receive`);
- the slot is free again when the last tensor using that memory (the batch's, or any view of it) is
  gone: the tensor is made with ``torch.frombuffer`` over a ``memoryview`` of the slot, which torch
  keeps alive exactly as long as the tensor's memory, and that ``memoryview`` carries a finalizer.
  A batch kept by the caller therefore stays intact; its worker uses its other slots meanwhile.

Everything here is public API: the pool is a ``multiprocessing.shared_memory.SharedMemory`` block
(forked workers inherit its mapping, spawned ones attach to it by name), tensors over it come from
``torch.frombuffer``, and the leases are a tensor in PyTorch's shared memory (``share_memory_``).

A worker that finds none of its slots free, or a batch that does not fit in a slot, gets PyTorch's own
hand-off, so this never blocks and never changes what a batch contains.

When the loader pins memory (``pin_memory=True``, training on CUDA: :func:`pins_memory`), the
pixels are copied out of the slot into page-locked memory as they arrive, and the slot is free at
once; the small tensors are pinned by the DataLoader's pin-memory thread, as PyTorch pins any batch.

The workers also keep the memory they free (:func:`keep_freed_memory`): without a batch-sized
allocation of their own, glibc gives the few hundred KB each image's tensors take back to the kernel
after every image and faults it in again for the next, which doubled the cost of ``ToTensor``.

The batch's small tensors (token ids, masks, indices) travel by value, as numpy arrays pickled into
the worker's result pipe: PyTorch would give each its own shared memory, whose file descriptor the
main process fetches over a socket.

Leases: a worker marks the slot it fills with the loader's pass number, and the main process clears
it. A batch that is never received (its pass abandoned by ``break`` or ``limit_train_batches``) would
hold its slot forever. Loaders whose workers start afresh each pass get a new pool each pass (the old
one is freed with the last tensor using it); loaders with persistent workers keep one pool, and a new
pass, or the end of a whole pass, frees the slots earlier passes leased and no tensor holds (see
:meth:`WorkerSlots.start_pass` and :meth:`WorkerSlots.receive`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shutil
import sys
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

log = logging.getLogger(__name__)

# Tensors up to this size travel by value (see above); bigger ones as PyTorch sends them.
INLINE_BYTES = 1 << 20
# Slots start on a cache-line boundary, so any dtype's elements are aligned.
SLOT_ALIGNMENT = 64
# glibc's mallopt parameters, and the values a worker sets (see keep_freed_memory).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD = 32 << 20, 64 << 20
# The pool may take at most this share of the free shared memory (/dev/shm); beyond it the loader
# uses PyTorch's hand-off, which needs only the batches in flight.
MAX_SHARED_MEMORY_SHARE = 0.5


def pins_memory(trainer: L.Trainer | None) -> bool:
    """Whether a data module's loaders should pin memory: when ``trainer`` trains on CUDA.

    Pinned (page-locked) batches let the copy to the GPU run asynchronously (Lightning moves batches
    with ``non_blocking=True``); on a CPU they would only cost a copy, and CPU-only PyTorch cannot pin.
    """
    return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)


@dataclass(frozen=True)
class SlotTicket:
    """What a worker sends in place of a batch's pixels: which pool and slot hold them, their layout,
    and whether the loader pins them (set in the main process by :meth:`pin_memory`)."""

    pool: str
    slot: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    pinned: bool = False

    def pin_memory(self) -> SlotTicket:
        """Called by the DataLoader's pin-memory thread, exactly when the loader pins its batches (as on
        any object with a ``pin_memory`` method): the thread cannot reach the pool, so the ticket is
        marked and :meth:`WorkerSlots.receive` copies the pixels into pinned memory."""
        return dataclasses.replace(self, pinned=True)


@dataclass(frozen=True)
class InlineArray:
    """A small tensor sent by value: numpy arrays pickle their bytes, tensors their shared memory."""

    array: np.ndarray

    def pin_memory(self) -> torch.Tensor:
        """Called by the DataLoader's pin-memory thread when the loader pins its batches."""
        return torch.from_numpy(self.array).pin_memory()


class SlotPool:
    """The shared memory behind a :class:`WorkerSlots`: ``slots`` slots of ``slot_bytes`` bytes each.

    ``leases[s]`` is 0 when slot ``s`` is free, else the number of the pass whose worker filled it.
    The slots are a ``SharedMemory`` block, created without touching its pages (so slots a loader never
    fills cost no memory); the process that creates it unlinks its name when the pool is freed (or the
    process ends; Python's resource tracker cleans up after a crash). Pickled, a pool travels by name
    (:func:`_attach_pool`), for workers started by spawn.
    """

    def __init__(self, slots: int, slot_bytes: int, shared: SharedMemory | None = None,
                 leases: torch.Tensor | None = None) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        if shared is None:
            shared = SharedMemory(create=True, size=slots * slot_bytes)
            weakref.finalize(self, _unlink, shared, os.getpid())
        self.shared = shared
        if leases is None:
            # Lightning starts evaluation passes under inference mode; a tensor made there could not
            # be written outside it (by the workers, and by the finalizers that free slots).
            with torch.inference_mode(False):
                leases = torch.zeros(slots, dtype=torch.int64).share_memory_()
        self.leases = leases
        self.held: set[int] = set()  # main process: slots a live tensor uses

    @property
    def name(self) -> str:
        """The shared memory block's name (tickets carry it, so a ticket meets only its own pool)."""
        return self.shared.name

    def view(self, ticket: SlotTicket) -> torch.Tensor:
        """The slot's memory as a tensor of the ticket's dtype and shape (no copy)."""
        return torch.frombuffer(self._bytes(ticket), dtype=ticket.dtype).view(ticket.shape)

    def lend(self, ticket: SlotTicket) -> torch.Tensor:
        """A tensor over the ticket's slot that frees the slot when the last tensor using it is gone."""
        memory = self._bytes(ticket)
        self.held.add(ticket.slot)
        # torch.frombuffer keeps this very memoryview alive for as long as any tensor uses its memory
        # (it holds a reference to the buffer object), so the finalizer runs exactly when the slot is
        # no longer in use. The memoryview also keeps the block mapped until then.
        weakref.finalize(memory, self._release, ticket.slot)
        return torch.frombuffer(memory, dtype=ticket.dtype).view(ticket.shape)

    def copy_out(self, ticket: SlotTicket, copy: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``copy`` of the ticket's pixels (e.g. into pinned memory); the slot is free on return."""
        copied = copy(self.view(ticket))
        self.leases[ticket.slot] = 0
        return copied

    def contains(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies in this pool."""
        start = torch.frombuffer(self.shared.buf[:1], dtype=torch.uint8).data_ptr()
        return start <= tensor.untyped_storage().data_ptr() < start + self.slots * self.slot_bytes

    def free_unheld(self, before_pass: int | None = None) -> None:
        """Free the leases no tensor holds (only those taken before pass ``before_pass``, if given)."""
        for slot in range(self.slots):
            # A worker leases only free slots, so no worker changes a lease between read and write.
            lease = int(self.leases[slot])
            if lease and slot not in self.held and (before_pass is None or lease < before_pass):
                self.leases[slot] = 0

    def __reduce__(self) -> tuple[Callable[..., SlotPool | None], tuple[Any, ...]]:
        return _attach_pool, (self.name, self.slots, self.slot_bytes, self.leases)

    def _bytes(self, ticket: SlotTicket) -> memoryview:
        start = ticket.slot * self.slot_bytes
        return self.shared.buf[start:start + _nbytes(ticket.dtype, ticket.shape)]

    def _release(self, slot: int) -> None:
        self.held.discard(slot)
        self.leases[slot] = 0


def _attach_pool(name: str, slots: int, slot_bytes: int, leases: torch.Tensor) -> SlotPool | None:
    """The pool ``name`` in a worker started by spawn; None when it is gone already (the pass that
    started the worker was abandoned and its pool freed): the worker then hands over as PyTorch does."""
    # Python 3.13+ can attach without registering the block with the resource tracker (a block the
    # main process owns); before, registering it again is harmless: the tracker keeps a set of names.
    track = {"track": False} if sys.version_info >= (3, 13) else {}
    try:
        shared = SharedMemory(name=name, **track)
    except FileNotFoundError:
        return None
    return SlotPool(slots, slot_bytes, shared=shared, leases=leases)


def _unlink(shared: SharedMemory, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked worker, which inherits the finalizer
        shared.unlink()


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
        slot_bytes = -(-self.slot_bytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        wanted = slots * slot_bytes
        free = _free_shared_memory()
        if free is not None and wanted > MAX_SHARED_MEMORY_SHARE * free:
            if not self._warned:
                self._warned = True
                log.warning("loader workers hand batches over as PyTorch does: %d slots of %.0f MB would take over "
                            "half the free shared memory (%.0f MB)", slots, slot_bytes / 2**20, free / 2**20)
            return None
        return SlotPool(slots, slot_bytes)

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
        pool = self.pool
        if pool is None or _nbytes(first.dtype, shape) > pool.slot_bytes:
            return default_collate(tensors)
        if self._tuned_process != os.getpid():  # once per worker process
            keep_freed_memory()
            self._tuned_process = os.getpid()
        leases = pool.leases
        for slot in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            if int(leases[slot]) == 0:
                leases[slot] = int(self._pass)
                ticket = SlotTicket(pool.name, slot, first.dtype, shape)
                torch.stack(tensors, out=pool.view(ticket))
                return ticket
        return default_collate(tensors)


class SlotLoader(DataLoader):
    """A DataLoader whose workers hand pixels over through ``slots`` (None: as PyTorch does).

    ``slots`` must be the ones its ``collate_fn`` (or its dataset, for a stream that batches itself)
    stacks into. The arguments are DataLoader's, named, so Lightning can rebuild the loader with a
    ``DistributedSampler`` under DDP. ``pin_memory``: copy batches into page-locked memory as they
    arrive (for training on CUDA, see :func:`pins_memory`; a no-op where PyTorch cannot pin).
    """

    def __init__(self, dataset: Dataset, batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler: Sampler | None = None, batch_sampler: Sampler | None = None, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None, pin_memory: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None,
                 persistent_workers: bool = False, slots: WorkerSlots | None = None) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                         persistent_workers=persistent_workers)
        self.slots = slots
        self._started_workers = False

    def __iter__(self) -> Iterator[Any]:
        if self.slots is None or self.num_workers == 0:
            return super().__iter__()
        # Persistent workers, once started, are reset for each later pass and keep the pool they were
        # given; any other pass starts new workers, which get a new pool. (Lightning may shut
        # persistent workers down between stages: the next pass then starts new ones, which inherit
        # the pool the old ones used. That is safe, as those are gone.)
        reused = self.persistent_workers and self._started_workers
        # Before super().__iter__(), which starts the pass's workers (or resets persistent ones).
        pool = self.slots.start_pass(fresh_workers=not reused)
        # Only workers started here use the slots: those of another loader over the same dataset
        # (a plain DataLoader, say) hand batches over as PyTorch does.
        self.slots.armed = True
        try:
            batches = super().__iter__()
        finally:
            self.slots.armed = False
        self._started_workers = True
        return self.slots.receive(batches, pool)


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory in this process rather than give it back to the kernel.

    glibc unmaps a freed block above its mmap threshold and trims the heap's free top above its trim
    threshold, and it raises both as the process frees bigger blocks. A loader worker frees nothing
    bigger than one image's tensors, so it keeps returning that memory and faulting it back in, page
    by page, for the next image: ``ToTensor`` took 0.31 ms per 224 px image in a worker against 0.15
    in a main process, where freeing a 19 MB batch had raised the thresholds. Fixed thresholds of 32
    and 64 MB (a worker then holds on to at most that much freed memory) make the two the same.

    ``mallopt`` is glibc's documented call for this (``man 3 mallopt``), reached through ctypes; it is
    no PyTorch API. glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment
    variables set the same thresholds, but glibc reads them once, when a process starts: they reach
    spawned workers, not the forked ones Linux starts by default (``benchmarks/worker_malloc.py``
    counts the page faults each way). Without glibc (macOS, musl, Windows) this does nothing.
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name
        glibc = None
    if not glibc:
        return
    mallopt = ctypes.CDLL(None).mallopt
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
        if pool is None or value.pool != pool.name:
            raise RuntimeError(f"a loader worker sent pixels in shared-memory slot pool {value.pool}, but its "
                               f"loader receives with {'no pool' if pool is None else 'pool ' + pool.name}")
        if value.pinned:
            return pool.copy_out(value, torch.Tensor.pin_memory)
        return pool.lend(value)
    return value


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * dtype.itemsize


def _free_shared_memory() -> int | None:
    """Free bytes in /dev/shm, where Linux keeps shared memory (None elsewhere)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None
