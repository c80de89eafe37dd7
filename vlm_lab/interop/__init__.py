"""Interoperability with Hugging Face ``transformers`` and open_clip: load their CLIP checkpoints into
the native towers (``model.init_from``, ``clip_vit_pretrained``, ``clip_text_pretrained``) and
export trained models back (``vlm-lab export``).

One file per concern: ``checkpoint.py`` (a checkpoint directory in vlm-lab terms, checked loading),
``hf_clip.py`` and ``open_clip.py`` (each format both ways), ``pretrained.py`` (loading into towers
and modules), ``parts.py`` (a trained module as plain numbers), ``exporting.py`` (``vlm-lab export``),
``teacher.py`` (distillation teachers).
"""

from vlm_lab.interop.checkpoint import ClipCheckpoint, read_clip_checkpoint
from vlm_lab.interop.exporting import export, load_module
from vlm_lab.interop.open_clip import clip_tokenizer_from_bpe
from vlm_lab.interop.pretrained import (init_model_section, load_into_module, pretrained_text_tower,
                                        pretrained_vision_tower)
from vlm_lab.interop.teacher import load_teacher

__all__ = [
    "ClipCheckpoint",
    "clip_tokenizer_from_bpe",
    "export",
    "init_model_section",
    "load_into_module",
    "load_module",
    "load_teacher",
    "pretrained_text_tower",
    "pretrained_vision_tower",
    "read_clip_checkpoint",
]
