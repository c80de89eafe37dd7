import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

import vlm_lab
from vlm_lab.data.collate import ImageTextCollate, image_to_tensor
from vlm_lab.data.synthetic import SyntheticShapes
from vlm_lab.errors import ConfigError
from vlm_lab.eval.retrieval import retrieval_metrics
from vlm_lab.module import VisionLanguageModule, cosine_with_warmup

TINY_CONFIG = str(Path(__file__).parent / "configs" / "tiny.yaml")


@pytest.mark.slow
def test_fast_dev_run(tmp_path):
    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["trainer.fast_dev_run=true"])
    module = vlm_lab.build_module(cfg)
    trainer = vlm_lab.build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    assert trainer.state.finished
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/logit_scale" in trainer.callback_metrics


@pytest.mark.slow
def test_fit_writes_run_directory_and_checkpoint_reloads_identically(tiny_config, tmp_path):
    metrics = vlm_lab.fit(tiny_config, run_dir=tmp_path)
    assert {"val/i2t_R@1", "val/t2i_R@10", "val/chance_i2t_R@1", "epoch"} <= set(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "logs" / "version_0" / "metrics.csv").is_file()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"

    reloaded = VisionLanguageModule.load_from_checkpoint(ckpt, weights_only=True).eval()
    original = vlm_lab.build_module(tiny_config).eval()
    original.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    images = torch.randn(4, 3, 32, 32)
    captions = ["a red circle left of a blue square", "three large white crosses above a green circle"]
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(images), original.encode_image(images))
        assert torch.equal(reloaded.encode_text(captions), original.encode_text(captions))
    assert reloaded.hparams.model == vlm_lab.build_module(tiny_config).hparams.model


@pytest.mark.slow
def test_validate_and_test_from_a_checkpoint(tiny_config, tmp_path):
    vlm_lab.fit(tiny_config, run_dir=tmp_path / "fit")
    ckpt = str(tmp_path / "fit" / "checkpoints" / "last.ckpt")
    val = vlm_lab.validate(tiny_config, ckpt_path=ckpt, run_dir=tmp_path / "val")
    fitted = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert val["val/i2t_R@1"] == pytest.approx(fitted["val/i2t_R@1"])
    test = vlm_lab.test(tiny_config, ckpt_path=ckpt, run_dir=tmp_path / "test")
    assert "test/i2t_R@1" in test and "test/t2i_R@5" in test


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(tiny_config, tmp_path):
    vlm_lab.fit(tiny_config, run_dir=tmp_path)
    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["trainer.max_epochs=2"])
    metrics = vlm_lab.fit(cfg, run_dir=tmp_path, resume=True)
    assert metrics["epoch"] == 1 and metrics["step"] == 8  # 4 steps per epoch, 2 epochs in all


def test_weight_decay_spares_biases_norms_and_temperature(tiny_module):
    class FakeTrainer:
        estimated_stepping_batches = 10
        strategy = SingleDeviceStrategy("cpu")  # restores a checkpoint before setup

    tiny_module.trainer = FakeTrainer()  # only the step count and the strategy are read
    optimizer = tiny_module.configure_optimizers()["optimizer"]
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {id(p): n for n, p in tiny_module.named_parameters()}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(tiny_module.get_parameter(names[i]).ndim >= 2 for i in decayed)
    assert id(tiny_module.loss.logit_scale) not in decayed
    assert any(names[i].endswith("q_proj.weight") for i in decayed)


def test_lr_scale_sets_each_towers_learning_rate(tiny_config):
    class FakeTrainer:
        estimated_stepping_batches = 10
        strategy = SingleDeviceStrategy("cpu")  # restores a checkpoint before setup

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["optim.lr=1e-3", "optim.lr_scale.text=0.1"])
    module = vlm_lab.build_module(cfg)
    module.trainer = FakeTrainer()
    optimizer = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in module.named_parameters():
        expected = 1e-4 if name.startswith("text.") else 1e-3
        assert lr_of[id(parameter)] == pytest.approx(expected), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
    with pytest.raises(ConfigError, match="lr_scale"):
        vlm_lab.load_config(TINY_CONFIG, overrides=["optim.lr_scale.txt=0.1"])


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


