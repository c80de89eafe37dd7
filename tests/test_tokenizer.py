"""The word-level caption vocabulary (model.tokenizer.train_from)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_lab.config import load_config
from vlm_lab.errors import ConfigError
from vlm_lab.api import build_module
from vlm_lab.tokenizer import build_word_tokenizer, load_tokenizer, read_captions, word_tokenizer_dir

CAPTIONS = ["A dog runs on the grass.", "A black dog jumps.", "Two dogs run on the beach!",
            "A man rides a bike.", "the dog sleeps"]


def write_coco(path: Path, captions: list[str]) -> Path:
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"id": i, "image_id": 1, "caption": c}
                                                for i, c in enumerate(captions)]}))
    return path


def test_vocabulary_keeps_words_seen_min_count_times():
    tokenizer = build_word_tokenizer(CAPTIONS, min_count=2)
    # special tokens first, then "a" (4x), "dog" "the" "." (3x), "on" (2x); "grass" (1x) is unknown
    assert len(tokenizer) == 4 + 5
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id] == [0, 1, 2, 3]
    ids = tokenizer("A DOG on the grass.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a", "dog", "on", "the", "[UNK]", "."]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a dog on the ."


def test_same_captions_same_folder_and_reload(tmp_path):
    source = write_coco(tmp_path / "captions.json", CAPTIONS)
    first = word_tokenizer_dir(source, 1, cache_dir=tmp_path / "cache")
    assert word_tokenizer_dir(source, 1, cache_dir=tmp_path / "cache") == first
    assert word_tokenizer_dir(source, 2, cache_dir=tmp_path / "cache") != first
    reloaded = load_tokenizer(str(first))
    assert reloaded("a dog")["input_ids"] == build_word_tokenizer(CAPTIONS, 1)("a dog")["input_ids"]
    text_file = tmp_path / "captions.txt"
    text_file.write_text("\n".join(CAPTIONS))
    assert read_captions(text_file) == read_captions(source) == CAPTIONS


def test_tokenizers_and_embeddings_share_one_cache_root(tmp_path, monkeypatch):
    from vlm_lab.embedding_cache import CacheSettings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    built = word_tokenizer_dir(write_coco(tmp_path / "captions.json", CAPTIONS), 1)
    assert built.parent == tmp_path / "xdg" / "vlm-lab" / "tokenizers"
    assert CacheSettings().directory() == tmp_path / "xdg" / "vlm-lab" / "embeddings"
    assert not list(built.parent.glob("*.partial-*"))  # the temporary folder was moved into place
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # unset or empty: ~/.cache
    assert CacheSettings().directory() == Path.home() / ".cache" / "vlm-lab" / "embeddings"


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no file at"):
        read_captions(tmp_path / "missing.json")
    (tmp_path / "wrong.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="annotations"):
        read_captions(tmp_path / "wrong.json")
    with pytest.raises(ConfigError, match="min_count"):
        build_word_tokenizer(CAPTIONS, min_count=0)


def test_module_sizes_text_tower_and_caption_head_to_the_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = write_coco(tmp_path / "captions.json", CAPTIONS * 2)
    cfg = load_config(Path(__file__).parent / "configs" / "tiny.yaml", overrides=[
        f"model.tokenizer.train_from={source}", "model.tokenizer.min_count=2",
        "model.caption_weight=1.0", "model.caption_head.layers=1", "model.caption_head.heads=2",
        "model.caption_head.image_queries=4"])
    module = build_module(cfg)
    vocabulary = len(module.tokenizer)
    assert vocabulary == len(build_word_tokenizer(CAPTIONS * 2, 2)) < 30
    assert module.text.embeddings.token_embedding.num_embeddings == vocabulary
    assert module.caption_head.output.out_features == vocabulary
    tokens = module.tokenize(["a dog runs"])
    assert tokens["input_ids"].max() < vocabulary
    with pytest.raises(ConfigError, match="either path"):
        build_module(load_config(Path(__file__).parent / "configs" / "tiny.yaml", overrides=[
            f"model.tokenizer.train_from={source}", f"model.tokenizer.path={tmp_path}"]))


@pytest.mark.slow
def test_cli_check_reports_a_missing_captions_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlm_lab.cli", "check", str(Path(__file__).parent / "configs" / "tiny.yaml"),
                             f"model.tokenizer.train_from={tmp_path / 'nope.json'}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no file at" in result.stderr
