"""The layers of vlm_lab/layers.py: every module sits in one, and every import runs down them."""

import shutil
from pathlib import Path

import vlm_lab
from vlm_lab.layers import LAYERS, imports_of, layer_of, module_names, problems

PACKAGE = Path(vlm_lab.__file__).resolve().parent


def test_every_import_runs_down_the_layers():
    assert problems(PACKAGE) == []


def test_the_table_names_only_modules_that_exist_and_each_once():
    modules = module_names(PACKAGE)
    listed = [name for layer in LAYERS for name in layer.modules]
    assert len(listed) == len(set(listed))
    assert all(name in modules for name in listed), sorted(set(listed) - set(modules))


def test_a_planted_back_import_is_caught(tmp_path):
    copy = tmp_path / "vlm_lab"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    tower = copy / "towers" / "clip_vit.py"
    # The cycle this check exists for: a tower reaching into interop from inside a function.
    tower.write_text(tower.read_text() + "\n\ndef _load(path):\n    from vlm_lab.interop.pretrained import load_tower\n"
                                         "    return load_tower\n")
    found = problems(copy)
    assert len(found) == 1
    assert "vlm_lab.towers.clip_vit (parts) imports vlm_lab.interop.pretrained (interop)" in found[0]
    lines = tower.read_text().count("\n")
    assert f"clip_vit.py:{lines - 1}:" in found[0]  # the line of the planted import


def test_the_checker_reads_every_form_of_import():
    known = {"vlm_lab.config", "vlm_lab.module", "vlm_lab.heads", "vlm_lab.heads.coca",
             "vlm_lab.heads.projection"}
    source = ("import vlm_lab.config\nfrom vlm_lab import module\nfrom vlm_lab.heads import coca, CocaCaptionHead\n"
              "from . import projection\nimport torch\n\nclass A:\n    def f(self):\n        import vlm_lab.api as api\n")
    found = imports_of(source, "vlm_lab.heads.linear", is_package=False, known=known)
    assert [name for name, _ in found] == ["vlm_lab.config", "vlm_lab.module", "vlm_lab.heads.coca", "vlm_lab.heads",
                                           "vlm_lab.heads.projection", "vlm_lab.api"]
    assert layer_of("vlm_lab.eval.templates") < layer_of("vlm_lab.config") < layer_of("vlm_lab.eval.zeroshot")
    assert layer_of("vlm_lab") == len(LAYERS) - 1 and layer_of("vlm_lab.nowhere") is None


def test_the_architecture_page_shows_every_layer():
    root = PACKAGE.parent
    page = (root / "docs" / "explanation" / "architecture.md").read_text()
    assert all(f"| {layer.name} |" in page for layer in LAYERS)
    assert "](../figures/layers.png)" in page and (root / "docs" / "figures" / "layers.png").is_file()
