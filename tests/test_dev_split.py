"""``data.dev_split``: training images set aside for recipe choices (vlm_lab/data/dev_split.py).

Disjoint from train, of the size asked, the same whatever the order of the captions file or the
folder the images sit in; a fit can validate on it and the ``retrieval`` evaluator read it; a dev
split as large as train, or a misspelt key, is one line.
"""

from __future__ import annotations

import json
import random
import re

import pytest

import vlm_lab
from test_unique_images import coco_files
from vlm_lab import registry
from vlm_lab.cli import main
from vlm_lab.data.dev_split import DevSplit
from vlm_lab.data.records import Record
from vlm_lab.errors import ConfigError
from vlm_lab.eval.suite import build_evaluators, run_evaluators
from vlm_lab.schema import EvalSettings
from vlm_lab.tokenizer import load_tokenizer
from datasets_on_disk import TINY_IMAGES

from pathlib import Path

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def _records(folder: str, count: int = 40) -> list[Record]:
    return [Record(f"{folder}/{i:05d}.jpg", (f"caption {i}",), 1000 + i) for i in range(count)]


def _names(records: list[Record]) -> set[str]:
    return {Path(r.path).name for r in records}


def test_dev_is_disjoint_from_train_and_of_the_size_asked():
    records = _records("/data/images")
    train, dev = DevSplit(images=7).carve(records, "captions.json")
    assert len(dev) == 7 and len(train) == 33
    assert not _names(train) & _names(dev) and _names(train) | _names(dev) == _names(records)
    assert [r for r in records if r in dev] == dev  # dev keeps the file's order


def test_dev_is_the_same_in_any_order_and_any_folder():
    records = _records("/data/images")
    _, dev = DevSplit(images=7).carve(records, "captions.json")
    shuffled = _records("/elsewhere/on/another/machine")
    random.Random(0).shuffle(shuffled)
    _, dev_again = DevSplit(images=7).carve(shuffled, "captions.json")
    assert _names(dev_again) == _names(dev)
    # ...and a bigger dev split holds the smaller one (the hash order is fixed).
    assert _names(dev) < _names(DevSplit(images=12).carve(records, "captions.json")[1])
    # The control: another training set picks other images.
    assert _names(DevSplit(images=7).carve(_records("/data", 80)[40:], "x")[1]) != _names(dev)


def test_dev_images_are_the_expected_ones():
    # Pinned: a change of the hash (or of what it reads) would silently move images between dev and train.
    _, dev = DevSplit(images=3).carve(_records("/data/images"), "captions.json")
    assert sorted(_names(dev)) == sorted(_pinned_names())


def _pinned_names() -> list[str]:
    import hashlib

    names = [f"{i:05d}.jpg" for i in range(40)]
    return sorted(names, key=lambda n: hashlib.sha256(f"vlm-lab dev split {n}".encode()).hexdigest())[:3]


def _datamodule(tmp_path, **data):
    ann, images = coco_files(tmp_path)  # 12 images of 5 captions, ids 100..111
    spec = {"name": "coco_captions", "train_ann": ann, "train_images": images, "val_ann": ann, "val_images": images,
            "batch_size": 4, **data}
    return registry.build("datamodule", spec, tokenizer=load_tokenizer(None), image_config=TINY_IMAGES,
                          max_length=32)


def test_coco_serves_dev_and_leaves_it_out_of_training(tmp_path):
    datamodule = _datamodule(tmp_path, dev_split={"images": 4})
    dev = {r.image_id for r in datamodule.records("dev")}
    train = {r.image_id for r in datamodule.records("train")}
    assert len(dev) == 4 and len(train) == 8 and not dev & train
    trained = {i for batch in datamodule.train_dataloader() for i in batch["image_ids"].tolist()}
    assert trained == train
    validated = {i for batch in datamodule.val_dataloader() for i in batch["image_ids"].tolist()}
    assert len(validated) == 12  # validate: false: val stays val
    served = _datamodule(tmp_path / "v", dev_split={"images": 4, "validate": True})
    validated = {i for batch in served.val_dataloader() for i in batch["image_ids"].tolist()}
    assert validated == {r.image_id for r in served.records("dev")}
    # The embedding cache of the fit's validation holds the dev images.
    assert {r.image_id for r in served.cacheable_images("val").records} == validated
    assert {r.image_id for r in served.dataset("val").records} == {r.image_id for r in served.records("val")}


