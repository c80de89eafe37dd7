"""The LiT experiment configs say what their names promise, and results.py tabulates finished runs."""

import importlib.util
import json
from pathlib import Path

import pytest

import vlm_lab

LIT = Path(__file__).resolve().parents[1] / "experiments" / "lit"
HEADLINE = LIT / "flickr8k_lit.yaml"


def load_results_script():
    spec = importlib.util.spec_from_file_location("lit_results", LIT / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results = load_results_script()


def variant(stem):
    return vlm_lab.load_config(HEADLINE, LIT / f"{stem}.yaml")


def test_headline_is_a_cacheable_lit_recipe_on_flickr8k():
    cfg = vlm_lab.load_config(HEADLINE)
    assert cfg.model.vision.name == "efficientnet_lite0" and cfg.model.vision_lock.lock
    assert cfg.model.text.name == "minilm_l6" and not cfg.model.text_lock.lock
    assert not cfg.data.augment and cfg.embedding_cache.enabled  # deterministic images: cached
    assert cfg.data.train_ann.endswith("flickr8k/annotations/captions_train.json")
    assert cfg.zeroshot.root.endswith("cifar10-test")


@pytest.mark.parametrize("stem, image, text", [
    ("locked_both_floor", "L", "L"),
    ("locked_image_scratch_text", "L", "u"),
    ("locked_image_pretrained_text", "L", "U"),
    ("tuned_image_scratch_text", "U", "u"),
    ("tuned_image_tuned_text", "U", "U"),
    ("scratch_both", "u", "u"),
])
def test_each_variant_matches_its_lit_letters(stem, image, text):
    cfg = variant(stem)
    assert (stem, image + text) in [(s, paper) for s, paper, _ in results.VARIANTS]
    vision_pretrained = cfg.model.vision.name == "efficientnet_lite0"
    assert (image in "LU") == vision_pretrained and (image == "L") == cfg.model.vision_lock.lock
    text_pretrained = cfg.model.text.name == "minilm_l6"
    assert (text in "LU") == text_pretrained and (text == "L") == cfg.model.text_lock.lock


def test_results_table_reads_finished_runs(tmp_path):
    run = tmp_path / "locked_both_floor"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"val/i2t_R@1": 18.3, "val/t2i_R@1": 14.04, "val/zeroshot_top1": 31.0,
                                                  "epoch": 3}))
    (run / "wall_seconds").write_text("1200\n")
    (run / "DONE").write_text("")
    table = results.table(tmp_path).splitlines()
    assert len(table) == 3
    assert table[2].startswith("| LL: both towers locked") and "| 18.3 | - | - | 14.0 |" in table[2]
    assert table[2].endswith("| 31.0 | 4 | 20 min |")
