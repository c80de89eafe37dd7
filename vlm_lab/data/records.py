"""Image files with captions, read at random: what COCO and the TSV/CSV layout have in common.

A :class:`Record` is one image file with its captions and a dataset-wide integer id.
:class:`CaptionedImages` is the map-style dataset over a list of them, with two sampling modes for
training (one entry per image, or one per caption). A sample that cannot be used (missing file,
undecodable image, no caption) is counted and replaced by the next usable one, so every batch keeps
its size, which contrastive losses and the cross-process gather rely on. In evaluation the replacement
duplicates an image already in the split; retrieval drops duplicates by image id.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlm_lab.data.health import BadSampleCounter
from vlm_lab.data.transforms import open_image
from vlm_lab.embedding_cache import EmbeddingCache, teacher_image_entries
from vlm_lab.errors import ConfigError


@dataclass(frozen=True)
class Record:
    """One image file, all its captions, and its id (unique within the dataset).

    ``duplicate`` marks a later entry with an id already taken: it stays in the list, so that every
    epoch counts it as a bad sample when drawn, but it is never used.
    """

    path: str
    captions: tuple[str, ...]
    image_id: int
    duplicate: bool = False


def caption_problem(caption: str) -> str | None:
    """Why a caption cannot be used (a bad-sample reason), or None.

    Files are decoded with ``errors="surrogateescape"``, so bytes that are not UTF-8 survive as lone
    surrogates: such a caption is "undecodable caption" rather than a guess at what it said.
    """
    if not caption.strip():
        return "empty caption"
    if any("\udc80" <= character <= "\udcff" for character in caption):
        return "undecodable caption"
    return None


@dataclass(frozen=True)
class RawSample:
    """An untransformed sample, for inspection: captions, id, where it is, and how to load the image."""

    captions: tuple[str, ...]
    image_id: int
    where: str
    load_image: Callable[[], Image.Image]


class CaptionedImages(Dataset):
    """Map-style dataset over records; item ``i`` is ``{"pixel_values", "captions", "image_id"}``.

    ``per_caption=True`` makes one entry per (image, caption) pair instead of one per image (whose
    caption the training collate then draws at random each epoch).
    """

    def __init__(self, records: list[Record], transform: Callable[[Image.Image], torch.Tensor],
                 bad: BadSampleCounter, decode_size: tuple[int, int] | None = None,
                 per_caption: bool = False) -> None:
        self.records = records
        self.transform, self.bad, self.decode_size = transform, bad, decode_size
        # (record index, caption index or None for all captions)
        self.entries: list[tuple[int, int | None]] = (
            [(r, c) for r, record in enumerate(records) for c in range(max(1, len(record.captions)))]
            if per_caption else [(r, None) for r in range(len(records))]
        )
        # Set by the data module when a locked tower's outputs are cached (vlm_lab/embedding_cache.py),
        # and when a distillation teacher's image features are (vlm_lab/distillation.py).
        self.embeddings: EmbeddingCache | None = None
        self.teacher_embeddings: EmbeddingCache | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def entry_images(self) -> list[int]:
        """The image (record index) of each entry: what ``data.unique_images_per_batch`` keeps apart."""
        return [record_index for record_index, _ in self.entries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        # A bad entry is replaced by the next good one; only a split with no usable sample at all fails.
        # Each bad entry is counted when the sampler asks for it, not again as someone's replacement,
        # so an epoch counts each once.
        for offset in range(len(self.entries)):
            sample = self._load((index + offset) % len(self.entries), count_bad=offset == 0)
            if sample is not None:
                return sample
        raise ConfigError(f"no usable sample among the {len(self.entries)} {self.bad.split} entries "
                          f"(every image is missing or unreadable, or every caption empty)")

    def _load(self, index: int, count_bad: bool) -> dict[str, Any] | None:
        record_index, caption_index = self.entries[index]
        record = self.records[record_index]
        offered = record.captions if caption_index is None else record.captions[caption_index:caption_index + 1]
        # An image keeps its usable captions; it is a bad sample only when none is left.
        captions = [c for c in offered if caption_problem(c) is None]
        problem, image = None, None
        if record.duplicate:
            problem = "duplicate id"
        elif not captions:
            problem = caption_problem(offered[0]) if offered else "missing caption"
        elif self.embeddings is not None:  # the locked tower's cached outputs stand in for the image
            cached = self.embeddings.lookup(record_index)
            if cached is not None:
                return {**cached, **teacher_image_entries(self.teacher_embeddings, record_index),
                        "captions": captions, "image_id": record.image_id}
            # The image was unusable when the cache was filled: count it as an uncached epoch would.
            problem = "missing image" if self.image_missing(record_index) else "undecodable image"
            where = record.path
        else:
            try:
                image = self.open_record_image(record_index)
            except FileNotFoundError:
                problem = "missing image"
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                problem, where = "undecodable image", f"{record.path} ({type(error).__name__}: {error})"
        if problem is not None:
            if count_bad:
                where = where if problem == "undecodable image" else f"{record.path} (id {record.image_id})"
                self.bad.record(problem, where)
            return None
        return {"pixel_values": self.transform(image), **teacher_image_entries(self.teacher_embeddings, record_index),
                "captions": captions, "image_id": record.image_id}

    # Where the images are: files named by the records. Datasets that keep them elsewhere (a
    # ``datasets`` table: hf_datasets.py) override these two.

    def open_record_image(self, record_index: int) -> Image.Image:
        """The decoded image of a record; ``FileNotFoundError`` when it is missing."""
        return open_image(self.records[record_index].path, self.decode_size)

    def image_missing(self, record_index: int) -> bool:
        """Whether a record's image is missing (rather than there but undecodable)."""
        return not Path(self.records[record_index].path).exists()

    # The embedding cache's interface (vlm_lab/embedding_cache.py): one cache row per record.

    def image_rows(self) -> int:
        return len(self.records)

    def image_identity(self) -> str:
        files = hashlib.sha1("\n".join(f"{r.path}\t{r.image_id}" for r in self.records).encode()).hexdigest()
        return f"captioned_images {len(self.records)} files {files} decode_size={self.decode_size} {self.transform}"

    def image_row_pixels(self, row: int) -> torch.Tensor | None:
        """The transformed image of record ``row``; None when unusable (counted when the row is served)."""
        try:
            return self.transform(self.open_record_image(row))
        except Exception:  # missing or broken: _load counts it each epoch, as without the cache
            return None

    def caption_texts(self) -> list[str]:
        """Every caption a training batch may draw (those of usable records); distillation's teacher
        cache encodes them once."""
        return [c for record in self.records if not record.duplicate for c in record.captions
                if caption_problem(c) is None]


