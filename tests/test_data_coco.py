"""The coco_captions data module on real COCO and Flickr8k files, and on broken ones."""

import collections
import json
from pathlib import Path

import pytest
import torch
from timm.data import create_transform, resolve_data_config

import vlm_lab
from datasets_on_disk import COCO_MINI, FLICKR8K, TINY_IMAGES, jpeg_bytes, needs_shared, truncated_jpeg
from vlm_lab.data.coco import CocoCaptionsDataModule
from vlm_lab.data.transforms import build_transform, decode_size, open_image
from vlm_lab.errors import ConfigError
from vlm_lab.tokenizer import load_tokenizer
from vlm_lab.towers.base import ImageConfig
from vlm_lab.towers.timm_tower import TimmVisionTower

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def coco(tokenizer, image_config=TINY_IMAGES, **data):
    return CocoCaptionsDataModule(tokenizer, image_config, 32, **data)


def captions_by_image(ann_file):
    data = json.loads(Path(ann_file).read_text())
    found = collections.defaultdict(list)
    for annotation in data["annotations"]:
        found[annotation["image_id"]].append(annotation["caption"].strip())
    return found


def normalised(tokenizer, text):
    return tokenizer.decode(tokenizer(text, truncation=True, max_length=32)["input_ids"], skip_special_tokens=True)


@needs_shared
def test_official_layout_validation_gives_every_image_once_with_all_its_captions(tokenizer):
    dm = coco(tokenizer, root=str(COCO_MINI), batch_size=16)
    assert dm.split_summary("train") == {"images": 80, "captions": 400}
    assert dm.split_summary("val") == {"images": 79, "captions": 395}
    expected = captions_by_image(COCO_MINI / "annotations" / "captions_val2017.json")
    seen_images, seen_captions = [], collections.defaultdict(list)
    for batch in dm.val_dataloader():
        ids = batch["image_ids"].tolist()
        seen_images += ids
        for owner, tokens in zip(batch["text_image_index"].tolist(), batch["input_ids"]):
            seen_captions[ids[owner]].append(tokenizer.decode(tokens, skip_special_tokens=True))
    assert sorted(seen_images) == sorted(expected)  # 79 images, once each
    assert sum(len(c) for c in seen_captions.values()) == 395
    for image_id, captions in expected.items():
        assert seen_captions[image_id] == [normalised(tokenizer, c) for c in captions]
    assert dm.bad_samples["val"].take() == {}


@needs_shared
def test_training_draws_one_caption_per_image_anew_each_epoch(tokenizer):
    dm = coco(tokenizer, root=str(COCO_MINI), batch_size=16)
    expected = captions_by_image(COCO_MINI / "annotations" / "captions_train2017.json")
    loader = dm.train_dataloader()
    drawn = []
    for _ in range(2):
        epoch = {}
        for batch in loader:
            assert batch["text_image_index"].tolist() == list(range(16))  # one caption per image
            for image_id, tokens in zip(batch["image_ids"].tolist(), batch["input_ids"]):
                epoch[image_id] = tokenizer.decode(tokens, skip_special_tokens=True)
        drawn.append(epoch)
    assert len(drawn[0]) == 80  # drop_last: 5 full batches cover all 80
    for image_id, caption in drawn[0].items():
        assert caption in [normalised(tokenizer, c) for c in expected[image_id]]
    changed = sum(drawn[0][i] != drawn[1][i] for i in drawn[0])
    assert changed > 40  # 4 in 5 expected to change; same-caption draws are the exception


@needs_shared
def test_one_entry_per_caption_option(tokenizer):
    dm = coco(tokenizer, root=str(COCO_MINI), train_sampling="caption")
    dataset = dm.dataset("train")
    assert len(dataset) == 400
    captions = collections.Counter(c for i in range(len(dataset)) for c in dataset[i]["captions"])
    expected = collections.Counter(c for cs in captions_by_image(
        COCO_MINI / "annotations" / "captions_train2017.json").values() for c in cs)
    assert captions == expected


@needs_shared
def test_flickr8k_via_explicit_annotation_files(tokenizer):
    dm = coco(tokenizer, train_ann=str(FLICKR8K / "annotations" / "captions_train.json"),
              train_images=str(FLICKR8K / "images"), val_ann=str(FLICKR8K / "annotations" / "captions_val.json"),
              val_images=str(FLICKR8K / "images"), batch_size=8)
    assert dm.split_summary("train") == {"images": 6091, "captions": 30455}
    assert dm.split_summary("val") == {"images": 1000, "captions": 5000}
    batch = next(iter(dm.val_dataloader()))
    assert batch["text_image_index"].tolist() == [i for i in range(8) for _ in range(5)]
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    with pytest.raises(ConfigError, match="no test split: set data.test_ann and data.test_images"):
        dm.test_dataloader()


@needs_shared
def test_pixels_are_prepared_as_the_timm_tower_says(tokenizer):
    tower = TimmVisionTower("test_vit", model_args={"img_size": 64})
    dm = coco(tokenizer, image_config=tower.image_config, root=str(COCO_MINI))
    sample = dm.dataset("val")[0]
    record = dm.records("val")[0]
    timm_config = resolve_data_config({"input_size": (3, 64, 64)}, model=tower.model)
    assert sample["pixel_values"].shape == timm_config["input_size"]
    reference = create_transform(**timm_config)(open_image(record.path, decode_size(tower.image_config)))
    assert torch.equal(sample["pixel_values"], reference)
    # Decoding at a reduced JPEG scale gives the pixels of a full decode, within resampling noise.
    full = create_transform(**timm_config)(open_image(record.path))
    assert (sample["pixel_values"] - full).abs().mean() < 0.05


