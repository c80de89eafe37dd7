"""vlm-lab: train CLIP-, ALIGN-, SigLIP- and LiT-style vision-language models from YAML.

Importing the package registers every built-in tower, head, loss and data module.
"""

from vlm_lab import data, heads, losses, towers  # noqa: F401  (registers the built-ins)
from vlm_lab.api import build_datamodule, build_module, build_trainer, fit, test, upgrade_checkpoint, validate
from vlm_lab.config import load_config
from vlm_lab.module import VisionLanguageModule
from vlm_lab.registry import (
    add_catalog,
    build,
    describe,
    list_datamodules,
    list_heads,
    list_losses,
    list_text_towers,
    list_vision_towers,
    register_datamodule,
    register_head,
    register_loss,
    register_text_tower,
    register_vision_tower,
)

__version__ = "0.1.0"

__all__ = [
    "VisionLanguageModule",
    "add_catalog",
    "build",
    "build_datamodule",
    "build_module",
    "build_trainer",
    "describe",
    "fit",
    "list_datamodules",
    "list_heads",
    "list_losses",
    "list_text_towers",
    "list_vision_towers",
    "load_config",
    "register_datamodule",
    "register_head",
    "register_loss",
    "register_text_tower",
    "register_vision_tower",
    "test",
    "upgrade_checkpoint",
    "validate",
]
