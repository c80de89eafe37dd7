"""Shared by the data tests: where the real datasets are, and writers for small broken ones."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from vlm_lab.towers.base import ImageConfig

# The real data sits beside the repository (../shared/data); a user's clone does not have it.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real test data not found at {SHARED}")

COCO_MINI = SHARED / "coco-mini"
FLICKR8K = SHARED / "flickr8k"
CC12M_SHARD = SHARED / "cc12m-shard" / "cc12m-train-0000.tar"

TINY_IMAGES = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def jpeg_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A real JPEG cut in half: its header opens, decoding fails."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def write_shard(path: Path, samples: list[dict[str, bytes | str]], stats: bool = True) -> None:
    """A webdataset tar (members sorted per sample, as img2dataset writes) and its stats file."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
    if stats:
        stem = path.name[: -len(".tar")]
        path.with_name(f"{stem}_stats.json").write_text(json.dumps({"count": len(samples), "successes": len(samples)}))


def good_samples(shard: int, count: int) -> list[dict[str, bytes | str]]:
    """``count`` valid samples whose keys are img2dataset's (shard number, index)."""
    return [
        {"__key__": f"{shard:05d}{i:04d}", "jpg": jpeg_bytes((10 * i % 255, 40, 90)), "txt": f"shard {shard} sample {i}",
         "json": json.dumps({"key": f"{shard:05d}{i:04d}"})}
        for i in range(count)
    ]
