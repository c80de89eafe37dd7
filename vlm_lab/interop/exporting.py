"""``vlm-lab export``: a trained checkpoint as a Hugging Face or open_clip model directory.

The checkpoint is loaded as the module it was trained as (``load_from_checkpoint``), then written by
the format's exporter (``hf_clip.export_hf``, ``open_clip.export_open_clip``) with the module's
tokenizer saved alongside, so the directory is complete: model, preprocessing and tokenizer.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Literal

from vlm_lab.errors import ConfigError

FORMATS = ("hf", "open_clip")


def load_module(ckpt: str | Path) -> Any:
    """The ``VisionLanguageModule`` saved in a Lightning checkpoint, on CPU, in eval mode."""
    from vlm_lab.module import VisionLanguageModule

    if not Path(ckpt).is_file():
        raise ConfigError(f"export: no checkpoint file at {ckpt}")
    module = VisionLanguageModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    return module.eval()


def export(source: str | Path | Any, format: Literal["hf", "open_clip"], out: str | Path) -> Path:
    """Write ``source`` (a checkpoint path or a ``VisionLanguageModule``) to directory ``out``.

    ``format="hf"``: a ``CLIPModel`` directory when both towers are native, else a
    ``VisionTextDualEncoderModel`` one (a timm tower as ``TimmWrapperModel``); ``transformers`` loads
    either with ``from_pretrained(out)``, and ``AutoProcessor.from_pretrained(out)`` its preprocessing.
    ``format="open_clip"``: ``open_clip_config.json`` + ``open_clip_model.safetensors``, which
    ``open_clip.create_model("local-dir:" + out)`` loads. ``out`` must be empty or absent; on an error
    nothing is left behind. What each format holds: docs/how-to/export.md. Returns ``out``.
    """
    from vlm_lab.interop.hf_clip import export_hf
    from vlm_lab.interop.open_clip import export_open_clip

    if format not in FORMATS:
        raise ConfigError(f"export: unknown format {format!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: {out} exists and is not an empty directory; choose a new --out")
    module = load_module(source) if isinstance(source, (str, Path)) else source.eval()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer = export_hf if format == "hf" else export_open_clip
    try:
        writer(module, out)
        save_tokenizer(module, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:  # the user's empty directory: empty it again
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise
    return out


def save_tokenizer(module: Any, out: Path) -> None:
    """The module's tokenizer, truncating where the module does (``model.tokenizer.max_length``).

    The module tokenizes with ``truncation=True, max_length=module.max_length``; saved with that
    ``model_max_length``, ``tokenizer(texts, padding=True, truncation=True)`` gives the same ids, and
    so does a processor (``AutoProcessor``) that holds it.
    A copy is saved, so the module's own tokenizer is left as it was.
    """
    tokenizer = copy.deepcopy(module.tokenizer)
    tokenizer.model_max_length = module.max_length
    if "max_length" in tokenizer.init_kwargs:  # a default that processors (AutoProcessor) truncate to instead
        tokenizer.init_kwargs["max_length"] = module.max_length
    tokenizer.save_pretrained(str(out))
