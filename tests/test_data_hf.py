"""The hf_dataset data module: Hugging Face ``datasets`` folders, map-style and streaming.

The shared Flickr8k is converted here, in the test, to Parquet files and to an imagefolder with a
metadata.jsonl; both give the same retrieval metrics as ``coco_captions`` on the same images and
captions for one fixed model.
"""

import collections
import json
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

import vlm_lab
from datasets_on_disk import FLICKR8K, TINY_IMAGES, jpeg_bytes, needs_shared, truncated_jpeg
from vlm_lab.cli import main
from vlm_lab.data.convert import convert
from vlm_lab.data.hf_datasets import HFDatasetDataModule
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
SUBSET = 40  # Flickr8k val images converted per test: enough for retrieval, quick to write


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def hf(tokenizer, path, **data):
    return HFDatasetDataModule(tokenizer, TINY_IMAGES, 32, path=str(path), **data)


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    """The first 40 Flickr8k val images with their 200 captions: a COCO file, Parquet files, an imagefolder."""
    root = tmp_path_factory.mktemp("flickr")
    ann = json.loads((FLICKR8K / "annotations" / "captions_val.json").read_text())
    keep = ann["images"][:SUBSET]
    ids = {image["id"] for image in keep}
    subset = {"images": keep, "annotations": [a for a in ann["annotations"] if a["image_id"] in ids]}
    (root / "captions.json").write_text(json.dumps(subset))
    coco = dict(ann=str(root / "captions.json"), images_dir=str(FLICKR8K / "images"))
    convert(root / "parquet", "parquet", split="validation", shard_size=16, **coco)  # 3 files: 16, 16, 8
    convert(root / "imagefolder", "imagefolder", split="validation", **coco)
    return root


def validate(tmp_path, name, data):
    """``vlm-lab validate`` of the tiny model (seeded, so the same weights every time) on ``data``."""
    cfg = vlm_lab.load_config(TINY, overrides=[f"data={data}", "data.eval_batch_size=16"])
    return vlm_lab.validate(cfg, run_dir=tmp_path / name)


@needs_shared
def test_parquet_and_imagefolder_give_the_metrics_of_coco_captions(flickr, tmp_path):
    coco = validate(tmp_path, "coco", f"{{name: coco_captions, val_ann: {flickr / 'captions.json'}, "
                                      f"val_images: {FLICKR8K / 'images'}}}")
    assert coco["val/chance_t2i_R@1"] == pytest.approx(100 / SUBSET)  # all 40 images, 5 captions each
    assert coco["val/chance_i2t_R@1"] == pytest.approx(100 * 5 / 200)
    cache = tmp_path / "hf_cache"
    for name, data in [("parquet", f"{{path: {flickr / 'parquet'}, cache_dir: {cache}}}"),
                       ("parquet_streaming", f"{{path: {flickr / 'parquet'}, streaming: true}}"),
                       ("imagefolder", f"{{path: {flickr / 'imagefolder'}, cache_dir: {cache}}}")]:
        metrics = validate(tmp_path, name, "{name: hf_dataset, " + data[1:])
        assert metrics == coco, name  # every metric, the loss included, bit for bit


@needs_shared
def test_the_retrieval_evaluator_reads_a_streamed_split(flickr, tmp_path):
    from vlm_lab.eval.suite import run_evaluators

    module = vlm_lab.build_module(vlm_lab.load_config(TINY))
    coco = {"name": "coco_captions", "val_ann": str(flickr / "captions.json"), "val_images": str(FLICKR8K / "images")}
    streamed = {"name": "hf_dataset", "path": str(flickr / "parquet"), "streaming": True, "eval_batch_size": 16}
    metrics = run_evaluators(module, {name: vlm_lab.build("evaluator", {"name": "retrieval", "data": data})
                                      for name, data in (("coco", coco), ("streamed", streamed))})
    assert metrics["eval/streamed/images"] == SUBSET and metrics["eval/streamed/texts"] == 5 * SUBSET
    for key in [k for k in metrics if k.startswith("eval/coco/")]:
        assert metrics[key.replace("/coco/", "/streamed/")] == pytest.approx(metrics[key], abs=1e-4), key


