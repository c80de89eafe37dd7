"""vlm-lab: train CLIP-, ALIGN-, SigLIP- and LiT-style vision-language models from YAML.

Importing the package registers every built-in tower, head, loss and data module.
"""

from vlm_lab import callbacks, data, heads, interop, losses, towers, tracking  # noqa: F401  (registers the built-ins)
from vlm_lab.eval import captioning, image_text_retrieval, probes, zeroshot  # noqa: F401  (registers the built-in evaluators)
from vlm_lab.api import (
    build_datamodule,
    build_module,
    build_trainer,
    fit,
    load_config,
    test,
    upgrade_checkpoint,
    validate,
)
from vlm_lab.module import VisionLanguageModule
from vlm_lab.registry import (
    add_catalog,
    build,
    describe,
    list_callbacks,
    list_datamodules,
    list_evaluators,
    list_heads,
    list_loggers,
    list_losses,
    list_text_towers,
    list_vision_towers,
    register_callback,
    register_datamodule,
    register_evaluator,
    register_head,
    register_logger,
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
    "list_callbacks",
    "list_datamodules",
    "list_evaluators",
    "list_heads",
    "list_loggers",
    "list_losses",
    "list_text_towers",
    "list_vision_towers",
    "load_config",
    "register_callback",
    "register_datamodule",
    "register_evaluator",
    "register_head",
    "register_logger",
    "register_loss",
    "register_text_tower",
    "register_vision_tower",
    "test",
    "upgrade_checkpoint",
    "validate",
]