def raw_samples(records: list[Record]) -> Iterator[RawSample]:
    """The records as :class:`RawSample` (images decoded only when asked), for inspection.

    Bytes of a caption that are not UTF-8 show as U+FFFD, printable and tokenisable.
    """
    for record in records:
        captions = tuple(c.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for c in record.captions)
        yield RawSample(captions, record.image_id, record.path, lambda path=record.path: open_image(path))


TABLE_HEADERS = {"filepath", "file_path", "path", "file", "filename", "file_name", "image", "image_path"}


def read_caption_table(table: str, images: str | None, field: str) -> list[Record]:
    """Read a ``filepath<TAB>caption`` TSV (or a ``filepath,caption`` CSV) into records.

    Relative paths are relative to ``images`` (default: the table's folder). An optional header row is
    recognised by its first column's name (``filepath``, ``path``, ``image``...). Rows naming the same
    file are one record, one image with the rows' captions in table order, so its captions share its
    image id (``model.loss.multi_positive`` treats them as positives of each other, retrieval as one
    image's captions). Ids are the records' places, in the order files first appear: a table whose
    files are all different has the row numbers (header excluded) as ids. A row without a caption adds
    none (a file with no caption at all is skipped and counted as "missing caption" when read), an
    empty caption is counted as "empty caption", as is a caption that is not UTF-8 ("undecodable").
    """
    path = Path(table)
    if not path.is_file():
        raise ConfigError(f"data.{field}: no caption table at {table}")
    folder = Path(images) if images is not None else path.parent
    if not folder.is_dir():
        raise ConfigError(f"data.{field.replace('table', 'images')}: no image folder at {folder}")
    # Bytes that are not UTF-8 spoil their row's caption only (caption_problem), not the table.
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        if path.suffix.lower() == ".csv":
            rows = [row for row in csv.reader(f) if row]
        else:  # captions may contain commas and quotes; only the first tab separates
            rows = [line.rstrip("\r\n").split("\t", 1) for line in f if line.strip()]
    if rows and rows[0][0].strip().lower() in TABLE_HEADERS:
        rows = rows[1:]
    if not rows:
        raise ConfigError(f"data.{field}: {table} has no rows")
    captions: dict[str, list[str]] = {}  # file -> its captions; dicts keep the order files first appear
    for row in rows:
        texts = captions.setdefault(str(folder / row[0].strip()), [])
        if len(row) > 1:
            texts.append(row[1].strip())
    return [Record(file, tuple(texts), image_id=i) for i, (file, texts) in enumerate(captions.items())]
