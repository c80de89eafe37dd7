"""Self-contained checkpoints (vlm_lab/checkpoint_format.py): what they carry, rebuilding without the
recipe's files, checkpoints of the e956f06 release, the converter, and fine-tuning with init_from.

"Without the recipe's files" is checked here by making every loader of such files fail when called
(``recipe_loaders_refused``) and by deleting the files; tests/test_checkpoints_travel.py checks whole
recipes in another process, with an audit hook on every file opened.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vlm_lab
from vlm_lab import VisionLanguageModule, checkpoint_format, registry
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError
from vlm_lab.towers.base import RebuildableTower

from conftest import TINY_CONFIG
from test_interop import make_hf_clip, perturb, save_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASE_CKPT = FIXTURES / "release_e956f06.ckpt"
RELEASE_EXPECTED = json.loads((FIXTURES / "release_e956f06_expected.json").read_text())
CAPTIONS = ["a red circle left of a blue square", "three large white crosses", "x"]

# What rebuilding from a checkpoint must never call: catalog, packaged and local pretrained weights,
# CLIP folders, the default tokenizer's package, captions to build a vocabulary from, HF directories.
RECIPE_LOADERS = [
    "vlm_lab.registry.cards",
    "vlm_lab.towers.packaged.packaged_path",
    "vlm_lab.towers.hf.packaged_path",
    "vlm_lab.towers.hf.resolve_image_config",
    "vlm_lab.towers.timm_tower.load_state_dict_file",
    "vlm_lab.interop.pretrained.read_clip_checkpoint",
    "vlm_lab.tokenizer.default_tokenizer_dir",
    "vlm_lab.tokenizer.read_captions",
    "vlm_lab.module.word_tokenizer_dir",
    "transformers.AutoModel.from_pretrained",
]


@pytest.fixture
def recipe_loaders_refused(monkeypatch):
    """Every loader in RECIPE_LOADERS fails the test if called."""
    def refuse(name):
        def called(*args, **kwargs):
            raise AssertionError(f"{name} was called while rebuilding from a checkpoint")
        return called

    for name in RECIPE_LOADERS:
        monkeypatch.setattr(name, refuse(name))


def release_pixels() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def assert_release_embeddings(module: VisionLanguageModule) -> None:
    """The embeddings the release checkpoint gave when e956f06 wrote it (up to float rounding across CPUs)."""
    with torch.no_grad():
        image = module.eval().encode_image(release_pixels())
        text = module.encode_text(RELEASE_EXPECTED["captions"])
    torch.testing.assert_close(image, torch.tensor(RELEASE_EXPECTED["image_embeddings"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(text, torch.tensor(RELEASE_EXPECTED["text_embeddings"]), rtol=1e-6, atol=1e-6)


def only_plain_data(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and only_plain_data(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(only_plain_data(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


# --------------------------------------------------------------------------------------------------
# Checkpoints of the e956f06 release (format 1) and the converter


def test_release_checkpoint_still_loads_and_gives_its_embeddings():
    assert "vlm_lab" not in torch.load(RELEASE_CKPT, weights_only=True)  # really the old format
    assert RELEASE_CKPT.stat().st_size < 2_000_000
    assert_release_embeddings(VisionLanguageModule.load_from_checkpoint(RELEASE_CKPT, weights_only=True))


def test_upgrade_makes_a_release_checkpoint_self_contained(tmp_path, capsys, monkeypatch):
    new = tmp_path / "v2.ckpt"
    assert main(["checkpoint", "upgrade", str(RELEASE_CKPT), str(new)]) == 0
    assert f"wrote the self-contained checkpoint {new}" in capsys.readouterr().out
    old, upgraded = (torch.load(path, weights_only=True) for path in (RELEASE_CKPT, new))
    assert set(upgraded) == set(old) | {"vlm_lab"} and upgraded["global_step"] == old["global_step"] == 2
    assert upgraded["hyper_parameters"] == old["hyper_parameters"]  # the recipe, kept for the record
    assert upgraded["vlm_lab"]["model"]["text"]["vocab_size"] == 30522

    assert main(["checkpoint", "show", str(new)]) == 0
    shown = capsys.readouterr().out
    assert "format 2: self-contained; tokenizer files: tokenizer.json" in shown and "vocab_size: 30522" in shown
    assert main(["checkpoint", "upgrade", str(new), str(tmp_path / "again.ckpt")]) == 2
    assert "is already self-contained" in capsys.readouterr().err
    assert main(["checkpoint", "upgrade", str(RELEASE_CKPT), str(new)]) == 2
    assert f"{new} exists" in capsys.readouterr().err

    for name in RECIPE_LOADERS:  # loading the upgraded file needs none of them (the tokenizer package included)
        monkeypatch.setattr(name, None)
    assert_release_embeddings(VisionLanguageModule.load_from_checkpoint(new, weights_only=True))


@pytest.fixture
def release_with_a_lost_file(tmp_path):
    """The release checkpoint as if trained with a word vocabulary from a captions file that is now gone."""
    checkpoint = torch.load(RELEASE_CKPT, weights_only=True)
    checkpoint["hyper_parameters"]["model"]["tokenizer"]["train_from"] = str(tmp_path / "gone" / "captions.json")
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    return path


def test_old_checkpoint_whose_files_are_gone_names_the_file_and_the_converter(release_with_a_lost_file, capsys):
    ckpt = release_with_a_lost_file
    assert main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(ckpt.parent / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "gone/captions.json" in error and f"vlm-lab checkpoint upgrade {ckpt} " in error
    with pytest.raises(ConfigError, match=r"gone/captions.json.*Run the upgrade where they exist"):
        vlm_lab.api.upgrade_checkpoint(ckpt, ckpt.parent / "new.ckpt")
    with pytest.raises(ConfigError, match=r"model.init_from: .*old.ckpt was written before .*checkpoint upgrade"):
        vlm_lab.load_config(overrides=[f"model.init_from={ckpt}"])


def test_newer_formats_and_other_files_are_refused(tmp_path):
    checkpoint = torch.load(RELEASE_CKPT, weights_only=True)
    checkpoint["vlm_lab"] = {"format": 99, "model": {}, "tokenizer_files": {}}
    torch.save(checkpoint, tmp_path / "future.ckpt")
    with pytest.raises(ConfigError, match="newer vlm-lab .*format 99"):
        VisionLanguageModule.load_from_checkpoint(tmp_path / "future.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ConfigError, match="is not a vlm-lab checkpoint"):
        VisionLanguageModule.load_from_checkpoint(tmp_path / "foreign.ckpt")


# --------------------------------------------------------------------------------------------------
# What a checkpoint carries


@pytest.fixture(scope="module")
def word_vocabulary_run(tmp_path_factory):
    """A tiny CLIP with a word vocabulary built from a captions file, trained one step."""
    root = tmp_path_factory.mktemp("words")
    captions = root / "captions.txt"
    captions.write_text("\n".join(["a red circle", "a blue square", "two green crosses", "a red square"] * 2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        cfg = vlm_lab.load_config(TINY_CONFIG, overrides=[f"model.tokenizer.train_from={captions}",
                                                          "model.tokenizer.min_count=1", "trainer.max_steps=1"])
        vlm_lab.fit(cfg, run_dir=root / "run")
    return root, root / "run" / "checkpoints" / "last.ckpt"


def test_checkpoint_carries_the_model_as_built_and_keeps_the_recipe(word_vocabulary_run):
    root, ckpt = word_vocabulary_run
    checkpoint = torch.load(ckpt, weights_only=True)
    entry = checkpoint["vlm_lab"]
    assert entry["format"] == checkpoint_format.FORMAT
    assert set(entry["tokenizer_files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    text = entry["model"]["text"]
    assert text["name"] == "clip_text" and text["vocab_size"] == 12  # 4 special tokens + 8 words
    assert entry["model"]["tokenizer"]["train_from"] is None and entry["model"]["init_from"] is None
    # The hyperparameters (hparams.yaml) stay the readable recipe: no bytes, the captions file named.
    recipe = checkpoint["hyper_parameters"]["model"]
    assert recipe["tokenizer"]["train_from"].endswith("captions.txt") and "vocab_size" not in recipe["text"]
    assert only_plain_data(checkpoint["hyper_parameters"])
    hparams_yaml = (root / "run" / "logs" / "version_0" / "hparams.yaml").read_text()
    assert "captions.txt" in hparams_yaml and "tokenizer_files" not in hparams_yaml


def test_word_vocabulary_travels_in_the_checkpoint(word_vocabulary_run, recipe_loaders_refused, tmp_path):
    root, ckpt = word_vocabulary_run
    moved = tmp_path / "last.ckpt"
    shutil.copy(ckpt, moved)
    reference = VisionLanguageModule.load_from_checkpoint(moved, weights_only=True).eval()
    shutil.rmtree(root / "cache")  # the built vocabulary and the captions it came from are gone
    (root / "captions.txt").rename(root / "captions.moved")
    reloaded = VisionLanguageModule.load_from_checkpoint(moved, weights_only=True).eval()
    assert reloaded.tokenizer.get_vocab() == reference.tokenizer.get_vocab() and len(reloaded.tokenizer) == 12
    # Saved again, it is the same tokenizer, byte for byte: a checkpoint of a checkpoint changes nothing.
    saved = torch.load(moved, weights_only=True)["vlm_lab"]
    assert reloaded.portable_model.entry() == saved
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(images), reference.encode_image(images))
        assert torch.equal(reloaded.encode_text(CAPTIONS), reference.encode_text(CAPTIONS))
    (root / "captions.moved").rename(root / "captions.txt")


# --------------------------------------------------------------------------------------------------
# Towers: each says how to rebuild it without reading what it was loaded from


@pytest.fixture(scope="module")
def pretrained_sources(tmp_path_factory):
    """Directories and files that towers load pretrained weights from: an HF CLIP, a BERT, a ViT with a
    preprocessor of its own, and a timm state dict."""
    from open_clip.tokenizer import default_bpe
    from transformers import BertConfig, BertModel, ViTConfig, ViTImageProcessor, ViTModel

    from vlm_lab.interop import clip_tokenizer_from_bpe

    root = tmp_path_factory.mktemp("sources")
    make_hf_clip(root / "clip", clip_tokenizer_from_bpe(default_bpe()), 49407)
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, **tiny))
    perturb(bert, 1)
    bert.save_pretrained(root / "bert")
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, **tiny))
    perturb(vit, 2)
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                      resample=2).save_pretrained(root / "vit")
    timm_spec = {"name": "timm", "model_name": "vit_tiny_patch16_224",
                 "model_args": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}}
    timm_tower = registry.build("vision_tower", timm_spec)
    perturb(timm_tower, 3)
    torch.save(timm_tower.model.state_dict(), root / "timm.pt")
    return root


TOWERS = {
    "clip_vit_pretrained": ("vision_tower", lambda root: {"name": "clip_vit_pretrained", "path": str(root / "clip")}),
    "clip_text_pretrained": ("text_tower", lambda root: {"name": "clip_text_pretrained", "path": str(root / "clip")}),
    "timm_pretrained_path": ("vision_tower", lambda root: {
        "name": "timm", "model_name": "vit_tiny_patch16_224", "pretrained_path": str(root / "timm.pt"),
        "model_args": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}}),
    "efficientnet_lite0_card": ("vision_tower", lambda root: {"name": "efficientnet_lite0"}),
    "hf_text_folder": ("text_tower", lambda root: {"name": "hf_text", "path": str(root / "bert"), "pooling": "cls"}),
    "hf_text_of_a_clip": ("text_tower", lambda root: {"name": "hf_text", "path": str(root / "clip"), "pooling": "eos"}),
    "minilm_l6_card": ("text_tower", lambda root: {"name": "minilm_l6"}),
    "hf_vision_folder": ("vision_tower", lambda root: {"name": "hf_vision", "path": str(root / "vit")}),
    "hf_vision_of_a_clip": ("vision_tower", lambda root: {"name": "hf_vision", "path": str(root / "clip")}),
}


@pytest.mark.parametrize("case", list(TOWERS))
def test_tower_rebuilds_from_its_architecture_spec_alone(case, pretrained_sources, monkeypatch):
    kind, spec = TOWERS[case]
    loaded = registry.build(kind, spec(pretrained_sources)).eval()
    assert isinstance(loaded, RebuildableTower)
    architecture = loaded.architecture_spec()
    assert only_plain_data(architecture) and architecture["name"] in registry.constructors(kind)
    assert not {"path", "pretrained", "pretrained_path"} & set(architecture)

    for name in RECIPE_LOADERS:
        monkeypatch.setattr(name, None)  # any use fails: nothing is read to rebuild it
    rebuilt = registry.build(kind, architecture)
    rebuilt.load_state_dict(loaded.state_dict())  # strict: the same modules, names and shapes
    rebuilt.eval()
    assert rebuilt.architecture_spec() == architecture
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if kind == "vision_tower":
            assert rebuilt.image_config == loaded.image_config
            height, width = loaded.image_config.size
            inputs = (torch.randn(2, 3, height, width, generator=generator),)
        else:
            inputs = (torch.randint(1, 90, (2, 7), generator=generator), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
        expected, got = loaded(*inputs), rebuilt(*inputs)
    assert torch.equal(got.pooled, expected.pooled) and torch.equal(got.tokens, expected.tokens)


def test_hf_vision_image_config_is_checked():
    spec = {"name": "hf_vision", "config": {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}
    tower = registry.build("vision_tower", {**spec, "image_config": {"size": [32, 32], "mean": 0.5, "std": [1, 2, 3]}})
    assert tower.image_config.mean == (0.5, 0.5, 0.5) and tower.image_config.std == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError, match="image_config needs size, mean and std .* got \\['crop', 'size'\\]"):
        registry.build("vision_tower", {**spec, "image_config": {"size": [32, 32], "crop": 1.0}})


def test_a_tower_without_architecture_spec_travels_as_its_resolved_spec():
    spec = checkpoint_format.tower_spec("vision_tower", torch.nn.Identity(), {"name": "clip_vit_tiny", "layers": 1})
    card = registry.cards("vision_tower")["clip_vit_tiny"]
    assert spec == {"name": "clip_vit", **card.args, "layers": 1}


# --------------------------------------------------------------------------------------------------
# Fine-tuning: model.init_from a vlm-lab checkpoint


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny CLIP trained 3 steps: the checkpoint to fine-tune from."""
    run = tmp_path_factory.mktemp("base")
    vlm_lab.fit(vlm_lab.load_config(TINY_CONFIG, overrides=["trainer.max_steps=3"]), run_dir=run)
    return run / "checkpoints" / "last.ckpt"


