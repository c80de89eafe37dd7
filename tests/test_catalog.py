"""Catalog folders: the built-in cards, the user's folders beside them (``$VLM_LAB_CATALOG``,
``add_catalog``), clashes; and the packaged experiments that ``vlm-lab fit NAME`` finds by name."""

import os
from pathlib import Path

import pytest

import vlm_lab
from vlm_lab import shipped, sweep
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HOT_CLIP = "builds: clip\ndescription: CLIP loss starting hot.\nargs: {init_logit_scale: 4.0}\n"
MICRO_VIT = "builds: clip_vit\nargs: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}\n"


def catalog(folder: Path, cards: dict[str, str]) -> Path:
    """A catalog folder with ``{"kind/name": yaml text}`` cards."""
    for name, text in cards.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text(text)
    return folder


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------------------
# The built-in catalog


def test_the_built_in_catalog_is_the_registry_folder_of_this_clone():
    folders = vlm_lab.registry.catalog_folders()
    assert [f.origin for f in folders] == ["built-in"]
    assert Path(str(folders[0].path)) == ROOT / "registry"
    built_in = {f"{p.parent.name}/{p.stem}" for p in (ROOT / "registry").glob("*/*.yaml")}
    listed = {f"{kind}/{name}" for kind in ("vision_tower", "text_tower") for name in vlm_lab.registry.cards(kind)}
    assert listed == built_in and "vision_tower/clip_vit_tiny" in listed


# --------------------------------------------------------------------------------------------------
# The user's catalog folders


