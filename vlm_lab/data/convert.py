"""Move a captions dataset between layouts: COCO, img2dataset shards, and Hugging Face ``datasets``.

    vlm-lab data convert --ann annotations/captions_train2017.json --images train2017 --out shards/train
    vlm-lab data convert --ann captions_val.json --images images --out flickr_hf --to parquet --split validation
    vlm-lab data convert --hf flickr_hf --split validation --out shards/val --per image

Readers: a COCO captions file with its image folder (``--ann`` + ``--images``), or a split of a
``datasets`` dataset (``--hf PATH --split NAME``: any folder or hub id ``data.name: hf_dataset``
reads, with its ``--image-column`` and ``--caption-column``). Both give images with all their
captions, images as their original bytes (never re-encoded unless the format is one that loaders
do not expect).

Writers (``--to``):

- ``shards`` (the default): webdataset shards exactly as img2dataset names them,
  ``00000.tar, 00001.tar, ...`` and beside each ``00000_stats.json``. A sample is ``KEY.jpg``,
  ``KEY.txt`` (a caption) and ``KEY.json`` (``image_id``, ``file_name``, ``width``, ``height``...);
  keys are img2dataset's: the shard number followed by the index within the shard;
- ``parquet``: ``data/{split}-00000-of-0000N.parquet`` with ``datasets`` features (``image``: an
  ``Image`` with the file's bytes, ``caption``, ``image_id``), as the hub stores datasets;
- ``imagefolder``: ``{split}/`` with the image files and a ``metadata.jsonl`` (``file_name``,
  ``caption``, ``image_id``), the ``datasets`` imagefolder layout;
- ``coco``: ``images/`` and ``annotations/captions_{split}.json``.

``per``: ``caption`` writes one sample per (image, caption) pair, as a caption list downloaded with
img2dataset would be; ``image`` writes each image once with all its captions (shards: the first in
``.txt``, all of them as ``captions`` in ``.json``, which the ``cc3m`` module reads; ``datasets``: a
list of strings in ``caption``), which keeps multi-caption retrieval. The default is ``caption`` for
shards and ``image`` for the others (an imagefolder names each image once; COCO lists every
caption of an image anyway).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import webdataset as wds
from PIL import Image

from vlm_lab.data.coco import read_coco_captions
from vlm_lab.errors import ConfigError
from vlm_lab.progress import progress

STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
TARGETS = ("shards", "parquet", "imagefolder", "coco")


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote."""

    shards: list[Path]
    samples: int
    skipped: dict[str, int]
    files: str = "shard(s)"  # what ``shards`` are, for the summary line

    def __str__(self) -> str:
        skipped = f"; skipped {sum(self.skipped.values())} ({', '.join(f'{k}: {v}' for k, v in self.skipped.items())})" \
            if self.skipped else ""
        where = self.shards[0].parent if self.shards else "-"
        return f"wrote {self.samples} samples in {len(self.shards)} {self.files} to {where}{skipped}"


# --------------------------------------------------------------------------------------------------
# Readers: images with their captions


@dataclass(frozen=True)
class CaptionedFile:
    """One image, read when asked (``load``: its bytes, ``FileNotFoundError`` when missing), with
    every caption and its id."""

    load: Callable[[], bytes]
    file_name: str
    captions: tuple[str, ...]
    image_id: int


@dataclass(frozen=True)
class Images:
    """What a reader gives: the images, and how many there are."""

    count: int
    captions: int
    items: Iterator[CaptionedFile]


def coco_images(ann_file: str | Path, images_dir: str | Path) -> Images:
    """The images of a COCO captions file (see ``coco.read_coco_captions``)."""
    if not Path(ann_file).is_file():
        raise ConfigError(f"--ann: no captions file at {ann_file}")
    if not Path(images_dir).is_dir():
        raise ConfigError(f"--images: no image folder at {images_dir}")
    records = read_coco_captions(ann_file, images_dir)
    items = (CaptionedFile(Path(r.path).read_bytes, Path(r.path).name, r.captions, r.image_id) for r in records)
    return Images(len(records), sum(len(r.captions) for r in records), items)