@needs_shared
def test_streaming_reads_every_image_once_across_ranks_and_workers(tokenizer, flickr):
    dm = hf(tokenizer, flickr / "parquet", streaming=True, eval_batch_size=4, num_workers=2)
    assert dm.split_summary("val") == {"images": 40, "captions": None, "shards": 3}
    per_rank = []
    for rank in range(2):
        stream = dm.stream("val", rank, 2)
        per_rank.append(list(DataLoader(stream, batch_size=None, num_workers=2)))
    ids = [i for batches in per_rank for b in batches for i in b["image_ids"].tolist()]
    # 3 shards over 4 readers: 16 + 16 + 8 rows, split by sample; shorter shares top up by repeating.
    assert set(ids) == {shard * 10**9 + row for shard, rows in enumerate((16, 16, 8)) for row in range(rows)}
    assert len(per_rank[0]) == len(per_rank[1]) == len(dm.stream("val", 0, 2))
    assert sum(len(b["text_image_index"]) for b in per_rank[0]) == 5 * sum(len(b["image_ids"]) for b in per_rank[0])


@needs_shared
def test_training_epochs_are_seeded_map_style_and_streaming(tokenizer, flickr, tmp_path):
    for data in (dict(cache_dir=str(tmp_path / "cache")), dict(streaming=True, shuffle_buffer=8)):
        dm = hf(tokenizer, flickr / "parquet", train_split="validation", batch_size=8, **data)

        def epoch(number, dm=dm):
            dm.set_epoch(number)
            return [i for b in dm.train_dataloader() for i in b["image_ids"].tolist()]

        first, again, second = epoch(0), epoch(0), epoch(1)
        assert first == again != second and sorted(first) == sorted(second) and len(set(first)) == 40


def write_dirty(folder: Path) -> None:
    """A Parquet split of 8 rows: 5 good, a truncated JPEG, a row without image, an empty caption."""
    from datasets import Dataset, Features, Image, List, Value

    rows = [{"image": {"bytes": jpeg_bytes((30 * i, 60, 90)), "path": f"{i}.jpg"}, "caption": [f"picture {i}", " "]}
            for i in range(5)]
    rows += [{"image": {"bytes": truncated_jpeg(), "path": "cut.jpg"}, "caption": ["a cut off picture"]},
             {"image": None, "caption": ["no picture here"]},
             {"image": {"bytes": jpeg_bytes(), "path": "quiet.jpg"}, "caption": ["", "  "]}]
    features = Features({"image": Image(), "caption": List(Value("string"))})
    folder.mkdir()
    Dataset.from_list(rows, features=features).to_parquet(str(folder / "validation-00000-of-00001.parquet"))


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_images_and_empty_captions_are_skipped_and_counted(tokenizer, tmp_path, streaming):
    write_dirty(tmp_path / "dirty")
    dm = hf(tokenizer, tmp_path / "dirty", streaming=streaming, cache_dir=str(tmp_path / "cache"), eval_batch_size=4)
    batches = list(dm.val_dataloader())
    ids = {i for b in batches for i in b["image_ids"].tolist()}
    assert len(ids) == 5 and all(c.startswith("picture ") for b in batches for c in b["captions"])
    assert dm.bad_samples["val"].take() == {"missing image": 1, "undecodable image": 1, "empty caption": 1}


