"""``data.dev_split``: training images set aside for recipe choices (vlm_lab/data/dev_split.py).

Disjoint from train, of the size asked, the same whatever the order of the captions file or the
folder the images sit in; a fit can validate on it and the ``retrieval`` evaluator read it; a dev
split as large as train, or a misspelt key, is one line.
"""

from __future__ import annotations

import json
import random

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