def hf_images(path: str, split: str, image_column: str = "image", caption_column: str = "caption",
              format: str = "auto") -> Images:
    """The rows of a ``datasets`` split (ids: the row numbers), read map-style."""
    from vlm_lab.data.hf_datasets import (HFSplits, caption_form, check_image_column, table_records, undecoded)

    table = HFSplits(path, format).open(split, streaming=False)
    where = f"{path} ({split})"
    check_image_column(table.features, image_column, where)
    caption_form(table.features, caption_column, "auto", where)
    records = table_records(table, caption_column, f"{path}:{split}")
    images = undecoded(table.select_columns([image_column]), image_column)

    def item(row: int) -> CaptionedFile:
        value = images[row][image_column]
        if isinstance(value, dict):
            name = Path(value["path"]).name if value.get("path") else f"{row}"
            return CaptionedFile(lambda: _value_bytes(value), name, records[row].captions, row)
        name = Path(value).name if isinstance(value, str) else f"{row}"
        return CaptionedFile(lambda: _value_bytes(value), name, records[row].captions, row)

    return Images(len(records), sum(len(r.captions) for r in records), (item(row) for row in range(len(records))))


def _value_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise FileNotFoundError("no image")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else Path(value).read_bytes()


@dataclass(frozen=True)
class Prepared:
    """An image ready to write: its bytes (re-encoded only for formats loaders do not expect), its
    extension, size, file name (extension matching the bytes), captions and id."""

    data: bytes
    extension: str
    width: int
    height: int
    file_name: str
    captions: tuple[str, ...]
    image_id: int


def prepare(item: CaptionedFile) -> Prepared | str:
    """The image's bytes checked (a header read), or the bad-sample reason it is skipped."""
    try:
        data = item.load()
    except FileNotFoundError:
        return "missing image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            extension = STORED_AS_IS.get(Path(item.file_name).suffix.lower()) or PIL_EXTENSIONS.get(image.format)
            if extension is None:  # a format webdataset and datasets readers do not expect: store it as JPEG
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG", quality=95)
                data, extension = buffer.getvalue(), "jpg"
    except Exception:  # PIL raises several types for a broken file
        return "undecodable image"
    stem = Path(item.file_name).stem if Path(item.file_name).suffix else item.file_name
    return Prepared(data, extension, width, height, f"{stem}.{extension}", item.captions, item.image_id)


# --------------------------------------------------------------------------------------------------
# Writers


