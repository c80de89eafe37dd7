"""Recipe knobs of current papers (docs/how-to/recipe-knobs.md): FLIP patch dropout, layer-wise
learning-rate decay and image augmentation through timm. Each changes what it should and nothing else,
from YAML/overrides, the CLI and Python; bad values fail in one line. (Distillation: test_distillation.py;
torch.compile: test_compile.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from timm.data import create_transform

import vlm_lab
from datasets_on_disk import TINY_IMAGES, jpeg_bytes
from vlm_lab import registry
from vlm_lab.cli import main
from vlm_lab.data.transforms import AUGMENT_SCALE, Augmentation, build_transform, open_image
from vlm_lab.errors import ConfigError
from vlm_lab.locking import layer_groups
from vlm_lab.tokenizer import load_tokenizer
from vlm_lab.towers.clip_vit import PatchDropout

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def tiny_module(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return vlm_lab.build_module(vlm_lab.load_config(TINY, overrides=list(overrides)))


# --------------------------------------------------------------------------------------------------
# FLIP patch dropout


def test_patch_dropout_keeps_the_class_token_and_a_random_subset_of_patches():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # class token + 16 patches
    dropout = PatchDropout(0.5).train()
    kept = dropout(tokens)
    assert kept.shape == (2, 1 + 8, 3)
    assert torch.equal(kept[:, 0], tokens[:, 0])
    for row in range(2):
        rows = {tuple(t.tolist()) for t in kept[row, 1:]}
        assert len(rows) == 8 and rows <= {tuple(t.tolist()) for t in tokens[row, 1:]}  # distinct, real patches
    assert not torch.equal(kept, dropout(tokens))  # drawn anew each call
    assert torch.equal(dropout.eval()(tokens), tokens) and torch.equal(PatchDropout(0.0).train()(tokens), tokens)


def test_patch_dropout_is_off_at_eval_and_changes_no_weight():
    dropped, plain = tiny_module("model.vision.patch_dropout=0.5"), tiny_module()
    assert dropped.vision.patch_dropout.prob == 0.5
    assert dropped.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(dropped.state_dict().values(), plain.state_dict().values()))
    pixels = torch.randn(4, 3, 32, 32)
    dropped.eval(), plain.eval()
    assert torch.equal(dropped.encode_image(pixels), plain.encode_image(pixels))
    # In training the tower sees half of its 16 patches: other outputs, fewer tokens.
    dropped.train(), plain.train()
    assert dropped.vision(pixels).tokens.shape[1] == 1 + 8 and plain.vision(pixels).tokens.shape[1] == 1 + 16
    assert not torch.allclose(dropped.vision(pixels).pooled, plain.vision(pixels).pooled)


def test_timm_vits_take_patch_drop_rate_through_model_args():
    spec = {"name": "timm", "model_name": "vit_tiny_patch16_224", "model_args": {"img_size": 32}}
    torch.manual_seed(0)
    plain = registry.build("vision_tower", spec)
    torch.manual_seed(0)
    dropped = registry.build("vision_tower", {**spec, "model_args": {"img_size": 32, "patch_drop_rate": 0.5}})
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(dropped.eval()(pixels).pooled, plain.eval()(pixels).pooled)
    assert dropped.train()(pixels).tokens.shape[1] == 1 + 2 and plain.train()(pixels).tokens.shape[1] == 1 + 4
    with pytest.raises(ConfigError, match="model_args .* rejected by resnet18"):  # not a ViT: one line
        registry.build("vision_tower", {"name": "timm", "model_name": "resnet18", "model_args": {"patch_drop_rate": 0.5}})


# --------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


class FakeTrainer:
    estimated_stepping_batches = 10
    strategy = SingleDeviceStrategy("cpu")  # restores a checkpoint before setup


def lr_of_each_parameter(module) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of every parameter the optimizer holds, by name."""
    module.trainer = FakeTrainer()
    optimizer = module.configure_optimizers()["optimizer"]
    name_of = {id(p): n for n, p in module.named_parameters()}
    return {name_of[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def groups_before_layer_decay(module) -> list[tuple[float, float, list[int]]]:
    """The parameter groups configure_optimizers built before optim.layer_decay existed (its rule, restated)."""
    cfg = module.hparams.optim
    groups: dict[tuple[float, bool], list[int]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            scale = cfg["lr_scale"].get(name.split(".", 1)[0], 1.0)
            groups.setdefault((scale, name not in module._no_decay_names), []).append(id(p))
    ordered = sorted(groups.items(), key=lambda g: (not g[0][1], g[0][0]))
    return [(cfg["lr"] * scale, cfg["weight_decay"] if decays else 0.0, ids) for (scale, decays), ids in ordered]


@pytest.mark.parametrize("overrides", [[], ["optim.lr_scale.vision=0.1"], ["model.vision_lock.lock=true"]])
def test_without_layer_decay_the_parameter_groups_are_as_before(overrides):
    module = tiny_module(*overrides)
    module.trainer = FakeTrainer()
    optimizer = module.configure_optimizers()["optimizer"]
    built = [(g["initial_lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]
    assert built == groups_before_layer_decay(module)


def test_layer_decay_scales_each_layer_group_of_a_tower():
    base = lr_of_each_parameter(tiny_module("model.vision.layers=3", "optim.lr_scale.vision=0.5"))
    decayed = lr_of_each_parameter(tiny_module("model.vision.layers=3", "optim.lr_scale.vision=0.5",
                                               "optim.layer_decay.vision=0.8"))
    module = tiny_module("model.vision.layers=3")
    groups = layer_groups(module.vision)
    assert len(groups) == 4  # embeddings + pre-norm, then the 3 blocks (the last with the final norm)
    lr = module.hparams.optim["lr"]
    for index, group in enumerate(groups):
        for name in group:  # the top block 0.8, down to the embeddings 0.8 ** 4, on top of lr_scale
            assert decayed[f"vision.{name}"][0] == pytest.approx(lr * 0.5 * 0.8 ** (4 - index))
            assert decayed[f"vision.{name}"][1] == base[f"vision.{name}"][1]  # weight decay unchanged
    others = [name for name in base if not name.startswith("vision.")]
    assert others and all(decayed[name] == base[name] for name in others)  # text tower, heads, loss untouched


def test_layer_decay_on_a_timm_tower_follows_timms_groups():
    overrides = ["model.vision.name=timm", "model.vision.model_name=vit_tiny_patch16_224",
                 "model.vision.model_args={img_size: 32, depth: 2}"]
    decayed = lr_of_each_parameter(tiny_module(*overrides, "optim.layer_decay.vision=0.5", "optim.layer_decay.text=0.9"))
    module = tiny_module(*overrides)
    groups, lr = layer_groups(module.vision), module.hparams.optim["lr"]
    assert len(groups) == 3  # stem, 2 blocks (timm puts the final norm with the last)
    for index, group in enumerate(groups):
        assert [decayed[f"vision.{name}"][0] for name in group] == pytest.approx([lr * 0.5 ** (3 - index)] * len(group))
    text_groups = layer_groups(module.text)
    assert decayed[f"text.{text_groups[0][0]}"][0] == pytest.approx(lr * 0.9 ** len(text_groups))


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_bad_layer_decay_is_one_line(value):
    with pytest.raises(ConfigError, match=rf"optim.layer_decay.text={value} should be above 0 and at most 1"):
        tiny_module(f"optim.layer_decay.text={value}")


def test_layer_decay_needs_layer_groups(clean_registry):
    @clean_registry.register_vision_tower("blockless")
    class Blockless(torch.nn.Module):
        image_config = TINY_IMAGES
        output_dim = token_dim = 8

        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 8)

    tiny_module("model.vision.name=blockless")  # fine without layer decay
    with pytest.raises(ConfigError, match="optim.layer_decay.vision=0.7: Blockless has no stack of blocks"):
        tiny_module("model.vision.name=blockless", "optim.layer_decay.vision=0.7")


# --------------------------------------------------------------------------------------------------
# Augmentation through timm's create_transform


def photo(tmp_path) -> object:
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes((30, 140, 220), size=(60, 44)))
    return open_image(path)


def test_augment_true_is_the_transform_it_always_was(tmp_path):
    config = TINY_IMAGES
    before = create_transform(input_size=(3, 32, 32), is_training=True, scale=AUGMENT_SCALE, hflip=0.0,
                              color_jitter=0.0, interpolation=config.interpolation, mean=config.mean, std=config.std)
    now = build_transform(config, augment=True)
    assert repr(now) == repr(before)
    image = photo(tmp_path)
    torch.manual_seed(3)
    expected = before(image)
    torch.manual_seed(3)
    assert torch.equal(now(image), expected)


def test_an_augmentation_mapping_reaches_create_transform():
    augmentation = Augmentation.from_config({"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "hflip": 0.5,
                                             "scale": [0.5, 1.0], "interpolation": "bilinear"})
    text = repr(build_transform(TINY_IMAGES, augment=augmentation))
    for part in ("RandAugment", "RandomErasing(p=0.25", "RandomHorizontalFlip(p=0.5)", "scale=(0.5, 1.0)",
                 "interpolation=bilinear"):
        assert part in text, part
    jitter = repr(build_transform(TINY_IMAGES, augment=Augmentation.from_config({"color_jitter": [0.4, 0.4, 0.4, 0.1]})))
    assert "ColorJitter(brightness=(0.6, 1.4)" in jitter and "hue=(-0.1, 0.1)" in jitter
    assert Augmentation.from_config(False) is None and Augmentation.from_config(True) == Augmentation()
    with pytest.raises(ConfigError, match="random erasing works on normalised float pixels"):
        build_transform(TINY_IMAGES, augment=augmentation, normalize=False)  # timm would drop it silently


def coco_files(tmp_path, count: int = 8) -> tuple[str, str]:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes((25 * i, 90, 200 - 20 * i), size=(48, 40)))
    captions = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(count)],
                "annotations": [{"image_id": i, "caption": f"image {i}"} for i in range(count)]}
    (folder / "captions.json").write_text(json.dumps(captions))
    return str(folder / "captions.json"), str(folder)


def test_augmented_training_images_are_not_cached_and_evaluation_is_not_augmented(tmp_path):
    ann, images = coco_files(tmp_path)
    spec = {"name": "coco_captions", "train_ann": ann, "train_images": images, "val_ann": ann, "val_images": images,
            "augment": {"auto_augment": "rand-m9-mstd0.5", "color_jitter": 0.4}}
    datamodule = registry.build("datamodule", spec, tokenizer=load_tokenizer(None), image_config=TINY_IMAGES,
                                max_length=16)
    assert datamodule.augment.auto_augment == "rand-m9-mstd0.5"
    assert datamodule.cacheable_images("train") is None  # random: never the locked tower's cache
    assert datamodule.cacheable_images("val") is not None
    assert repr(datamodule.transform("val")) == repr(build_transform(TINY_IMAGES))
    assert "RandAugment" in repr(datamodule.transform("train"))


@pytest.mark.parametrize("augment, message", [
    ({"auto_agument": "rand-m9"}, "unknown key 'data.augment.auto_agument'. Did you mean 'auto_augment'?"),
    ({"hflip": 2}, "data.augment.hflip=2 should be a probability, from 0 to 1"),
    ({"scale": [1.0, 0.5]}, r"data.augment.scale=\[1.0, 0.5\] should be \[low, high\]"),
    ({"scale": 0.5}, "data.augment.scale=0.5 should be a list of two numbers"),
    ({"auto_augment": "randomly"}, "data.augment.auto_augment='randomly' is not a timm augmentation policy"),
    ({"interpolation": "bicubc"}, "data.augment.interpolation='bicubc' is not one of .* Did you mean 'bicubic'"),
    ({"color_jitter": [0.4, 0.4]}, r"data.augment.color_jitter=\(0.4, 0.4\) should be a number"),
    ({"re_count": 0}, "data.augment.re_count=0 should be an integer of at least 1"),
    ("yes", "argument augment='yes' should be true or false or a mapping"),
])
def test_bad_augmentation_is_one_line(tmp_path, augment, message):
    ann, images = coco_files(tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        registry.build("datamodule", {"name": "coco_captions", "train_ann": ann, "train_images": images,
                                      "augment": augment},
                       tokenizer=load_tokenizer(None), image_config=TINY_IMAGES, max_length=16)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# From the command line


def test_the_knobs_from_the_command_line(capsys, tmp_path):
    ann, images = coco_files(tmp_path)
    knobs = ["model.vision.patch_dropout=0.5", "optim.layer_decay.vision=0.8", "optim.layer_decay.text=0.9",
             "data.name=coco_captions", f"data.train_ann={ann}", f"data.train_images={images}",
             "data.augment={auto_augment: rand-m9-mstd0.5, re_prob: 0.25}"]
    assert main(["check", TINY, *knobs, "--run-dir", str(tmp_path / "run")]) == 0
    assert "config OK" in capsys.readouterr().out
    for bad, message in [("model.vision.patch_dropout=1.0", "clip_vit: patch_dropout=1.0 should be at least 0"),
                         ("optim.layer_decay.vision=fast", "optim.layer_decay.vision='fast' should be a number"),
                         ("data.augment={re_prob: 3}", "data.augment.re_prob=3 should be a probability")]:
        assert main(["check", TINY, *knobs, bad, "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
