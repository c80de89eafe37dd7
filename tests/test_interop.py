"""Interop with Hugging Face and open_clip: parity both ways, presets, export command, errors.

Reference models are randomly initialised here (tiny ``transformers.CLIPModel`` and
``open_clip.CLIP``), with every parameter perturbed so that LayerNorm gains, biases and q/k/v differ
from their initial values and a swapped or mis-transposed weight cannot go unnoticed. They are saved
in the formats the hubs use, loaded into vlm-lab, and compared on images, captions (through the real
CLIP BPE tokenizer) and logits; exports are loaded back with ``from_pretrained`` /
``open_clip.create_model`` and compared the same way.
"""

import json
import math
import os
import re
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.cli import main  # noqa: E402
from vlm_lab.errors import ConfigError  # noqa: E402
from vlm_lab.interop import (clip_tokenizer_from_bpe, export, pretrained_text_tower,  # noqa: E402
                             pretrained_vision_tower, read_clip_checkpoint)
from vlm_lab.registry import build  # noqa: E402
from vlm_lab.towers.clip_text import ClipTextTower  # noqa: E402
from vlm_lab.towers.clip_vit import ClipVisionTower  # noqa: E402

from interop_helpers import TOLERANCE, encode, max_diff, perturb, save_checkpoint  # noqa: E402

open_clip = pytest.importorskip("open_clip")  # a dev dependency: CI installs it

CAPTIONS = ["a photo of a cat", "two small red circles left of a blue square", "x", "A DOG, running!"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Image statistics other than CLIP's, to see that they travel with the checkpoint.
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def clip_tokenizer():
    from open_clip.tokenizer import default_bpe

    return clip_tokenizer_from_bpe(default_bpe())


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_clip_tokenizer_from_bpe_matches_open_clip(clip_tokenizer):
    reference = open_clip.tokenizer.SimpleTokenizer()
    expected = reference(CAPTIONS, context_length=20)
    ids = clip_tokenizer(CAPTIONS, padding="max_length", max_length=20, return_tensors="pt")["input_ids"]
    real = expected != 0  # SimpleTokenizer pads with 0, the HF tokenizer with <|endoftext|>
    assert len(clip_tokenizer) == 49408
    assert torch.equal(ids[real], expected[real])


# --------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel directories


def make_hf_clip(directory, tokenizer, eos_token_id: int, seed: int = 0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={**TINY, "vocab_size": 49408, "max_position_embeddings": 16, "eos_token_id": eos_token_id},
        vision_config={**TINY, "image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    perturb(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # exp(3) = 20, not the initial value
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=MEAN, image_std=STD).save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=[49407, 2], ids=["eos_id", "legacy_argmax"])
def hf_clip(request, tmp_path_factory, clip_tokenizer):
    directory = tmp_path_factory.mktemp(f"hf_clip_{request.param}")
    return make_hf_clip(directory, clip_tokenizer, request.param), str(directory)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, clip_tokenizer):
    """One HF checkpoint directory, for the tests that do not depend on the pooling rule."""
    directory = tmp_path_factory.mktemp("hf_clip")
    make_hf_clip(directory, clip_tokenizer, 49407)
    return str(directory)


def hf_reference(model, tokenizer, pixels, captions):
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels)


def test_init_from_hf_clip_matches_transformers(hf_clip, clip_tokenizer, pixels):
    model, path = hf_clip
    cfg = vlm_lab.load_config(overrides=[f"model.init_from={path}"])
    # The architecture comes from config.json, nothing hand-written.
    vision, text = cfg.model.vision, cfg.model.text
    assert (vision.name, vision.width, vision.layers, vision.heads, vision.patch_size) == ("clip_vit", 32, 2, 2, 8)
    assert vision.quick_gelu is False and text.quick_gelu is True and list(vision.image_mean) == MEAN
    assert (text.vocab_size, text.context_length, cfg.model.embed_dim) == (49408, 16, 16)
    assert text.pooling == ("argmax" if model.config.text_config.eos_token_id == 2 else "eos_id")
    assert cfg.model.tokenizer.path == path and cfg.model.tokenizer.max_length == 16

    module = vlm_lab.build_module(cfg).eval()
    assert type(module.tokenizer).__name__ == "CLIPTokenizer"  # the checkpoint's, not the default
    assert module.image_config.mean == tuple(MEAN)
    image, text_features = encode(module, pixels, CAPTIONS)
    expected = hf_reference(model, clip_tokenizer, pixels, CAPTIONS)
    assert max_diff(image, expected.image_embeds) <= TOLERANCE
    assert max_diff(text_features, expected.text_embeds) <= TOLERANCE
    logits = module.loss.logit_scale_value() * image @ text_features.T
    assert max_diff(logits, expected.logits_per_image) <= TOLERANCE * 20


