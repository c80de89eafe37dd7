"""The LiT experiment configs say what their names promise, and results.py tabulates finished runs."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

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
    assert cfg.eval.evaluators.cifar10.root.endswith("cifar10-test")


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
    (run / "val").mkdir(parents=True)
    (run / "cifar10").mkdir()
    (run / "checkpoints").mkdir()
    (run / "metrics.json").write_text(json.dumps({"val/i2t_R@1": 40.0, "epoch": 3}))  # the fit's: dev, not shown
    (run / "val" / "metrics.json").write_text(json.dumps({"val/i2t_R@1": 18.3, "val/t2i_R@1": 14.04}))
    (run / "cifar10" / "metrics.json").write_text(json.dumps({"eval/cifar10/top1": 31.0}))
    torch.save({"epoch": 1}, run / "checkpoints" / "best.ckpt")
    (run / "wall_seconds").write_text("1200\n")
    (run / "DONE").write_text("")
    (tmp_path / "scratch_both").mkdir()  # trained, not yet scored on val: no row
    (tmp_path / "scratch_both" / "DONE").write_text("")
    table = results.table(tmp_path).splitlines()
    assert len(table) == 3
    assert table[2].startswith("| LL: both towers locked") and "| 18.3 | - | - | 14.0 |" in table[2]
    assert table[2].endswith("| 31.0 | 2 / 4 | 20 min |")


def test_a_variant_trains_on_dev_then_scores_its_best_checkpoint_once(tmp_path, monkeypatch):
    calls = []

    def fake_call(command, log_file, cwd):  # each command leaves the files a real one writes
        assert cwd == results.ROOT  # the recipe's relative paths (../shared/data) resolve from the clone
        calls.append(command)
        run_dir = Path(command[command.index("--run-dir") + 1])
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text("{}")
        return 0

    monkeypatch.setattr(results, "run_logged", fake_call)
    results.run("locked_both_floor", tmp_path, ["trainer.max_epochs=1"])
    variant_file, run_dir = str(LIT / "locked_both_floor.yaml"), tmp_path / "locked_both_floor"
    fit, validate, evaluate = calls
    assert fit[:4] == ["fit", str(HEADLINE), str(results.DEV_SPLIT), variant_file] and fit[-1] == "trainer.max_epochs=1"
    best = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    assert validate[:4] == ["validate", str(HEADLINE), variant_file, best]  # val: no dev overlay
    assert evaluate[:4] == ["eval", str(HEADLINE), variant_file, best]
    assert validate[validate.index("--run-dir") + 1] == str(run_dir / "val")
    results.run("locked_both_floor", tmp_path, [])  # all done: nothing runs again
    assert len(calls) == 3


def test_results_live_beside_the_experiment():
    """results.py --readme fills the marked block of experiments/lit/README.md; the top-level README has none."""
    assert results.RESULTS_PAGE == LIT / "README.md"
    assert results.START in results.RESULTS_PAGE.read_text()
    assert results.START not in (LIT.parents[1] / "README.md").read_text()
    rows = results.read_table()
    assert {row["config"].strip("`") for row in rows} <= {stem for stem, _, _ in results.VARIANTS}
    headline = next(row for row in rows if row["config"] == "`locked_image_pretrained_text`")
    # The top-level README's headline row quotes the same run (the recipe trained as chosen on dev).
    quoted = re.search(r"LiT on Flickr8k.*?image-to-text \*\*([\d.]+)\*\*, text-to-image \*\*([\d.]+)\*\*",
                       (LIT.parents[1] / "README.md").read_text())
    assert (headline["i2t R@1"], headline["t2i R@1"]) == quoted.groups()


def test_write_readme_replaces_the_marked_table_and_plot_reads_it(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(f"before\n{results.START}\nold table\n{results.END}\nafter\n")
    table = ("| variant | config | i2t R@1 | t2i R@1 | CIFAR-10 zero-shot top-1 |\n|---|---|---|---|---|\n"
             "| LL: the floor | `locked_both_floor` | 29.1 | 20.4 | 32.2 |")
    results.write_readme(table, page)
    text = page.read_text()
    assert "old table" not in text and text.startswith("before\n") and text.endswith("after\n")
    rows = results.read_table(page)
    assert rows == [{"variant": "LL: the floor", "config": "`locked_both_floor`", "i2t R@1": "29.1",
                     "t2i R@1": "20.4", "CIFAR-10 zero-shot top-1": "32.2"}]
    figure = results.plot(rows, tmp_path / "chart.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unmarked = tmp_path / "other.md"
    unmarked.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="has no <!-- lit-results:start -->"):
        results.write_readme(table, unmarked)
