"""Distillation teachers (``model.distill.teacher``): a vlm-lab checkpoint or a pretrained CLIP folder.

The teacher is a whole ``VisionLanguageModule`` (towers, heads, logit scale, tokenizer and image
preprocessing), which ``VisionLanguageModule.set_teacher`` freezes and keeps out of the student.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vlm_lab.config import merge
from vlm_lab.errors import ConfigError
from vlm_lab.interop.checkpoint import read_clip_checkpoint
from vlm_lab.interop.pretrained import load_into_module
from vlm_lab.schema import defaults

if TYPE_CHECKING:
    from vlm_lab.module import VisionLanguageModule


def load_teacher(source: str) -> VisionLanguageModule:
    """The teacher at ``source``, on the CPU in eval mode.

    A file is read as a checkpoint of ``vlm-lab fit`` (``RUN_DIR/checkpoints/last.ckpt``); a folder as
    a Hugging Face ``CLIPModel`` or open_clip checkpoint (what ``model.init_from`` reads), with its
    tokenizer and image preprocessing.
    """
    from vlm_lab.module import VisionLanguageModule  # a heavy import, only when a teacher is wanted

    path = Path(source).expanduser()
    if path.is_file():
        try:
            module = VisionLanguageModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
        except ConfigError:
            raise
        except Exception as error:  # not a Lightning checkpoint of this module: one line, not a traceback
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise ConfigError(f"model.distill.teacher: {source} is not a vlm-lab checkpoint "
                              f"({type(error).__name__}: {first_line})") from None
        return module.eval()
    if path.is_dir():
        config = defaults()
        model = merge({"model": config["model"]}, {"model": read_clip_checkpoint(path).model_section()})["model"]
        module = VisionLanguageModule(model=model, optim=config["optim"])
        load_into_module(module, str(path))
        return module.eval()
    raise ConfigError(f"model.distill.teacher: no checkpoint file or CLIP folder at {source} "
                      f"(a relative path starts at the current directory)")