def test_env_var_folders_list_beside_the_built_in_cards_with_their_folder(tmp_path, user_catalogs, monkeypatch,
                                                                         capsys):
    mine = catalog(tmp_path / "mine", {"loss/hot_clip": HOT_CLIP}).resolve()
    lab = catalog(tmp_path / "lab", {"vision_tower/vit_micro": MICRO_VIT}).resolve()
    monkeypatch.setenv("VLM_LAB_CATALOG", f"{mine}{os.pathsep}{lab}")

    assert [(f.origin, str(f.path)) for f in user_catalogs.catalog_folders()[1:]] == [
        ("VLM_LAB_CATALOG", str(mine)), ("VLM_LAB_CATALOG", str(lab))]
    assert main(["list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert rows["hot_clip"].split()[1:5] == ["card", "->", "clip", str(mine)]
    assert rows["vit_micro"].split()[1:5] == ["card", "->", "clip_vit", str(lab)]
    assert rows["clip_vit_tiny"].split()[1:5] == ["card", "->", "clip_vit", "built-in"]
    assert rows["clip_vit"].split()[1:] == ["code"]

    loss = vlm_lab.build("loss", {"name": "hot_clip"})
    assert float(loss.logit_scale.detach()) == pytest.approx(4.0)
    assert main(["describe", "vit_micro"]) == 0
    assert f"from: catalog folder {lab} (from VLM_LAB_CATALOG)" in capsys.readouterr().out


def test_add_catalog_from_python_is_listed_and_a_yaml_config_can_name_its_cards(tmp_path, user_catalogs, capsys):
    mine = catalog(tmp_path, {"vision_tower/vit_micro": MICRO_VIT})
    assert vlm_lab.add_catalog(mine) == mine.resolve()
    vlm_lab.add_catalog(str(mine))  # a re-run notebook cell: still one folder
    assert [(f.origin, f.path) for f in user_catalogs.catalog_folders()[1:]] == [("add_catalog", mine.resolve())]
    assert "vit_micro" in vlm_lab.list_vision_towers("vit_*")

    cfg = vlm_lab.load_config(ROOT / "tests" / "configs" / "tiny.yaml", overrides=["model.vision.name=vit_micro"])
    tower = vlm_lab.build("vision_tower", dict(cfg.model.vision))
    assert tower.output_dim == 32 and len(tower.encoder.layers) == 1
    assert main(["list", "vit_*"]) == 0
    assert str(mine.resolve()) in capsys.readouterr().out


@pytest.mark.parametrize("where", ["env", "python"])
def test_a_card_clashing_with_a_built_in_one_is_one_line_naming_both_files(tmp_path, user_catalogs, monkeypatch,
                                                                           capsys, where):
    mine = catalog(tmp_path, {"vision_tower/clip_vit_tiny": "builds: clip_vit\nargs: {width: 32}\n"})
    if where == "env":
        monkeypatch.setenv("VLM_LAB_CATALOG", str(mine))
    else:
        vlm_lab.add_catalog(mine)
    err = one_line_error(capsys, ["list"])
    assert (f"vision_tower card 'clip_vit_tiny' is defined twice: {ROOT / 'registry/vision_tower/clip_vit_tiny.yaml'}"
            f" and {mine.resolve() / 'vision_tower/clip_vit_tiny.yaml'}") in err
    with pytest.raises(ConfigError, match="defined twice"):  # a config naming a card of that kind
        vlm_lab.load_config(ROOT / "experiments" / "quickstart.yaml")


def test_two_user_folders_clash_and_a_card_may_not_take_a_constructor_name(tmp_path, user_catalogs, capsys):
    first = catalog(tmp_path / "a", {"loss/hot_clip": HOT_CLIP})
    second = catalog(tmp_path / "b", {"loss/hot_clip": HOT_CLIP})
    vlm_lab.add_catalog(first)
    vlm_lab.add_catalog(second)
    err = one_line_error(capsys, ["list", "--kind", "loss"])
    assert f"'hot_clip' is defined twice: {first.resolve()}/loss/hot_clip.yaml and {second.resolve()}/loss" in err

    user_catalogs._added_catalogs.clear()
    shadow = catalog(tmp_path / "c", {"loss/siglip": "builds: clip\n", "loss/hot_clip": HOT_CLIP})
    vlm_lab.add_catalog(shadow)
    # The constructor itself resolves without the catalog (checkpoints name constructors only) ...
    assert type(vlm_lab.build("loss", {"name": "siglip"})).__name__ == "SigLipLoss"
    # ... and any card lookup of that kind reports the clash.
    with pytest.raises(ConfigError, match=r"card 'siglip' \(.*/c/loss/siglip.yaml\) has the name of the loss "
                                          r"registered at .*losses.py:\d+; rename one of them"):
        vlm_lab.build("loss", {"name": "hot_clip"})


def test_bad_catalog_folders_are_one_line(tmp_path, user_catalogs, monkeypatch, capsys):
    monkeypatch.setenv("VLM_LAB_CATALOG", str(tmp_path / "nowhere"))
    assert "catalog folder" in one_line_error(capsys, ["list"]) and "(from VLM_LAB_CATALOG) is not a directory" in \
        one_line_error(capsys, ["describe", "clip"])
    monkeypatch.delenv("VLM_LAB_CATALOG")
    with pytest.raises(ConfigError, match=r"nowhere \(from add_catalog\) is not a directory"):
        vlm_lab.add_catalog(tmp_path / "nowhere")

    # A card outside <kind>/ would never be found: an error, not a silent omission.
    misplaced = catalog(tmp_path / "m", {"vision_towers/vit_micro": "builds: clip_vit\n"})
    vlm_lab.add_catalog(misplaced)
    err = one_line_error(capsys, ["list"])
    assert "vision_towers: not a registry kind" in err and "Did you mean 'vision_tower'" in err
    user_catalogs._added_catalogs.clear()
    loose = catalog(tmp_path / "l", {"vit_micro": "builds: clip_vit\n"})
    vlm_lab.add_catalog(loose)
    assert "a card belongs in a sub-folder named after its kind" in one_line_error(capsys, ["list"])


# --------------------------------------------------------------------------------------------------
# Packaged experiments


def test_the_packaged_experiments_are_the_top_level_experiment_files():
    assert list(shipped.experiments()) == sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    assert "quickstart" in shipped.experiments()


def test_a_packaged_experiment_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    by_name = vlm_lab.load_config("quickstart", overrides=["trainer.max_epochs=1"])
    by_path = vlm_lab.load_config(ROOT / "experiments" / "quickstart.yaml", overrides=["trainer.max_epochs=1"])
    assert by_name == by_path and by_name.name == "quickstart"
    assert main(["check", "quickstart", "data.train_size=64"]) == 0
    assert "config OK: quickstart" in capsys.readouterr().out
    assert main(["list", "quick*", "--kind", "experiment"]) == 0
    assert capsys.readouterr().out.split() == ["experiment:", "quickstart", str(ROOT / "experiments/quickstart.yaml")]

    # A file of that name in the working directory wins over the packaged experiment.
    Path("quickstart").write_text("name: mine\nmodel: {embed_dim: 64}\n")
    assert vlm_lab.load_config("quickstart").model.embed_dim == 64


def test_neither_a_file_nor_a_packaged_experiment_is_one_line_listing_the_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["fit", "quickstrat"])
    names = ", ".join(sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
    assert f"config file not found: quickstrat (not a file, nor a packaged experiment: {names})" in err
    with pytest.raises(ConfigError, match="nor a packaged experiment: .*quickstart"):
        vlm_lab.load_config("experiments/quickstart.yaml")  # a path is a file, never a name


def test_a_sweep_can_start_from_a_packaged_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "sweep.yaml"
    file.write_text("base: [quickstart]\noverrides: [trainer.max_epochs=1]\ngrid:\n  optim.lr: [0.001, 0.0003]\n")
    runs = sweep.expand(file)
    assert [r.files for r in runs] == [("quickstart",), ("quickstart",)]
    assert runs[0].config().name == "quickstart"
    file.write_text("base: [quickstrat]\n")
    with pytest.raises(ConfigError, match="nor a packaged experiment"):
        sweep.expand(file)
