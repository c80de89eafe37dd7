"""Write a COCO-format captions dataset as webdataset shards in img2dataset's layout.

So users can stream their own data with ``data.name: cc3m``::

    vlm-lab data convert --ann annotations/captions_train2017.json --images train2017 --out shards/train

writes ``shards/train/00000.tar, 00001.tar, ...`` and beside each ``00000_stats.json``, exactly as
img2dataset names them. A sample is ``KEY.jpg`` (the original file's bytes, not re-encoded),
``KEY.txt`` (a caption) and ``KEY.json`` (``image_id``, ``file_name``, ``width``, ``height``...); keys
are img2dataset's: the shard number followed by the index within the shard.

``per="caption"`` (the default) writes one sample per (image, caption) pair, as a caption list
downloaded with img2dataset would be. ``per="image"`` writes each image once, its first caption in
``.txt`` and all of them as ``captions`` in ``.json``, which the ``cc3m`` module reads: validation
shards keep COCO's multi-caption retrieval that way.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import webdataset as wds
from PIL import Image

from vlm_lab.data.coco import read_coco_captions
from vlm_lab.data.records import Record
from vlm_lab.errors import ConfigError
from vlm_lab.progress import progress

STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote."""

    shards: list[Path]
    samples: int
    skipped: dict[str, int]

    def __str__(self) -> str:
        skipped = f"; skipped {sum(self.skipped.values())} ({', '.join(f'{k}: {v}' for k, v in self.skipped.items())})" \
            if self.skipped else ""
        where = self.shards[0].parent if self.shards else "-"
        return f"wrote {self.samples} samples in {len(self.shards)} shard(s) to {where}{skipped}"


def coco_to_shards(ann_file: str | Path, images_dir: str | Path, out_dir: str | Path,
                   per: Literal["caption", "image"] = "caption", shard_size: int = 10000) -> ConvertReport:
    """Write the dataset of a COCO captions file as shards + stats files (see the module docstring).

    Images that are missing are skipped and reported (img2dataset's ``failed_to_download``).
    """
    if per not in ("caption", "image"):
        raise ConfigError(f"--per must be 'caption' or 'image', not {per!r}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, not {shard_size}")
    if not Path(ann_file).is_file():
        raise ConfigError(f"--ann: no captions file at {ann_file}")
    if not Path(images_dir).is_dir():
        raise ConfigError(f"--images: no image folder at {images_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_coco_captions(ann_file, images_dir)
    index_digits = max(1, math.ceil(math.log10(shard_size)))  # img2dataset's key layout
    samples = len(records) if per == "image" else sum(len(r.captions) for r in records)
    shard_digits = max(5, len(str((samples - 1) // shard_size)))

    shards, skipped, total = [], Counter(), 0
    pending = iter(progress(_samples(records, per), total=samples, desc="convert", unit="sample"))
    shard_id = 0
    while True:
        chunk = [next(pending, None) for _ in range(shard_size)]
        chunk = [c for c in chunk if c is not None]
        if not chunk:
            break
        name = f"{shard_id:0{shard_digits}d}"
        path = out / f"{name}.tar"
        start, written, missing = time.time(), 0, Counter()
        with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
            for index, (record, captions) in enumerate(chunk):
                sample = _encode(record, captions, per, f"{name}{index:0{index_digits}d}")
                if isinstance(sample, str):
                    missing[sample] += 1
                    continue
                writer.write(sample)
                written += 1
        stats = {
            "count": len(chunk),
            "successes": written,
            "failed_to_download": sum(missing.values()),
            "failed_to_resize": 0,
            "duration": time.time() - start,
            "status_dict": {"success": written, **missing},
        }
        (out / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
        shards.append(path)
        skipped.update(missing)
        total += written
        shard_id += 1
    return ConvertReport(shards, total, dict(skipped))


def _samples(records: list[Record], per: str) -> Iterator[tuple[Record, list[str]]]:
    for record in records:
        if per == "image":
            yield record, list(record.captions)
        else:
            for caption in record.captions:
                yield record, [caption]


def _encode(record: Record, captions: list[str], per: str, key: str) -> dict[str, bytes | str] | str:
    path = Path(record.path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing image"
    extension = STORED_AS_IS.get(path.suffix.lower())
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if extension is None:  # a format webdataset readers do not expect: store it as JPEG
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG", quality=95)
                data, extension = buffer.getvalue(), "jpg"
    except Exception:  # PIL raises several types for a broken file
        return "undecodable image"
    meta = {"key": key, "image_id": record.image_id, "file_name": path.name, "caption": captions[0],
            "width": width, "height": height, "status": "success"}
    if per == "image":
        meta["captions"] = captions
    return {"__key__": key, extension: data, "txt": captions[0].encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8")}