def test_text_pooling_follows_the_config_on_unusual_ids(hf_clip):
    """An end-of-text (49407) in the middle of each row: both HF rules pool it, not the last token."""
    model, path = hf_clip
    text = pretrained_text_tower(path).eval()
    ids = torch.tensor([[49406, 320, 49407, 400, 1125, 539], [49406, 49407, 49407, 2368, 49400, 1]])
    with torch.no_grad():
        expected = model.text_model(input_ids=ids).pooler_output
        out = text(ids)
    assert max_diff(out.pooled, expected) <= TOLERANCE
    assert torch.equal(out.pooled, out.tokens[[0, 1], [2, 1]])


def test_hf_export_roundtrip_loads_offline(hf_clip, clip_tokenizer, pixels, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model, path = hf_clip
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[f"model.init_from={path}"])).eval()
    export(module, "hf", tmp_path / "out")
    exported = CLIPModel.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert exported.config.text_config.eos_token_id == model.config.text_config.eos_token_id
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert tokenizer(CAPTIONS)["input_ids"] == clip_tokenizer(CAPTIONS)["input_ids"]
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out", local_files_only=True)
    assert list(processor.image_mean) == MEAN and processor.crop_size["height"] == 32

    image, text_features = encode(module, pixels, CAPTIONS)
    reference = hf_reference(exported, tokenizer, pixels, CAPTIONS)
    assert max_diff(reference.image_embeds, image) <= TOLERANCE
    assert max_diff(reference.text_embeds, text_features) <= TOLERANCE
    assert torch.equal(exported.logit_scale, model.logit_scale)


def test_pretrained_tower_cards_load_hf_clip(hf_clip, clip_tokenizer, pixels):
    model, path = hf_clip
    vision = build("vision_tower", {"name": "openai_clip_vit_b32", "path": path}).eval()
    assert isinstance(vision, ClipVisionTower) and vision.pretrained_path == path
    with torch.no_grad():
        expected = model.vision_model(pixel_values=pixels).pooler_output
        assert max_diff(vision(pixels).pooled, expected) <= TOLERANCE

    # A pretrained text tower brings its tokenizer; the new heads are trained from scratch (LiT-style).
    cfg = vlm_lab.load_config(overrides=["model.vision.name=openai_clip_vit_b32", f"model.vision.path={path}",
                                         "model.text.name=openai_clip_text_b32", f"model.text.path={path}"])
    module = vlm_lab.build_module(cfg).eval()
    assert isinstance(module.text, ClipTextTower) and module.text.vocab_size == 49408
    assert module.tokenizer("a cat")["input_ids"] == clip_tokenizer("a cat")["input_ids"]
    batch = clip_tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.text_model(**batch).pooler_output
        assert max_diff(module.text(batch["input_ids"], batch["attention_mask"]).pooled, expected) <= TOLERANCE


def test_finetune_experiment_builds_from_a_checkpoint_at_its_path(hf_clip_dir, tmp_path, monkeypatch):
    example = Path(__file__).resolve().parents[1] / "experiments" / "finetune_clip.yaml"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hf_clip_dir, tmp_path / "weights" / "openai" / "clip-vit-base-patch32")
    module = vlm_lab.build_module(vlm_lab.load_config(example))
    assert module.vision.encoder.grad_checkpointing and module.vision.output_dim == 32
    assert type(module.tokenizer).__name__ == "CLIPTokenizer" and module.max_length == 16


def test_card_without_weights_explains_where_they_come_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no checkpoint directory at weights/openai/clip-vit-base-patch32 .*"
                                          r"hf download openai/clip-vit-base-patch32"):
        build("vision_tower", {"name": "openai_clip_vit_b32"})


