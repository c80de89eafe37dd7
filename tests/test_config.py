import pytest
from omegaconf import OmegaConf

from vlm_lab.cli import main
from vlm_lab.config import load_config, reference_markdown, to_yaml
from vlm_lab.errors import ConfigError
from vlm_lab.schema import GenerationSettings, OptimSettings, defaults


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


# --------------------------------------------------------------------------------------------------
# The schema (vlm_lab/schema.py): one declaration per section, and what comes from it


def test_every_default_comes_from_the_schema():
    cfg = load_config()
    assert OmegaConf.to_container(cfg) == defaults()
    assert cfg.optim.lr == OptimSettings().lr and cfg.model.generation.log_examples == GenerationSettings().log_examples


def test_interpolations_resolve_before_the_checks(tmp_path):
    config = write(tmp_path / "interpolated.yaml",
                   "model:\n  embed_dim: 48\n  caption_head: {name: coca_decoder, width: '${model.embed_dim}'}\n"
                   "data: {name: synthetic_shapes, batch_size: '${model.embed_dim}'}\n")
    cfg = load_config(config, overrides=["optim.warmup_steps=${data.batch_size}"])  # overrides may name file keys
    assert cfg.model.caption_head.width == cfg.data.batch_size == cfg.optim.warmup_steps == 48
    assert "${" not in to_yaml(cfg)  # the saved config holds values
    with pytest.raises(ConfigError, match=r"^seed=0.0005 should be an integer$"):  # checked once resolved
        load_config(config, overrides=["seed=${optim.lr}"])
    with pytest.raises(ConfigError, match=r"seed: .*'optim.lrr' not found.*Did you mean 'optim.lr'") as err:
        load_config(config, overrides=["seed=${optim.lrr}"])
    assert "\n" not in str(err.value)


def test_generation_settings_are_all_config_keys():
    cfg = load_config(overrides=["model.generation.do_sample=true", "model.generation.top_p=0.9",
                                 "model.generation.seed=3", "model.generation.max_images=8"])
    settings = GenerationSettings.from_config(OmegaConf.to_container(cfg.model.generation))
    assert (settings.do_sample, settings.top_p, settings.seed, settings.max_images) == (True, 0.9, 3, 8)
    with pytest.raises(ConfigError, match=r"model.generation: do_sample works with num_beams=1 only"):
        load_config(overrides=["model.generation.do_sample=true", "model.generation.num_beams=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.generation.top_n'.*Did you mean 'top_p'"):
        load_config(overrides=["model.generation.top_n=3"])


def test_the_reference_has_one_table_per_section_with_every_key():
    text = reference_markdown()
    tables = {block.split("\n", 1)[0]: block for block in text.split("\n## ")[1:]}

    def sections(node, path):
        yield path, node
        for key, value in node.items():
            # data, trainer and eval.evaluators are mappings of arguments and specs, not sections.
            if isinstance(value, dict) and key not in ("data", "trainer", "evaluators") and "name" not in value:
                yield from sections(value, f"{path}.{key}" if path != "top level" else key)

    for path, node in sections(defaults(), "top level"):
        rows = [line for line in tables[path].splitlines() if line.startswith("| `")]
        assert [row.split("`")[1] for row in rows] == list(node), path
        assert all(row.count(" | ") == 3 for row in rows)  # key, type, default, description: no stray pipes
    for name in ("synthetic_shapes", "coco_captions", "cc3m"):
        assert "| `batch_size` | an integer | `64` |" in tables[f"data: {name}"]
    assert "| `nonfinite_loss` | one of 'error', 'skip' | `error` |" in tables["optim"]
    assert "| `tokenizer` |" not in tables["data: coco_captions"]  # supplied by vlm-lab, not a setting
    prose = "".join(part for index, part in enumerate(text.split("`")) if index % 2 == 0)
    assert "<" not in prose and "``" not in text  # no stray HTML, no reST code left


def test_config_reference_command(capsys):
    assert main(["config-reference", "optim"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("optim\n") and "nonfinite_loss" in out and "optim.lr_scale" in out and "model" not in out
    assert main(["config-reference", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == reference_markdown().strip()
    assert main(["config-reference", "optm"]) == 2
    assert "no section 'optm'. Did you mean 'optim'" in capsys.readouterr().err


def test_exponents_without_a_dot_are_numbers_as_on_the_command_line(tmp_path):
    # PyYAML (YAML 1.1) would read 1e-3 as the string "1e-3"; vlm_lab/yaml_text.py reads it as YAML 1.2,
    # OmegaConf's overrides and Python do. Quoted, it stays text, and the schema refuses it.
    file = write(tmp_path / "lr.yaml", "optim: {lr: 1e-3, weight_decay: 5E-2, eps: -.5e-8}\n")
    cfg = load_config(file)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps) == (1e-3, 5e-2, -5e-9)
    assert cfg.optim.lr == load_config(overrides=["optim.lr=1e-3"]).optim.lr
    quoted = write(tmp_path / "quoted.yaml", "optim: {lr: '1e-3'}\n")
    with pytest.raises(ConfigError, match=r"optim.lr='1e-3' should be a number"):
        load_config(quoted)