def test_init_from_a_checkpoint_starts_from_its_weights_with_a_fresh_optimizer(base_run, tmp_path, monkeypatch):
    base = torch.load(base_run, weights_only=True)
    assert base["global_step"] == 3 and base["optimizer_states"][0]["state"]
    # A config with no model section at all: architecture and tokenizer come from the checkpoint.
    (tmp_path / "finetune.yaml").write_text(
        f"model: {{init_from: {base_run}}}\n"
        "data: {name: synthetic_shapes, train_size: 32, val_size: 16, batch_size: 16, seed: 1}\n"
        "optim: {lr: 1.0e-4, warmup_steps: 5}\n"
        "trainer: {max_steps: 1, accelerator: cpu, enable_progress_bar: false, enable_model_summary: false}\n")
    cfg = vlm_lab.load_config(tmp_path / "finetune.yaml")
    assert cfg.model.vision == base["vlm_lab"]["model"]["vision"] and cfg.model.embed_dim == 16

    with monkeypatch.context() as patch:
        for name in RECIPE_LOADERS:
            patch.setattr(name, None)
        module = vlm_lab.build_module(cfg)
    start = module.state_dict()
    assert set(start) == set(base["state_dict"])
    assert all(torch.equal(start[key], base["state_dict"][key]) for key in start)  # weights equal at step 0
    assert checkpoint_format.tokenizer_files(module.tokenizer) == base["vlm_lab"]["tokenizer_files"]

    assert main(["fit", str(tmp_path / "finetune.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    tuned = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert tuned["global_step"] == 1  # a new run: its own steps, optimizer and schedule
    assert {int(s["step"]) for s in tuned["optimizer_states"][0]["state"].values()} == {1}
    group = tuned["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(1e-4) and group["lr"] == pytest.approx(4e-5)  # warm-up: 2 of 5
    assert tuned["vlm_lab"]["model"] == base["vlm_lab"]["model"]
    assert tuned["hyper_parameters"]["model"]["init_from"] == str(base_run)


def test_load_from_an_open_file(base_run):
    with open(base_run, "rb") as file:
        module = VisionLanguageModule.load_from_checkpoint(file, weights_only=True)
    state = torch.load(base_run, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[key], value) for key, value in state.items())


def test_init_from_a_checkpoint_takes_non_architecture_overrides(base_run):
    cfg = vlm_lab.load_config(overrides=[f"model.init_from={base_run}", "model.vision_lock.lock=true",
                                         "model.tokenizer.max_length=8", "model.vision.grad_checkpointing=true"])
    module = vlm_lab.build_module(cfg)
    assert module.vision_locked.fully_locked and module.max_length == 8 and module.vision.encoder.grad_checkpointing
    with pytest.raises(ConfigError, match=r"init_from .*last.ckpt does not match the model: shapes differ"):
        vlm_lab.build_module(vlm_lab.load_config(overrides=[f"model.init_from={base_run}", "model.embed_dim=8"]))
    with pytest.raises(ConfigError, match=r"init_from .*last.ckpt does not match the model: missing 16 \(vision.encoder.layers.1"):
        vlm_lab.build_module(vlm_lab.load_config(overrides=[f"model.init_from={base_run}", "model.vision.layers=2"]))


def test_evaluating_a_checkpoint_does_not_read_the_training_configs_init_from(base_run, tmp_path, capsys):
    """The config a model was fine-tuned with names an init_from folder this machine does not have."""
    (tmp_path / "finetune.yaml").write_text(
        "model: {init_from: weights/not/on/this/machine}\n"
        "data: {name: synthetic_shapes, train_size: 8, val_size: 16, batch_size: 8}\n"
        "trainer: {accelerator: cpu, enable_progress_bar: false, enable_model_summary: false}\n")
    assert main(["validate", str(tmp_path / "finetune.yaml"), f"ckpt_path={base_run}",
                 "--run-dir", str(tmp_path / "val")]) == 0
    assert "val/i2t_R@1" in capsys.readouterr().out