# --------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def damaged_hf_dir(hf_clip_dir, tmp_path_factory):
    """The HF checkpoint with one tensor dropped and a foreign one added."""
    from safetensors.torch import load_file, save_file

    path = hf_clip_dir
    directory = tmp_path_factory.mktemp("damaged")
    shutil.copytree(path, directory, dirs_exist_ok=True)
    state = load_file(str(directory / "model.safetensors"))
    del state["vision_model.post_layernorm.weight"]
    state["vision_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(directory / "model.safetensors"))
    return str(directory)


def test_partial_state_dict_is_one_line_listing_the_keys(damaged_hf_dir, tmp_path, capsys):
    expected = "missing 1 (vision.post_layernorm.weight); unexpected 1 (vision.extra.weight)"
    cfg = vlm_lab.load_config(overrides=[f"model.init_from={damaged_hf_dir}"])
    with pytest.raises(ConfigError, match=re.escape(f"init_from {damaged_hf_dir} does not match the model: {expected}")):
        vlm_lab.build_module(cfg)
    with pytest.raises(ConfigError, match=r"missing 1 \(post_layernorm.weight\); unexpected 1 \(extra.weight\)"):
        pretrained_vision_tower(damaged_hf_dir)

    config = tmp_path / "from_clip.yaml"
    config.write_text(f"model: {{init_from: {damaged_hf_dir}}}\n")
    assert main(["fit", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_config_that_contradicts_the_checkpoint_is_refused(hf_clip_dir):
    path = hf_clip_dir
    cfg = vlm_lab.load_config(overrides=[f"model.init_from={path}", "model.vision.layers=1"])
    with pytest.raises(ConfigError, match=r"missing none; unexpected 16 \(vision.encoder.layers.1."):
        vlm_lab.build_module(cfg)


def test_tokenizer_must_fit_the_pretrained_vocabulary(hf_clip_dir, tmp_path):
    path = hf_clip_dir
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(path, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    cfg = vlm_lab.load_config(overrides=[f"model.init_from={no_tokenizer}"])
    with pytest.raises(ConfigError, match=rf"{no_tokenizer} has no tokenizer files; set model.tokenizer.path"):
        vlm_lab.build_module(cfg)
    # The checkpoint's tokenizer may be named explicitly instead.
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[f"model.init_from={no_tokenizer}",
                                                                 f"model.tokenizer.path={path}"]))
    assert len(module.tokenizer) == 49408

    small = vlm_lab.load_config(overrides=[f"model.init_from={path}", "model.text.vocab_size=1000"])
    with pytest.raises(ConfigError, match="the tokenizer has 49408 tokens but the text tower's vocabulary only 1000"):
        vlm_lab.build_module(small)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(ConfigError, match="neither a Hugging Face CLIPModel directory .* nor an open_clip one"):
        read_clip_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------------
# open_clip checkpoints


def make_open_clip(directory, tokenizer, text_cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model_cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                       "mlp_ratio": 3.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **text_cfg},
    }
    model = open_clip.CLIP(**model_cfg).eval()
    perturb(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=["argmax", "eos_bias"])
def open_clip_model(request, tmp_path_factory, clip_tokenizer):
    text_cfg = {} if request.param == "argmax" else {"pool_type": "eos", "eos_id": 49407, "proj_bias": True}
    directory = tmp_path_factory.mktemp(f"open_clip_{request.param}")
    return make_open_clip(directory, clip_tokenizer, text_cfg), str(directory)


def open_clip_reference(model, tokenizer, pixels, captions):
    ids = tokenizer(captions, padding="max_length", max_length=model.context_length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(ids, normalize=True)
        logits, _ = model.get_logits(pixels, ids)
    return image, text, logits


def test_init_from_open_clip_matches_open_clip(open_clip_model, clip_tokenizer, pixels):
    model, path = open_clip_model
    cfg = vlm_lab.load_config(overrides=[f"model.init_from={path}"])
    assert cfg.model.vision.mlp_ratio == 3.0 and cfg.model.vision.quick_gelu is True
    assert cfg.model.text_head.bias is (model.text_pool_type == "eos")
    module = vlm_lab.build_module(cfg).eval()
    image, text = encode(module, pixels, CAPTIONS)
    expected_image, expected_text, expected_logits = open_clip_reference(model, clip_tokenizer, pixels, CAPTIONS)
    assert max_diff(image, expected_image) <= TOLERANCE
    assert max_diff(text, expected_text) <= TOLERANCE
    assert max_diff(module.loss.logit_scale_value() * image @ text.T, expected_logits) <= TOLERANCE * 20


def test_open_clip_export_loads_with_create_model(open_clip_model, pixels, tmp_path):
    model, path = open_clip_model
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[f"model.init_from={path}"])).eval()
    export(module, "open_clip", tmp_path / "out")
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()  # strict load of the state dict
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'out'}")
    ids = tokenizer(CAPTIONS)
    image, text = encode(module, pixels, CAPTIONS)
    with torch.no_grad():
        assert max_diff(exported.encode_image(pixels, normalize=True), image) <= TOLERANCE
        assert max_diff(exported.encode_text(ids, normalize=True), text) <= TOLERANCE
    assert exported.logit_scale.item() == pytest.approx(2.5)
    original, exported_state = model.state_dict(), exported.state_dict()
    assert original.keys() == exported_state.keys()
    assert all(torch.equal(original[key], exported_state[key]) for key in original)