def test_a_saved_dataset_dict_map_style_and_streaming(tokenizer, tmp_path):
    from datasets import Dataset, DatasetDict, Features, Image, Value

    features = Features({"picture": Image(), "text": Value("string")})
    rows = [{"picture": {"bytes": jpeg_bytes((20 * i, 0, 0)), "path": None}, "text": f"red {i}"} for i in range(6)]
    DatasetDict({"train": Dataset.from_list(rows, features=features),
                 "test": Dataset.from_list(rows[:3], features=features)}).save_to_disk(str(tmp_path / "saved"))
    for streaming in (False, True):
        dm = hf(tokenizer, tmp_path / "saved", image_column="picture", caption_column="text", captions="string",
                streaming=streaming, batch_size=2)
        test = [c for b in dm.test_dataloader() for c in b["captions"]]
        assert test == ["red 0", "red 1", "red 2"]
        assert len(list(dm.train_dataloader())) == 3
    with pytest.raises(ConfigError, match=r"split 'validation' is not in .*saved; its splits: train, test"):
        hf(tokenizer, tmp_path / "saved", image_column="picture", caption_column="text").val_dataloader()


def test_columns_splits_and_caption_form_are_checked_in_one_line(tokenizer, tmp_path):
    write_dirty(tmp_path / "data")
    cases = [
        (dict(image_column="img"), r"data.image_column='img' is not a column of .*data \(validation\); "
                                   r"its columns: image, caption$"),
        (dict(caption_column="text"), r"data.caption_column='text' is not a column .*; its columns: image, caption$"),
        (dict(captions="string"), r"data.captions='string', but column 'caption' of .* holds a list of strings per "
                                  r"row; set data.captions='list'"),
        (dict(image_column="caption", caption_column="image"), r"data.image_column='caption' .* holds "
                                                                r"List\(Value\('string'\)\), not images"),
        (dict(val_split="val"), r"split 'val' is not in .*; its splits: validation$"),
        (dict(val_split=None), r"hf_dataset has no val split: set data.val_split to one of validation$"),
    ]
    for data, message in cases:
        dm = hf(tokenizer, tmp_path / "data", cache_dir=str(tmp_path / "cache"), **data)
        with pytest.raises(ConfigError, match=message):
            dm.val_dataloader()
    with pytest.raises(ConfigError, match="data.path: no dataset folder at ./nowhere/data"):
        hf(tokenizer, "./nowhere/data")
    with pytest.raises(ConfigError, match="train_sampling=caption needs map-style data"):
        hf(tokenizer, tmp_path / "data", streaming=True, train_sampling="caption")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no dataset found there"):
        hf(tokenizer, tmp_path / "empty")


def test_a_hub_id_offline_is_one_line(capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert main(["fit", TINY, "data={name: hf_dataset, path: nlphuji/flickr30k}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vlm-lab: error: data.path='nlphuji/flickr30k' is not a local folder, and as a Hugging Face hub id it needs "
        "the network, but HF_HUB_OFFLINE is set; run online or point data.path at a local copy"]


@needs_shared
def test_convert_reads_a_datasets_dataset_into_shards_and_coco(flickr, tmp_path, capsys):
    for source in ("parquet", "imagefolder"):
        assert main(["data", "convert", "--hf", str(flickr / source), "--split", "validation", "--out",
                     str(tmp_path / source / "shards"), "--per", "image", "--shard-size", "25"]) == 0
        assert "wrote 40 samples in 2 shard(s)" in capsys.readouterr().out
        assert main(["data", "convert", "--hf", str(flickr / source), "--split", "validation", "--out",
                     str(tmp_path / source / "coco"), "--to", "coco"]) == 0
        assert "wrote 40 samples" in capsys.readouterr().out
    original = json.loads((flickr / "captions.json").read_text())
    by_name = {i["file_name"]: i["id"] for i in original["images"]}
    expected = collections.Counter((by_name[i["file_name"]], a["caption"].strip())
                                   for i in original["images"] for a in original["annotations"] if a["image_id"] == i["id"])
    written = json.loads((tmp_path / "parquet" / "coco" / "annotations" / "captions_validation.json").read_text())
    names = {i["id"]: i["file_name"] for i in written["images"]}
    assert collections.Counter((by_name[names[a["image_id"]]], a["caption"]) for a in written["annotations"]) == expected
    assert all((tmp_path / "parquet" / "coco" / "images" / n).read_bytes() == (FLICKR8K / "images" / n).read_bytes()
               for n in names.values())