@pytest.mark.slow
def test_overfit_32_pairs_to_perfect_retrieval(tiny_config):
    """A tiny CLIP must memorise 32 image-caption pairs: R@1 = 100 both ways."""
    torch.manual_seed(0)
    module = vlm_lab.build_module(tiny_config)
    data = SyntheticShapes("val", 32, 32, seed=0, paraphrases=False)
    samples = [{"pixel_values": image_to_tensor(s["image"], module.image_config), **s} for s in data]
    batch = ImageTextCollate(module.tokenizer, module.max_length, train=False)(samples)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(150):
        loss = module.loss(
            module.encode_image(batch["pixel_values"]),
            module.encode_text(batch["input_ids"], batch["attention_mask"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        metrics = retrieval_metrics(module.encode_image(batch["pixel_values"]),
                                    module.encode_text(batch["input_ids"], batch["attention_mask"]),
                                    batch["text_image_index"])
    assert metrics["i2t_R@1"] == 100.0 and metrics["t2i_R@1"] == 100.0


def test_encode_text_accepts_strings_or_tokens(tiny_module):
    captions = ["a small red circle left of a green square"]
    tokens = tiny_module.tokenize(captions)
    with torch.no_grad():
        a = tiny_module.encode_text(captions)
        b = tiny_module.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert torch.equal(a, b) and a.shape == (1, 16)
    assert torch.allclose(a.norm(dim=-1), torch.ones(1))


def test_sections_an_older_checkpoint_saved_take_the_defaults_of_newer_keys(tiny_config):
    from omegaconf import OmegaConf

    from vlm_lab.schema import GenerationSettings, LrScale

    model, optim = OmegaConf.to_container(tiny_config.model), OmegaConf.to_container(tiny_config.optim)
    for key in ("generation", "vision_lock", "text_lock", "caption_head", "caption_weight", "contrastive_weight",
                "init_from"):
        del model[key]
    del model["tokenizer"]["train_from"], model["tokenizer"]["min_count"]
    del optim["lr_scale"], optim["nonfinite_loss"]
    module = VisionLanguageModule(model=model, optim=optim)
    assert module.optim_settings.lr_scale == LrScale() and module.optim_settings.nonfinite_loss == "error"
    assert module.generation_settings == GenerationSettings()
    assert not module.vision_locked.fully_locked and module.caption_head is None and module.loss is not None


def test_a_part_without_what_the_module_relies_on_is_a_one_line_error(clean_registry):
    from torch import nn

    from vlm_lab.towers.base import ImageConfig

    @clean_registry.register_vision_tower("no_output_dim")
    class NoOutputDim(nn.Module):
        def __init__(self, width: int = 8):
            super().__init__()
            self.token_dim = width  # output_dim forgotten
            self.image_config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)

    @clean_registry.register_loss("no_scale")
    class NoScale(nn.Module):
        def forward(self, image, text):
            return (image * text).sum()

        def no_weight_decay(self):
            return set()

    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["model.vision.name=no_output_dim"])
    with pytest.raises(ConfigError, match=r"^vision_tower 'no_output_dim' \(NoOutputDim\) has no output_dim: a "
                                          r"vision_tower must provide output_dim, token_dim, image_config") as err:
        vlm_lab.build_module(cfg)
    assert "\n" not in str(err.value) and "vlm_lab/contracts.py" in str(err.value)
    cfg = vlm_lab.load_config(TINY_CONFIG, overrides=["model.loss.name=no_scale"])
    with pytest.raises(ConfigError, match=r"loss 'no_scale' \(NoScale\) has no logit_scale_value"):
        vlm_lab.build_module(cfg)