def test_open_clip_training_checkpoint_loads(open_clip_model, clip_tokenizer, pixels, tmp_path):
    """What open_clip's training writes: {"epoch", "state_dict"} with DDP's `module.` prefix, as epoch_N.pt."""
    model, path = open_clip_model
    shutil.copytree(path, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[f"model.init_from={tmp_path}"])).eval()
    image, text = encode(module, pixels, CAPTIONS)
    expected_image, expected_text, _ = open_clip_reference(model, clip_tokenizer, pixels, CAPTIONS)
    assert max_diff(image, expected_image) <= TOLERANCE and max_diff(text, expected_text) <= TOLERANCE

    torch.save({}, tmp_path / "epoch_4.pt")
    with pytest.raises(ConfigError, match="cannot tell the open_clip weights.*found epoch_3.pt, epoch_4.pt"):
        read_clip_checkpoint(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"vision_cfg": {"ls_init_value": 1e-5}}, r"vision_cfg.ls_init_value=1e-05 is not supported"),
    ({"text_cfg": {"pool_type": "last"}}, r"text_cfg.pool_type='last' is not supported"),
    ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "is a ModifiedResNet"),
    ({"text_cfg": {"hf_model_name": "bert-base-uncased"}}, "hf_model_name='bert-base-uncased' is not supported"),
    ({"vision_cfg": {"mystery_option": 1}}, "vision_cfg.mystery_option is not an option vlm-lab understands"),
])
def test_open_clip_options_without_a_native_counterpart_are_refused(tmp_path, change, message):
    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8}, "text_cfg": {}}
    for key, value in change.items():
        model_cfg[key].update(value)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=message):
        read_clip_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------------
# Export of models trained in vlm-lab


@pytest.fixture(scope="module")
def native_checkpoint(tmp_path_factory):
    """A native CLIP with the default MiniLM WordPiece tokenizer and `eot` pooling (the quickstart's)."""
    torch.manual_seed(0)
    cfg = vlm_lab.load_config(overrides=["model.vision.layers=2", "model.vision.width=32", "model.vision.heads=2",
                                         "model.vision.image_size=32", "model.text.layers=2", "model.text.width=32",
                                         "model.text.heads=2", "model.embed_dim=16", "model.loss.init_logit_scale=2.0"])
    module = vlm_lab.build_module(cfg).eval()
    perturb(module, 0)
    path = tmp_path_factory.mktemp("native") / "last.ckpt"
    save_checkpoint(module, path)
    return module, str(path)


def test_cli_export_native_model_to_hf(native_checkpoint, pixels, tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPModel

    module, ckpt = native_checkpoint
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", ckpt, "--format", "hf", "--out", str(out)]) == 0
    assert "wrote hf model to" in capsys.readouterr().out
    exported = CLIPModel.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)  # MiniLM's WordPiece, saved alongside
    # pooling: eot becomes "first [SEP]", the token every caption ends with.
    assert exported.config.text_config.eos_token_id == tokenizer.sep_token_id
    image, text = encode(module, pixels, CAPTIONS)
    reference = hf_reference(exported, tokenizer, pixels, CAPTIONS)
    assert max_diff(reference.image_embeds, image) <= TOLERANCE
    assert max_diff(reference.text_embeds, text) <= TOLERANCE
    assert exported.logit_scale.item() == pytest.approx(module.loss.logit_scale.item())


def test_cli_export_native_model_to_open_clip(native_checkpoint, pixels, tmp_path):
    module, ckpt = native_checkpoint
    out = tmp_path / "oc"
    assert main(["export", "--ckpt", ckpt, "--format", "open_clip", "--out", str(out)]) == 0
    exported = open_clip.create_model(f"local-dir:{out}").eval()
    ids = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)  # the saved WordPiece tokenizer
    image, text = encode(module, pixels, CAPTIONS)
    with torch.no_grad():
        assert max_diff(exported.encode_image(pixels, normalize=True), image) <= TOLERANCE
        assert max_diff(exported.encode_text(ids, normalize=True), text) <= TOLERANCE


