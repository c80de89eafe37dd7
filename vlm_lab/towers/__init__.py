"""Vision and text towers. Importing this package registers them all."""

from vlm_lab.towers.base import ImageConfig, TowerOutput
from vlm_lab.towers import clip_text, clip_vit, hf, timm_tower  # noqa: F401  (registers)

__all__ = ["ImageConfig", "TowerOutput"]