@needs_shared
def test_pixels_follow_an_hf_image_processor(tokenizer):
    from transformers import CLIPImageProcessor

    from vlm_lab.towers.hf import image_config_from_processor

    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40})
    config = image_config_from_processor(processor)
    image = open_image(str(COCO_MINI / "val2017" / "000000397133.jpg"))
    ours = build_transform(config)(image)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 40, 40)
    # Same scale, crop and normalisation; the resize rounds the 71.9-pixel width differently, which
    # moves the crop by at most one pixel.
    shifted = min((ours[:, 1:-1, 1:-1] - theirs[:, 1 + dy:39 + dy, 1 + dx:39 + dx]).abs().mean()
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert shifted < 0.01


def test_reduced_jpeg_decoding_keeps_enough_pixels(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(size=(640, 427)))
    config = ImageConfig(size=(64, 48), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    image = open_image(str(path), decode_size(config))
    assert min(image.size) >= 64 / 0.875 and image.size[0] < 640  # smaller, yet not below the resize
    pixels = build_transform(config)(image)
    assert pixels.shape == (3, 64, 48)
    augmented = build_transform(config, augment=True)(image)
    assert augmented.shape == (3, 64, 48)


def make_coco_dir(tmp_path):
    """A COCO-format folder with one of each broken sample among good ones."""
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes((40 * i, 80, 80)))
        entries.append((i, f"{i}.jpg", [f"picture {i}", f"image {i}"]))
    (images / "truncated.jpg").write_bytes(truncated_jpeg())
    entries += [(10, "truncated.jpg", ["cut off"]), (11, "absent.jpg", ["not there"]), (12, "0.jpg", [" ", ""])]
    ann = {"images": [{"id": i, "file_name": name} for i, name, _ in entries],
           "annotations": [{"id": 100 * i + j, "image_id": i, "caption": c}
                           for i, _, captions in entries for j, c in enumerate(captions)]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    return str(tmp_path / "captions.json"), str(images)


def test_bad_samples_are_replaced_and_counted(tokenizer, tmp_path):
    ann, images = make_coco_dir(tmp_path)
    dm = coco(tokenizer, train_ann=ann, train_images=images, val_ann=ann, val_images=images, batch_size=9)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["image_ids"]) == 9  # the batch keeps its size
    assert set(batch["image_ids"].tolist()) == set(range(6))
    assert dm.bad_samples["train"].take() == {"undecodable image": 1, "missing image": 1, "empty caption": 1}
    val_ids = [i for b in dm.val_dataloader() for i in b["image_ids"].tolist()]
    assert set(val_ids) == set(range(6))  # replacements are duplicates, dropped by retrieval


@pytest.mark.slow
def test_bad_samples_are_logged_per_epoch_by_fit(tmp_path):
    ann, images = make_coco_dir(tmp_path)
    cfg = vlm_lab.load_config(TINY, overrides=[
        "data.name=coco_captions", f"data.train_ann={ann}", f"data.train_images={images}", f"data.val_ann={ann}",
        f"data.val_images={images}", "data.batch_size=3", "trainer.max_epochs=1"])
    metrics = vlm_lab.fit(cfg, run_dir=tmp_path / "run")
    assert metrics["val/bad_samples"] == 3
    assert metrics["val/chance_i2t_R@1"] == pytest.approx(100 * 2 / 12, rel=1e-3)  # 6 good images, 2 captions each


@needs_shared
@pytest.mark.slow
def test_fit_on_coco_mini_evaluates_all_val_captions(tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=[
        "data.name=coco_captions", f"data.root={COCO_MINI}", "data.batch_size=16", "trainer.max_epochs=1"])
    metrics = vlm_lab.fit(cfg, run_dir=tmp_path / "run")
    assert metrics["val/chance_i2t_R@1"] == pytest.approx(100 * 5 / 395, rel=1e-3)  # 5 right captions of 395
    assert metrics["val/chance_t2i_R@1"] == pytest.approx(100 / 79, rel=1e-3)
    assert metrics["val/bad_samples"] == 0


def test_wrong_root_names_the_missing_file(tokenizer, tmp_path):
    (tmp_path / "train2017").mkdir()
    with pytest.raises(ConfigError, match=r"annotations/captions_train2017\.json does not exist"):
        coco(tokenizer, root=str(tmp_path))
    with pytest.raises(ConfigError, match="data.root: no folder at"):
        coco(tokenizer, root=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("content, message", [
    ({"annotations": []}, r"has no 'images' field"),
    ({"images": [], "info": {}}, r"has no 'annotations' field"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}, r"images\[0\] has no 'file_name'"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_captions_json_names_file_and_field(tokenizer, tmp_path, content, message):
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(content))
    dm = coco(tokenizer, val_ann=str(ann), val_images=str(tmp_path))
    with pytest.raises(ConfigError, match=f"{ann}.*{message}" if "images[" not in message else message) as error:
        dm.val_dataloader()
    assert "\n" not in str(error.value) and str(ann) in str(error.value)


def test_half_given_split_and_missing_files(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="data.train_ann is set but data.train_images is not"):
        coco(tokenizer, train_ann="x.json")
    with pytest.raises(ConfigError, match="data.val_ann: no captions file at"):
        coco(tokenizer, val_ann=str(tmp_path / "x.json"), val_images=str(tmp_path))
    with pytest.raises(ConfigError, match="needs data.root"):
        coco(tokenizer)