def test_cli_export_errors_are_one_line(native_checkpoint, tmp_path, capsys):
    _, ckpt = native_checkpoint
    assert main(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--format", "hf", "--out", str(tmp_path)]) == 2
    assert "no checkpoint file at" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", "--ckpt", ckpt, "--format", "hf", "--out", str(tmp_path / "taken")]) == 2
    assert "is not an empty directory" in capsys.readouterr().err


HF_VIT = ("{name: hf_vision, pooling: pooler, config: {model_type: vit, image_size: 32, patch_size: 8, "
          "hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}}")
NATIVE_VIT = "{name: clip_vit, image_size: 32, patch_size: 8, width: 32, layers: 2, heads: 2}"
HF_BERT = ("{name: hf_text, pooling: pooler, config: {model_type: bert, vocab_size: 30522, hidden_size: 32, "
           "num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}}")


@pytest.mark.parametrize("vision", [HF_VIT, NATIVE_VIT], ids=["hf_vision", "clip_vit"])
def test_hf_towers_export_to_a_dual_encoder(vision, pixels, tmp_path):
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    cfg = vlm_lab.load_config(overrides=[f"model.vision={vision}", f"model.text={HF_BERT}", "model.embed_dim=16"])
    torch.manual_seed(0)
    module = vlm_lab.build_module(cfg).eval()
    perturb(module, 1)
    export(module, "hf", tmp_path / "out")
    exported = VisionTextDualEncoderModel.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    batch = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)(
        CAPTIONS, padding=True, return_tensors="pt")
    image, text = encode(module, pixels, CAPTIONS)
    with torch.no_grad():
        output = exported(pixel_values=pixels, **batch)
    assert max_diff(output.image_embeds, image) <= TOLERANCE
    assert max_diff(output.text_embeds, text) <= TOLERANCE


def test_dual_encoder_export_of_a_vision_tower_needs_the_pooler(tmp_path):
    cls_pooled = vlm_lab.load_config(overrides=[f"model.vision={HF_VIT.replace('pooling: pooler', 'pooling: cls')}"])
    with pytest.raises(ConfigError, match="vision tower pools with 'cls', but VisionTextDualEncoderModel uses"):
        export(vlm_lab.build_module(cls_pooled), "hf", tmp_path / "cls")
    assert not (tmp_path / "cls").exists()  # a refused export leaves nothing behind


@pytest.mark.parametrize("loss, fmt", [("align", "hf"), ("siglip", "open_clip")])
def test_exported_logit_scale_is_the_one_the_loss_applies(loss, fmt, pixels, tmp_path):
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[
        f"model.loss.name={loss}", "model.vision.image_size=32", "model.vision.layers=1", "model.text.layers=1"])).eval()
    with torch.no_grad():
        if loss == "align":
            module.loss.temperature.fill_(0.05)
        else:
            module.loss.logit_scale.fill_(math.log(30.0))
            module.loss.logit_bias.fill_(-7.5)
    export(module, fmt, tmp_path / "out")
    image, text = encode(module, pixels, CAPTIONS)
    if fmt == "hf":
        from transformers import CLIPModel

        exported = CLIPModel.from_pretrained(tmp_path / "out", local_files_only=True)
        assert exported.logit_scale.item() == pytest.approx(math.log(1 / 0.05))
    else:
        exported = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
        ids = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'out'}")(CAPTIONS)
        with torch.no_grad():
            logits, _ = exported.get_logits(pixels, ids)
        assert exported.logit_bias.item() == pytest.approx(-7.5)
        assert max_diff(logits, 30.0 * image @ text.T - 7.5) <= TOLERANCE * 30


@pytest.mark.parametrize("override, fmt, message", [
    ("model.text_head.name=mlp", "hf", "text_head is a MLPHead"),
    ("model.text_head.bias=true", "hf", "text_head is a linear head with a bias"),
    ("model.loss.name=siglip", "hf", "the loss is SigLipLoss with a logit bias .*supported: clip, align"),
    (f"model.vision={HF_VIT}", "open_clip", "the vision tower is a HFVisionTower; .* supports clip_vit, timm towers"),
])
def test_models_the_formats_cannot_express_are_refused(override, fmt, message, tmp_path):
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[override]))
    with pytest.raises(ConfigError, match=message):
        export(module, fmt, tmp_path / "out")
