"""Loader workers hand pixels over in reused shared-memory slots (``vlm_lab/data/handoff.py``).

What must hold: batches are exactly those of PyTorch's own hand-off, whatever the caller keeps; a slot
is reused only once no tensor uses its memory; abandoned passes do not use the slots up; the small
tensors travel by value; and the real data modules give the same batches with and without slots.
Loaders pin memory when training on CUDA, with slots or without.
"""

from __future__ import annotations

import dataclasses
import gc
import pickle
import weakref
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from torch.utils.data import DataLoader, Dataset

from datasets_on_disk import CC12M_SHARD, COCO_MINI, TINY_IMAGES, needs_shared
from vlm_lab.data.cc3m import CC3MDataModule
from vlm_lab.data.coco import CocoCaptionsDataModule
from vlm_lab.data.handoff import SlotLoader, SlotPool, SlotTicket, WorkerSlots, pins_memory
from vlm_lab.data.synthetic import SyntheticShapesDataModule
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer

BATCH = 4


class Numbered(Dataset):
    """Image ``i`` is filled with ``i``; its id is ``i``."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((3, 8, 8), float(index))


class PackingCollate:
    def __init__(self, slots: WorkerSlots | None) -> None:
        self.slots = slots

    def __call__(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([int(image[0, 0, 0]) for image in images])
        if self.slots is None:
            return {"pixel_values": torch.stack(images), "image_ids": ids}
        return self.slots.pack({"image_ids": ids}, images)


def loader(slots: WorkerSlots | None, persistent: bool = False, pin_memory: bool = False) -> SlotLoader:
    return SlotLoader(Numbered(), batch_size=BATCH, num_workers=2, collate_fn=PackingCollate(slots),
                      pin_memory=pin_memory, persistent_workers=persistent, slots=slots)


def slots(per_worker: int = 2, slot_bytes: int = BATCH * 3 * 8 * 8 * 4) -> WorkerSlots:
    return WorkerSlots(num_workers=2, slot_bytes=slot_bytes, per_worker=per_worker)


def in_slot(tensor: torch.Tensor, pool: SlotPool) -> bool:
    return pool.contains(tensor)


def check(batch: dict[str, torch.Tensor], first: int) -> None:
    """The batch holds images first .. first + BATCH - 1, in order."""
    expected = torch.arange(first, first + BATCH)
    assert batch["image_ids"].tolist() == expected.tolist()
    assert torch.equal(batch["pixel_values"][:, 0, 0, 0], expected.float())
    assert torch.equal(batch["pixel_values"], batch["pixel_values"][:, :1, :1, :1].expand(-1, 3, 8, 8))


def test_kept_batches_stay_intact_and_equal_pytorchs():
    handoff = slots(per_worker=2)
    kept = list(loader(handoff))  # keeps every batch: 4 slots for 10 batches, the rest go PyTorch's way
    pool = handoff.pool
    assert [torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(kept, loader(None))] == [True] * 10
    for number, batch in enumerate(kept):
        check(batch, BATCH * number)
    assert sum(in_slot(batch["pixel_values"], pool) for batch in kept) == 4
    assert pool.held == {0, 1, 2, 3}
    del kept, batch
    gc.collect()
    assert pool.held == set() and int(pool.leases.sum()) == 0


def test_a_slot_is_reused_only_when_no_tensor_uses_it():
    handoff = slots(per_worker=2)
    batches = iter(loader(handoff))
    first = next(batches)
    pool = handoff.pool
    assert in_slot(first["pixel_values"], pool)
    view = first["pixel_values"][1:]  # a view outlives the batch and keeps its slot
    slot = next(iter(pool.held))
    del first
    gc.collect()
    assert slot in pool.held
    rest = [batch["image_ids"].tolist() for batch in batches]  # the workers go on with their other slots
    assert len(rest) == 9
    assert torch.equal(view[:, 0, 0, 0], torch.tensor([1.0, 2.0, 3.0]))  # not overwritten
    del view
    gc.collect()
    assert slot not in pool.held and int(pool.leases[slot]) == 0


def test_slots_are_reused_across_a_pass():
    handoff = slots(per_worker=2)
    used = 0
    for number, batch in enumerate(loader(handoff)):  # each batch is dropped before the next
        check(batch, BATCH * number)
        used += in_slot(batch["pixel_values"], handoff.pool)
    assert used >= 8  # nearly every batch found a free slot (prefetched ones may have to fall back)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.slow
def test_abandoned_passes_do_not_use_the_slots_up(persistent):
    handoff = slots(per_worker=4)
    data = loader(handoff, persistent=persistent)
    for _ in range(3):
        for batch in data:  # leaves prefetched batches unreceived
            break
    del batch
    for _ in range(2):  # the first may find slots still leased by batches the abandoned pass dropped
        used = 0
        for number, batch in enumerate(data):
            check(batch, BATCH * number)
            used += in_slot(batch["pixel_values"], handoff.pool)
    assert used >= 9
    del batch
    gc.collect()
    assert int(handoff.pool.leases.sum()) == 0


def test_fresh_workers_get_a_new_pool_and_persistent_ones_keep_theirs():
    for persistent, same in ((False, False), (True, True)):
        handoff = slots()
        data = loader(handoff, persistent=persistent)
        next(iter(data))
        first = handoff.pool
        list(data)
        assert (handoff.pool is first) == same


def test_a_batch_too_big_for_its_slot_goes_pytorchs_way():
    handoff = slots(slot_bytes=100)
    for number, batch in enumerate(loader(handoff)):
        check(batch, BATCH * number)
        assert not in_slot(batch["pixel_values"], handoff.pool)
        assert batch["pixel_values"].is_shared()


class BFloat16Collate(PackingCollate):
    def __call__(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return super().__call__([image.bfloat16() for image in images])


def test_bfloat16_pixels_use_the_slots_too():
    """numpy has no bfloat16; torch.frombuffer does, so such pixels need not fall back."""
    handoff = slots()
    data = SlotLoader(Numbered(), batch_size=BATCH, num_workers=2, collate_fn=BFloat16Collate(handoff), slots=handoff)
    used = 0
    for number, batch in enumerate(data):
        assert batch["pixel_values"].dtype == torch.bfloat16
        check({**batch, "pixel_values": batch["pixel_values"].float()}, BATCH * number)
        used += in_slot(batch["pixel_values"], handoff.pool)
    assert used >= 8  # as in test_slots_are_reused_across_a_pass


def test_small_tensors_travel_by_value():
    batch = next(iter(loader(slots())))
    assert not batch["image_ids"].is_shared()  # no shared memory, no file descriptor sent
    plain = next(iter(loader(None)))
    assert plain["image_ids"].is_shared()


def test_without_workers_nothing_changes():
    handoff = slots()
    data = SlotLoader(Numbered(), batch_size=BATCH, collate_fn=PackingCollate(handoff), slots=handoff)
    for number, batch in enumerate(data):
        check(batch, BATCH * number)
    assert handoff.pool is None
    assert WorkerSlots.for_pixels(0, 64, (224, 224)) is None
    assert WorkerSlots.for_pixels(2, 64, (224, 224), per_worker=0) is None


def test_too_little_shared_memory_falls_back(monkeypatch):
    monkeypatch.setattr("vlm_lab.data.handoff._free_shared_memory", lambda: 1000)
    handoff = slots()
    for number, batch in enumerate(loader(handoff)):
        check(batch, BATCH * number)
    assert handoff.pool is None


# -------------------------------------------------------------------------------------------------
# The real data modules


def _batches(data_module, split: str, passes: int) -> list[dict]:
    loader = data_module.train_dataloader() if split == "train" else data_module.val_dataloader()
    return [batch for _ in range(passes) for batch in loader]


def _same(with_slots: list[dict], without: list[dict]) -> None:
    assert len(with_slots) == len(without) > 0
    for a, b in zip(with_slots, without):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


@needs_shared
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.slow
def test_coco_batches_are_the_same_with_and_without_slots(split):
    tokenizer = load_tokenizer(None)
    made = {}
    for worker_slots in (4, 0):
        data_module = CocoCaptionsDataModule(tokenizer, TINY_IMAGES, 32, root=str(COCO_MINI), batch_size=16,
                                             num_workers=2, worker_slots=worker_slots)
        made[worker_slots] = _batches(data_module, split, passes=2)
        assert (data_module.slots(split) is None) == (worker_slots == 0)
    _same(made[4], made[0])


@needs_shared
def test_cc3m_stream_batches_are_the_same_with_and_without_slots():
    tokenizer = load_tokenizer(None)
    made = {}
    for worker_slots in (4, 0):
        data_module = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_shards=[str(CC12M_SHARD)] * 2,
                                     batch_size=8, num_workers=2, worker_slots=worker_slots)
        made[worker_slots] = _batches(data_module, "train", passes=2)
    _same(made[4], made[0])


def test_worker_slots_must_not_be_negative():
    with pytest.raises(ConfigError, match="worker_slots"):
        CC3MDataModule(None, TINY_IMAGES, 32, train_shards=["a.tar"], worker_slots=-1)


def test_plain_dataloader_is_untouched():
    batch = next(iter(DataLoader(Numbered(), batch_size=BATCH, num_workers=2, collate_fn=PackingCollate(None))))
    check(batch, 0)


def test_another_loader_over_the_same_collate_gets_plain_batches():
    handoff = slots()
    list(loader(handoff))  # the slots have a pool now
    plain = DataLoader(Numbered(), batch_size=BATCH, num_workers=2, collate_fn=PackingCollate(handoff))
    for number, batch in enumerate(plain):
        check(batch, BATCH * number)
        assert batch["pixel_values"].is_shared() and batch["image_ids"].is_shared()


@pytest.mark.slow
def test_spawned_workers_use_the_slots_too():
    """macOS and Windows start loader workers with spawn: the slots travel pickled."""
    handoff = slots()
    data = loader(handoff)
    data.multiprocessing_context = "spawn"
    used = 0
    for number, batch in enumerate(data):
        check(batch, BATCH * number)
        used += in_slot(batch["pixel_values"], handoff.pool)
    assert used >= 8


@needs_shared
@pytest.mark.parametrize("worker_slots", [2, 0])
@pytest.mark.slow
def test_worker_slots_from_an_experiment_config(monkeypatch, worker_slots):
    import vlm_lab

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the experiment's paths are relative to the root
    cfg = vlm_lab.load_config("experiments/flickr8k.yaml", overrides=[
        "data.num_workers=2", "data.batch_size=4", f"data.worker_slots={worker_slots}"])
    data_module = vlm_lab.build_datamodule(cfg, vlm_lab.build_module(cfg))
    batch = next(iter(data_module.val_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    handoff = data_module.slots("val")
    if worker_slots:
        assert handoff.per_worker == 2 and in_slot(batch["pixel_values"], handoff.pool)
    else:
        assert handoff is None


def test_a_pass_started_under_inference_mode():
    """Lightning's validate and test loops start passes under torch.inference_mode()."""
    handoff = slots()
    with torch.inference_mode():
        kept = list(loader(handoff))
    for number, batch in enumerate(kept):
        check(batch, BATCH * number)
    assert sum(in_slot(batch["pixel_values"], handoff.pool) for batch in kept) == 4  # all 4 slots, then PyTorch's way
    del kept, batch
    gc.collect()  # the slots are freed outside inference mode
    assert int(handoff.pool.leases.sum()) == 0