def write_shards(images: Images, out_dir: str | Path, per: str = "caption", shard_size: int = 10000) -> ConvertReport:
    """img2dataset-style shards + stats files (module docstring). Missing or broken images are
    skipped and reported (img2dataset's ``failed_to_download``)."""
    out = _out_dir(out_dir)
    index_digits = max(1, math.ceil(math.log10(shard_size)))  # img2dataset's key layout
    samples = images.count if per == "image" else images.captions
    shard_digits = max(5, len(str(max(0, samples - 1) // shard_size)))

    shards, skipped, total = [], Counter(), 0
    pending = _per(images, per)
    shard_id = 0
    while True:
        chunk = [c for c in (next(pending, None) for _ in range(shard_size)) if c is not None]
        if not chunk:
            break
        name = f"{shard_id:0{shard_digits}d}"
        path = out / f"{name}.tar"
        start, written, missing = time.time(), 0, Counter()
        with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
            for index, (image, captions) in enumerate(chunk):
                if isinstance(image, str):
                    missing[image] += 1
                    continue
                writer.write(_sample(image, captions, per, f"{name}{index:0{index_digits}d}"))
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


def _sample(image: Prepared, captions: list[str], per: str, key: str) -> dict[str, bytes | str]:
    meta = {"key": key, "image_id": image.image_id, "file_name": image.file_name, "caption": captions[0],
            "width": image.width, "height": image.height, "status": "success"}
    if per == "image":
        meta["captions"] = captions
    return {"__key__": key, image.extension: image.data, "txt": captions[0].encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8")}


def write_parquet(images: Images, out_dir: str | Path, split: str, per: str = "image",
                  shard_size: int = 10000) -> ConvertReport:
    """``data/{split}-NNNNN-of-MMMMM.parquet`` files with ``datasets`` features (module docstring)."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    out = _out_dir(out_dir) / "data"
    out.mkdir(exist_ok=True)
    caption = List(Value("string")) if per == "image" else Value("string")
    features = Features({"image": ImageFeature(), "caption": caption, "image_id": Value("int64")})
    rows = images.count if per == "image" else images.captions
    files = max(1, math.ceil(rows / shard_size))
    written, skipped, total = [], Counter(), 0
    pending = _per(images, per)
    for number in range(files):
        chunk = [c for c in (next(pending, None) for _ in range(shard_size)) if c is not None]
        good = [(image, captions) for image, captions in chunk if not isinstance(image, str)]
        skipped.update(image for image, _ in chunk if isinstance(image, str))
        table = Dataset.from_list([
            {"image": {"bytes": image.data, "path": image.file_name},
             "caption": captions if per == "image" else captions[0], "image_id": image.image_id}
            for image, captions in good], features=features)
        path = out / f"{split}-{number:05d}-of-{files:05d}.parquet"
        table.to_parquet(str(path))
        written.append(path)
        total += len(good)
    return ConvertReport(written, total, dict(skipped), "Parquet file(s)")


def write_imagefolder(images: Images, out_dir: str | Path, split: str) -> ConvertReport:
    """``{split}/`` with the image files and ``metadata.jsonl`` (one line per image, all its captions)."""
    folder = _out_dir(out_dir) / split
    folder.mkdir(exist_ok=True)
    skipped, total = Counter(), 0
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for image, name in _files(images, skipped):
            (folder / name).write_bytes(image.data)
            metadata.write(json.dumps({"file_name": name, "caption": list(image.captions),
                                       "image_id": image.image_id}) + "\n")
            total += 1
    return ConvertReport([folder / "metadata.jsonl"], total, dict(skipped), "imagefolder")


def write_coco(images: Images, out_dir: str | Path, split: str) -> ConvertReport:
    """``images/`` and ``annotations/captions_{split}.json`` in the COCO captions format."""
    out = _out_dir(out_dir)
    (out / "images").mkdir(exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    entries, annotations, skipped = [], [], Counter()
    for image, name in _files(images, skipped):
        (out / "images" / name).write_bytes(image.data)
        entries.append({"id": image.image_id, "file_name": name, "width": image.width, "height": image.height})
        annotations += [{"id": len(annotations) + i, "image_id": image.image_id, "caption": caption}
                        for i, caption in enumerate(image.captions)]
    ann = out / "annotations" / f"captions_{split}.json"
    ann.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return ConvertReport([ann], len(entries), dict(skipped), "captions file")


def _files(images: Images, skipped: Counter) -> Iterator[tuple[Prepared, str]]:
    """The usable images, each with a file name no earlier one has; unusable ones counted in ``skipped``."""
    names: set[str] = set()
    for item in progress(images.items, total=images.count, desc="convert", unit="image"):
        image = prepare(item)
        if isinstance(image, str):
            skipped[image] += 1
            continue
        name = image.file_name if image.file_name not in names else f"{image.image_id}_{image.file_name}"
        names.add(name)
        yield image, name


def _out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _per(images: Images, per: str) -> Iterator[tuple[Prepared | str, list[str]]]:
    """(prepared image or skip reason, its captions): once per image, or once per caption; a
    progress bar (vlm_lab/progress.py) counts the samples."""
    with progress(total=images.count if per == "image" else images.captions, desc="convert", unit="sample") as bar:
        for item in images.items:
            image = prepare(item)
            if per == "image":
                yield image, list(item.captions)
                bar.update(1)
            else:
                for caption in item.captions:
                    yield image, [caption]
                    bar.update(1)


# --------------------------------------------------------------------------------------------------
# The command


def convert(out_dir: str | Path, to: str = "shards", ann: str | None = None, images_dir: str | None = None,
            hf: str | None = None, split: str | None = None, image_column: str = "image",
            caption_column: str = "caption", hf_format: str = "auto", per: str | None = None,
            shard_size: int = 10000) -> ConvertReport:
    """``vlm-lab data convert``: read COCO (``ann`` + ``images_dir``) or a ``datasets`` split (``hf`` +
    ``split``) and write it as ``to`` says (module docstring)."""
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    per = per or ("caption" if to == "shards" else "image")
    if per not in ("caption", "image"):
        raise ConfigError(f"--per must be 'caption' or 'image', not {per!r}")
    if to in ("imagefolder", "coco") and per != "image":
        raise ConfigError(f"--to {to} names each image once, with all its captions; use --per image (the default)")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, not {shard_size}")
    if (hf is None) == (ann is None and images_dir is None):
        raise ConfigError("give either --ann and --images (COCO) or --hf (a datasets dataset)")
    if hf is None:
        if ann is None or images_dir is None:
            raise ConfigError("--ann and --images go together: the captions file and its image folder")
        source = coco_images(ann, images_dir)
    else:
        source = hf_images(hf, split or "train", image_column, caption_column, hf_format)
    split = split or "train"
    if to == "shards":
        return write_shards(source, out_dir, per, shard_size)
    if to == "parquet":
        return write_parquet(source, out_dir, split, per, shard_size)
    if to == "imagefolder":
        return write_imagefolder(source, out_dir, split)
    return write_coco(source, out_dir, split)


def coco_to_shards(ann_file: str | Path, images_dir: str | Path, out_dir: str | Path,
                   per: Literal["caption", "image"] = "caption", shard_size: int = 10000) -> ConvertReport:
    """Write the dataset of a COCO captions file as shards + stats files (see the module docstring)."""
    return convert(out_dir, "shards", ann=str(ann_file), images_dir=str(images_dir), per=per, shard_size=shard_size)

