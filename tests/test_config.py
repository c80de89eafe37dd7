import pytest

from vlm_lab.config import load_config, to_yaml
from vlm_lab.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


def test_files_merge_left_to_right_then_overrides(tmp_path):
    a = write(tmp_path / "a.yaml", "optim: {lr: 0.1, warmup_steps: 5}\ntrainer: {max_epochs: 3}\n")
    b = write(tmp_path / "b.yaml", "optim: {lr: 0.2}\n")
    cfg = load_config(a, b, overrides=["trainer.max_epochs=7", "model.vision.layers=2"])
    assert cfg.optim.lr == 0.2 and cfg.optim.warmup_steps == 5
    assert cfg.trainer.max_epochs == 7
    assert cfg.model.vision.layers == 2
    assert cfg.name == "b"  # the last file's stem
    assert cfg.optim.weight_decay == 0.1  # a default


def test_a_renamed_spec_replaces_the_old_arguments(tmp_path):
    a = write(tmp_path / "a.yaml", "model:\n  vision: {name: clip_vit, layers: 2, patch_size: 8}\n")
    b = write(tmp_path / "b.yaml", "model:\n  vision: {name: timm, model_name: resnet18}\n")
    cfg = load_config(a, b)
    assert dict(cfg.model.vision) == {"name": "timm", "model_name": "resnet18"}


@pytest.mark.parametrize("override, message", [
    ("modle.embed_dim=3", r"unknown config key 'modle'.*Did you mean 'model'"),
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr'.*Did you mean 'lr'.*Valid keys in optim"),
    ("trainer.max_epoch=1", r"unknown config key 'trainer.max_epoch'.*Did you mean 'max_epochs'"),
    ("model.vision.layer=1", r"vision_tower 'clip_vit_tiny' has no argument 'layer'.*'layers'"),
    ("data.batchsize=4", r"datamodule 'synthetic_shapes' has no argument 'batchsize'.*'batch_size'"),
    ("optim.lr=fast", r"optim.lr='fast' should be a number"),
    ("seed=1.5", r"seed=1.5 should be an integer"),
    ("model.vision.name=clip_vt", r"unknown vision_tower 'clip_vt'.*Did you mean 'clip_vit'"),
    ("model.loss.name=sigclip", r"unknown loss 'sigclip'.*Did you mean 'siglip'"),
])
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(overrides=[override])
    assert "\n" not in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="should look like key=value"):
        load_config(overrides=["=3"])
    bad = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_yaml_never_constructs_python_objects(tmp_path):
    evil = write(tmp_path / "evil.yaml", "seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(evil)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("experiments/quickstart.yaml", overrides=["optim.lr=0.01"])
    saved = write(tmp_path / "config.yaml", to_yaml(cfg))
    assert load_config(saved) == cfg  # the saved name is kept