@needs_shared
@pytest.mark.slow
def test_a_fit_with_slots_matches_one_without(monkeypatch, tmp_path):
    """Lightning end to end, 2 workers: training passes cut short (limit_train_batches abandons
    prefetched batches) and validation under inference mode; the metrics agree to the bit."""
    import vlm_lab

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    metrics = {}
    for worker_slots in (4, 0):
        cfg = vlm_lab.load_config("experiments/flickr8k.yaml", overrides=[
            "data.batch_size=16", "data.eval_batch_size=16", f"data.worker_slots={worker_slots}",
            "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "trainer.enable_checkpointing=false"])
        metrics[worker_slots] = vlm_lab.fit(cfg, run_dir=tmp_path / str(worker_slots))
    assert metrics[4] == metrics[0] and "val/i2t_R@1" in metrics[4]


# -------------------------------------------------------------------------------------------------
# Public APIs only: the pool travels by name, and pinned memory


def test_a_pool_travels_by_name_and_is_gone_once_freed():
    """Spawned workers attach to the pool by name; one that starts after the pool was freed (its pass
    abandoned) gets None, and so PyTorch's hand-off."""
    pool = SlotPool(slots=2, slot_bytes=64)
    ticket = SlotTicket(pool.name, 1, torch.float32, (4, 4))
    attached = pickle.loads(pickle.dumps(pool))
    attached.view(ticket).fill_(7.0)
    assert torch.equal(pool.view(ticket), torch.full((4, 4), 7.0))  # the same memory
    pickled = pickle.dumps(pool)
    del pool, attached
    gc.collect()
    assert pickle.loads(pickled) is None


def test_a_ticket_the_loader_pins_is_copied_out_and_its_slot_freed_at_once(monkeypatch):
    """The DataLoader's pin-memory thread calls ``pin_memory()`` on each value of a batch; it cannot
    reach the pool, so the ticket only says so, and ``receive`` copies the pixels into pinned memory
    (faked here: this machine may not be able to pin) and frees the slot at once."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: tensor.clone() + 0.5)
    handoff = slots()
    pool = handoff.start_pass(fresh_workers=True)
    ticket = SlotTicket(pool.name, 3, torch.float32, (BATCH, 3, 8, 8))
    pool.leases[3] = 1
    pool.view(ticket).copy_(torch.arange(BATCH * 3 * 64, dtype=torch.float32).view(ticket.shape))
    marked = ticket.pin_memory()
    assert marked == dataclasses.replace(ticket, pinned=True)
    [batch] = handoff.receive(iter([{"pixel_values": marked}]), pool)
    assert torch.equal(batch["pixel_values"], torch.arange(BATCH * 3 * 64).view(ticket.shape) + 0.5)
    assert not in_slot(batch["pixel_values"], pool) and int(pool.leases[3]) == 0 and pool.held == set()


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator is found")
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.slow
def test_a_pinning_loader_gives_the_same_batches(persistent):
    """``pin_memory=True`` (training on CUDA): where PyTorch can pin, every tensor of a batch comes pinned
    and no slot stays held; on CPU-only PyTorch the DataLoader skips pinning (with a warning) and the
    batches are those of the slots."""
    handoff = slots(per_worker=2)
    data = loader(handoff, persistent=persistent, pin_memory=True)
    can_pin = torch.accelerator.is_available()
    for _ in range(2):
        kept = list(data)
        assert [torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(kept, loader(None))] == [True] * 10
        for number, batch in enumerate(kept):
            check(batch, BATCH * number)
            assert batch["pixel_values"].is_pinned() == batch["image_ids"].is_pinned() == can_pin
        assert (handoff.pool.held == set()) == can_pin
        del kept, batch
        gc.collect()
        assert int(handoff.pool.leases.sum()) == 0


def test_loaders_pin_memory_when_training_on_cuda():
    assert not pins_memory(None)
    assert not pins_memory(L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False))
    assert pins_memory(SimpleNamespace(accelerator=CUDAAccelerator()))
    assert not pins_memory(SimpleNamespace(accelerator=CPUAccelerator()))


def _loaders_pin(data_module, accelerator) -> list[bool]:
    data_module.trainer = None if accelerator is None else SimpleNamespace(accelerator=accelerator, current_epoch=0)
    return [data_module.train_dataloader().pin_memory, data_module.val_dataloader().pin_memory]


@pytest.mark.parametrize("accelerator, pinned", [(CUDAAccelerator(), True), (CPUAccelerator(), False), (None, False)])
def test_synthetic_loaders_pin_memory_on_cuda(accelerator, pinned):
    data_module = SyntheticShapesDataModule(load_tokenizer(None), TINY_IMAGES, 32, train_size=64, val_size=16,
                                            num_workers=2)
    assert _loaders_pin(data_module, accelerator) == [pinned, pinned]


@needs_shared
@pytest.mark.parametrize("worker_slots", [4, 0])
@pytest.mark.parametrize("accelerator, pinned", [(CUDAAccelerator(), True), (CPUAccelerator(), False)])
def test_caption_loaders_pin_memory_on_cuda_with_slots_or_without(worker_slots, accelerator, pinned):
    tokenizer = load_tokenizer(None)
    coco = CocoCaptionsDataModule(tokenizer, TINY_IMAGES, 32, root=str(COCO_MINI), num_workers=2,
                                  worker_slots=worker_slots)
    cc3m = CC3MDataModule(tokenizer, TINY_IMAGES, 32, train_shards=[str(CC12M_SHARD)], val_shards=[str(CC12M_SHARD)],
                          num_workers=2, worker_slots=worker_slots)
    for data_module in (coco, cc3m):
        assert _loaders_pin(data_module, accelerator) == [pinned, pinned]
        assert (data_module.slots("train") is None) == (worker_slots == 0)


def test_a_data_module_and_its_loaders_are_freed_without_the_cycle_collector():
    """A DataLoader that only Python's cycle collector frees cannot stop its persistent workers (its
    queues are closed first): PyTorch waits 5 s for each before it kills it. So no data module may
    sit in a reference cycle with its loaders (the training loader asks it for each pass's epoch)."""
    tokenizer = load_tokenizer(None)
    made = [lambda: SyntheticShapesDataModule(tokenizer, TINY_IMAGES, 32, train_size=16, val_size=8, batch_size=4)]
    if COCO_MINI.is_dir():
        made.append(lambda: CocoCaptionsDataModule(tokenizer, TINY_IMAGES, 32, root=str(COCO_MINI), batch_size=4))
    gc.collect()
    gc.disable()
    try:
        for make in made:
            data_module = make()
            loaders = [data_module.train_dataloader(), data_module.val_dataloader()]
            next(iter(loaders[0]))
            freed = [weakref.ref(data_module), *(weakref.ref(loader) for loader in loaders)]
            del data_module, loaders
            assert [ref() for ref in freed] == [None] * 3
    finally:
        gc.enable()