@pytest.mark.parametrize("dev_split, message", [
    ({"images": 12}, "data.dev_split.images=12 is not smaller than the 12 training images of"),
    ({"images": 0}, "data.dev_split.images=0 should be 1 or more"),
    ({"image": 5}, "unknown key 'data.dev_split.image'. Did you mean 'images'?"),
])
def test_bad_dev_splits_are_one_line(tmp_path, capsys, dev_split, message):
    ann, images = coco_files(tmp_path / "data")
    data = ["data.name=coco_captions", f"data.train_ann={ann}", f"data.train_images={images}", f"data.val_ann={ann}",
            f"data.val_images={images}", f"data.dev_split={json.dumps(dev_split)}"]
    assert main(["fit", str(TINY), *data, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_fit_validates_on_dev_and_the_retrieval_evaluator_reads_it(tmp_path):
    ann, images = coco_files(tmp_path / "data")
    data = {"name": "coco_captions", "train_ann": ann, "train_images": images, "val_ann": ann, "val_images": images,
            "batch_size": 4, "dev_split": {"images": 4, "validate": True}}
    for locked in ("false", "true"):  # a locked vision tower: the fit's embedding cache serves dev
        cfg = vlm_lab.load_config(TINY, overrides=[f"model.vision_lock.lock={locked}"])
        cfg.data = data
        cfg.trainer.max_steps = 2
        metrics = vlm_lab.fit(cfg, run_dir=tmp_path / f"run_{locked}")
        assert metrics["val/chance_t2i_R@1"] == pytest.approx(100 / 4)  # 4 dev images, not the 12 of val
    evaluators = build_evaluators(EvalSettings.from_config({"evaluators": {
        "dev": {"name": "retrieval", "data": data, "split": "dev"},
        "val": {"name": "retrieval", "data": data, "split": "val"}}}))
    results = run_evaluators(vlm_lab.build_module(vlm_lab.load_config(TINY)), evaluators)
    assert results["eval/dev/chance_t2i_R@1"] == pytest.approx(100 / 4)
    assert results["eval/val/chance_t2i_R@1"] == pytest.approx(100 / 12)


def test_other_data_modules_say_they_have_no_dev_split(tmp_path):
    synthetic = registry.build("datamodule", {"name": "synthetic_shapes"}, tokenizer=load_tokenizer(None),
                               image_config=TINY_IMAGES, max_length=32)
    with pytest.raises(ConfigError, match="synthetic_shapes has no dev split"):
        synthetic.dataset("dev")
    with pytest.raises(ConfigError, match="coco_captions has no dev split: set data.dev_split"):
        _datamodule(tmp_path).dataset("dev")


# --------------------------------------------------------------------------------------------------
# hf_dataset (map-style): the rows are chosen by vlm_lab.data.hf_datasets.image_identities


def _hf(path, **data):
    spec = {"name": "hf_dataset", "path": str(path), "val_split": None, "test_split": None, "batch_size": 4, **data}
    return registry.build("datamodule", spec, tokenizer=load_tokenizer(None), image_config=TINY_IMAGES,
                          max_length=32)


def _served(loader) -> set[int]:
    return {i for batch in loader for i in batch["image_ids"].tolist()}


def test_hf_dataset_carves_the_dev_images_coco_carves_from_the_same_files(tmp_path):
    from vlm_lab.data.convert import convert

    ann, images = coco_files(tmp_path / "coco")  # 12 images of 5 captions
    convert(tmp_path / "parquet", "parquet", ann=ann, images_dir=images, split="train", shard_size=5)
    coco = _datamodule(tmp_path / "c", dev_split={"images": 4})
    datamodule = _hf(tmp_path / "parquet", dev_split={"images": 4})
    captions = {split: {r.captions for r in datamodule.records(split)} for split in ("train", "dev")}
    # The Parquet rows keep the file names, so the dev images are coco_captions' own.
    assert captions["dev"] == {r.captions for r in coco.records("dev")}
    assert len(captions["dev"]) == 4 and len(captions["train"]) == 8 and not captions["dev"] & captions["train"]
    dev_rows = {r.image_id for r in datamodule.records("dev")}
    assert _served(datamodule.train_dataloader()) == {r.image_id for r in datamodule.records("train")}
    assert {len(datamodule.dataset("dev")[k]["captions"]) for k in range(4)} == {5}
    assert datamodule.split_summary("dev") == {"images": 4, "captions": 20}
    validating = _hf(tmp_path / "parquet", dev_split={"images": 4, "validate": True})
    assert _served(validating.val_dataloader()) == dev_rows
    assert {r.image_id for r in validating.cacheable_images("val").records} == dev_rows


def _saved_table(folder, order, with_names, key=False):
    """A saved datasets table of 10 images (bytes; file names only ``with_names``) in row ``order``."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from datasets_on_disk import jpeg_bytes

    rows = [{"image": {"bytes": jpeg_bytes((25 * i, 40, 90)), "path": f"{i:03d}.jpg" if with_names else None},
             "caption": f"picture {i}", "key": f"k{i}"} for i in order]
    features = Features({"image": ImageFeature(), "caption": Value("string"), "key": Value("string")})
    Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("identity", ["file name", "image bytes", "id_column"])
def test_hf_dev_images_are_the_same_in_any_row_order(tmp_path, identity):
    with_names, extra = identity == "file name", {"id_column": "key"} if identity == "id_column" else {}
    order = list(range(10))
    shuffled = order[:]
    random.Random(1).shuffle(shuffled)
    dev = {}
    for name, rows in (("ordered", order), ("shuffled", shuffled)):
        datamodule = _hf(_saved_table(tmp_path / name, rows, with_names), dev_split={"images": 3, **extra})
        dev[name] = {r.captions[0] for r in datamodule.records("dev")}
        train = {r.captions[0] for r in datamodule.records("train")}
        assert len(dev[name]) == 3 and len(train) == 7 and not dev[name] & train
        # The images served as dev are those rows' images, not other rows' of the table.
        served = datamodule.dataset("dev")
        assert [served[k]["captions"] for k in range(3)] == [[c] for c in
                                                             [r.captions[0] for r in datamodule.records("dev")]]
    assert dev["ordered"] == dev["shuffled"]
    if identity == "id_column":  # pinned: the hash of the named column's values
        import hashlib
        keys = sorted((f"k{i}" for i in range(10)),
                      key=lambda k: hashlib.sha256(f"vlm-lab dev split {k}".encode()).hexdigest())[:3]
        assert dev["ordered"] == {f"picture {k[1:]}" for k in keys}


@pytest.mark.parametrize("data, message", [
    ({"streaming": True, "dev_split": {"images": 3}}, "data.dev_split needs map-style data"),
    ({"dev_split": {"images": 3, "id_column": "nope"}}, "data.dev_split.id_column='nope' is not a column of"),
    ({}, "hf_dataset has no dev split: set data.dev_split"),
])
def test_hf_dev_split_mistakes_are_one_line(tmp_path, data, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        _hf(_saved_table(tmp_path / "t", range(10), True), **data).records("dev")
    assert "\n" not in str(error.value)


def test_coco_refuses_an_id_column(tmp_path):
    with pytest.raises(ConfigError, match="data.dev_split.id_column is an hf_dataset setting"):
        _datamodule(tmp_path, dev_split={"images": 3, "id_column": "file_name"})


def test_hf_dev_split_from_the_command_line(tmp_path, capsys):
    table = _saved_table(tmp_path / "t", range(10), with_names=False)
    data = ["data.name=hf_dataset", f"data.path={table}", "data.val_split=null", "data.test_split=null",
            "data.batch_size=4", "trainer.max_steps=2"]
    run = tmp_path / "run"
    assert main(["fit", str(TINY), *data, "data.dev_split={images: 3, validate: true}", "--run-dir", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["val/chance_t2i_R@1"] == pytest.approx(100 / 3)
    capsys.readouterr()
    assert main(["fit", str(TINY), *data, "data.dev_split={images: 3, id_column: nope}",
                 "--run-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "data.dev_split.id_column='nope' is not a column of" in err and err.count("\n") == 1
