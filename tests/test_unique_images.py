"""``data.unique_images_per_batch``: training batches never hold one image twice (vlm_lab/data/unique_images.py).

Every entry (caption) once per epoch but for fewer than a batch left over; the same batches for the
same (seed, epoch), others for another epoch; a resumed pass continues the uninterrupted one; under
DDP (Lightning's DistributedSampler injected as it does) the images are distinct across the ranks'
shares of each global batch. Controls show that the plain shuffled sampler does repeat images.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from datasets_on_disk import TINY_IMAGES, jpeg_bytes
from vlm_lab import registry
from vlm_lab.data.unique_images import UniqueImageBatchSampler, unique_image_batches
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer


def _entries(images: int, per_image: int) -> list[int]:
    """The image of each entry: ``per_image`` captions of each image, as train_sampling: caption lists them."""
    return [image for image in range(images) for _ in range(per_image)]


def _assert_valid(batches: list[list[int]], images: list[int], batch_size: int) -> None:
    assert len(batches) == len(images) // batch_size
    assert all(len(batch) == batch_size for batch in batches)
    for batch in batches:
        assert len({images[e] for e in batch}) == batch_size, "an image twice in a batch"
    used = [e for batch in batches for e in batch]
    assert len(used) == len(set(used)), "an entry twice in an epoch"
    assert len(images) - len(used) < batch_size  # every entry but fewer than a batch


@pytest.mark.parametrize("images, per_image, batch_size", [
    (60, 5, 16),   # a few clashes per batch, as Flickr8k with 256
    (50, 5, 40),   # most batches clash: the last ones need swaps with earlier batches
    (7, 5, 7),     # every batch holds every image: as tight as it gets
    (33, 3, 11),
])
@pytest.mark.parametrize("seed", range(5))
def test_batches_hold_distinct_images_and_every_entry_once(images, per_image, batch_size, seed):
    entries = _entries(images, per_image)
    _assert_valid(unique_image_batches(entries, batch_size, seed), entries, batch_size)


def test_uneven_caption_counts():
    entries = [image for image in range(40) for _ in range(1 + image % 6)]
    for seed in range(5):
        _assert_valid(unique_image_batches(entries, 12, seed), entries, 12)


def test_control_a_plain_shuffle_repeats_images():
    entries = _entries(60, 5)
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i:i + 16] for i in range(0, len(order) - 15, 16)]
    assert any(len({entries[e] for e in batch}) < 16 for batch in batches)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    entries = _entries(60, 5)
    assert unique_image_batches(entries, 16, 1) == unique_image_batches(entries, 16, 1)
    assert unique_image_batches(entries, 16, 1) != unique_image_batches(entries, 16, 2)


@pytest.mark.parametrize("entries, batch_size, message", [
    (_entries(5, 4), 8, "a batch of 8 needs 8 different images, but the training split has 5"),
    ([0] * 10 + list(range(1, 31)), 8, "image 0 has 10 training entries but an epoch has only 5 batches of 8"),
])
def test_impossible_requests_are_one_line(entries, batch_size, message):
    with pytest.raises(ConfigError, match=message):
        unique_image_batches(entries, batch_size, 0)


# --------------------------------------------------------------------------------------------------
# The batch sampler: epochs, resuming, ranks


def _sampler(entries, batch_size=16, seed=3, sampler=None):
    return UniqueImageBatchSampler(sampler or SequentialSampler(entries), batch_size, True, entries, seed)


def test_epochs_are_seeded_and_differ():
    entries = _entries(60, 5)
    sampler = _sampler(entries)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and first != second
    assert len(sampler) == len(first) == 300 // 16


def test_a_resumed_pass_continues_the_uninterrupted_one():
    entries = _entries(60, 5)
    sampler = _sampler(entries)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.skip = 7
    assert list(sampler) == whole[7:]


def test_ranks_take_slices_of_global_batches_with_distinct_images():
    entries = _entries(60, 5)
    ranks = [_sampler(entries, batch_size=8, sampler=DistributedSampler(entries, num_replicas=2, rank=rank))
             for rank in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shares = [list(sampler) for sampler in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == 300 // 16
    used = []
    for first, second in zip(*shares):
        assert len({entries[e] for e in first + second}) == 16  # distinct over the global batch
        used += first + second
    assert len(used) == len(set(used)) and len(entries) - len(used) < 16


# --------------------------------------------------------------------------------------------------
# The data modules


def coco_files(tmp_path, images: int = 12, per_image: int = 5):
    folder = tmp_path / "images"
    folder.mkdir(parents=True)
    for i in range(images):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes((20 * i % 256, 80, 80)))
    ann = {"images": [{"id": 100 + i, "file_name": f"{i}.jpg"} for i in range(images)],
           "annotations": [{"id": 10 * i + j, "image_id": 100 + i, "caption": f"caption {j} of image {i}"}
                           for i in range(images) for j in range(per_image)]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    return str(tmp_path / "captions.json"), str(folder)


def _datamodule(tmp_path, **data):
    ann, images = coco_files(tmp_path)
    spec = {"name": "coco_captions", "train_ann": ann, "train_images": images, "train_sampling": "caption",
            "batch_size": 6, **data}
    return registry.build("datamodule", spec, tokenizer=load_tokenizer(None), image_config=TINY_IMAGES,
                          max_length=32)


def _epoch(datamodule, epoch: int) -> list[dict]:
    datamodule.set_epoch(epoch)
    return list(datamodule.train_dataloader())


def test_coco_training_batches_never_repeat_an_image_and_show_every_caption(tmp_path):
    datamodule = _datamodule(tmp_path, unique_images_per_batch=True)
    epoch = _epoch(datamodule, 0)
    assert len(epoch) == 60 // 6
    for batch in epoch:
        assert len(set(batch["image_ids"].tolist())) == 6
    shown = Counter(caption for batch in epoch for caption in batch["captions"])
    assert set(shown.values()) == {1} and len(shown) == 60  # 60 captions, 10 batches of 6: each once
    again = _datamodule(tmp_path / "again", unique_images_per_batch=True)
    assert [b["captions"] for b in _epoch(again, 0)] == [b["captions"] for b in epoch]
    assert [b["captions"] for b in _epoch(again, 1)] != [b["captions"] for b in epoch]
    # The control: without the option a batch of this split repeats an image.
    plain = _datamodule(tmp_path / "plain")
    assert any(len(set(b["image_ids"].tolist())) < 6 for e in range(3) for b in _epoch(plain, e))


def test_lightning_injects_its_distributed_sampler(tmp_path):
    # What Lightning does to a training loader under DDP: rebuild it, with the batch sampler's saved
    # arguments, around a DistributedSampler (lightning/pytorch/utilities/data.py).
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    datamodule = _datamodule(tmp_path, unique_images_per_batch=True, batch_size=3)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = datamodule.train_dataloader()
    shares = []
    for rank in range(2):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True)
        rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert isinstance(rebuilt.batch_sampler, UniqueImageBatchSampler)
        datamodule.set_epoch(0)
        shares.append([b["image_ids"].tolist() for b in rebuilt])
    assert len(shares[0]) == len(shares[1]) == 60 // 6
    for first, second in zip(*shares):
        assert len(set(first + second)) == 6


def test_streaming_refuses_the_option(tmp_path):
    with pytest.raises(ConfigError, match="unique_images_per_batch=true needs map-style data"):
        registry.build("datamodule", {"name": "hf_dataset", "path": str(tmp_path), "streaming": True,
                                      "unique_images_per_batch": True},
                       tokenizer=load_tokenizer(None), image_config=TINY_IMAGES, max_length=32)


def test_yaml_and_cli_set_the_option(tmp_path, capsys):
    import vlm_lab
    from vlm_lab.cli import main

    ann, images = coco_files(tmp_path / "data")
    tiny = str(Path(__file__).resolve().parent / "configs" / "tiny.yaml")
    data = ["data.name=coco_captions", f"data.train_ann={ann}", f"data.train_images={images}", f"data.val_ann={ann}",
            f"data.val_images={images}", "data.train_sampling=caption", "data.batch_size=6"]
    (tmp_path / "unique.yaml").write_text("data:\n" + "".join(f"  {o[5:].replace('=', ': ', 1)}\n" for o in data)
                                          + "  unique_images_per_batch: true\n")
    cfg = vlm_lab.load_config(tiny, tmp_path / "unique.yaml")
    assert cfg.data.unique_images_per_batch is True
    assert main(["fit", tiny, *data, "data.unique_images_per_batch=true", "trainer.max_steps=2",
                 "trainer.limit_val_batches=0", "--run-dir", str(tmp_path / "run")]) == 0
    assert main(["fit", tiny, *data, "data.unique_images_per_batch=yes please", "--run-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "unique_images_per_batch" in err and err.count("\n") == 1


def test_a_resumed_data_module_continues_the_epoch(tmp_path):
    whole = [b["captions"] for b in _epoch(_datamodule(tmp_path, unique_images_per_batch=True), 1)]
    resumed = _datamodule(tmp_path / "resumed", unique_images_per_batch=True)
    resumed.load_state_dict({"next_epoch": 1, "batches_done": 4})  # what a mid-epoch checkpoint holds
    assert [b["captions"] for b in resumed.train_dataloader()] == whole[4:]
