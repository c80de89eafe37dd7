"""Hugging Face ``datasets`` as a source of image-caption pairs: local folders, or the hub when online.

Any ``datasets`` dataset with an image column and a caption column (a string, or a list of captions
per image) trains and evaluates like the COCO and webdataset layouts::

    data: {name: hf_dataset, path: data/flickr8k_hf, image_column: image, caption_column: caption}

``path`` is one of (``format: auto`` tells them apart):

- ``saved``: a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``);
- ``parquet`` / ``arrow``: a folder of Parquet or Arrow files, split by their names as the hub does
  (``data/train-00000-of-00004.parquet``, ``validation-...``; files without a split name are ``train``);
- ``imagefolder``: image files with a ``metadata.jsonl`` (or ``.csv``) giving each ``file_name`` its
  caption column, split by folder (``train/``, ``validation/``...);
- ``hub``: a hub id (``owner/name``), only when the machine is online.

Map-style (``streaming: false``, the default): the split's rows are read at random like COCO, one
entry per image (a random caption each epoch) or per caption (``train_sampling``). Streaming
(``streaming: true``) reads the split as a ``datasets.IterableDataset`` whose shards (its files) are
split across ranks and loader workers by :class:`~vlm_lab.data.shards.ShardStream`, with the same
exact coverage and equal rank lengths as webdataset shards. That is why the shards are taken one by
one with ``IterableDataset.shard`` rather than with ``datasets.distributed.split_dataset_by_node``:
the latter gives ranks unequal lengths (a hang under DDP) or, with ``strategy="examples"``, has every
node read every shard. Streaming needs the rows per shard to plan the epoch: they come from the
Parquet footers / Arrow files, else ``data.{split}_samples`` must give the epoch length.

A dev split for recipe choices (``data.dev_split``, map-style only) is carved from the training split
as ``coco_captions`` carves it (``vlm_lab/data/dev_split.py``); which rows are dev images is fixed by
:func:`image_identities`.

Images are read undecoded (``Image(decode=False)``) and decoded here, exactly as the other layouts
decode files, so a dataset converted from COCO gives the same pixels. Bad images and empty captions
are skipped and counted (``health.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlm_lab.data.base import CaptionDataModule
from vlm_lab.data.dev_split import DevSplit, DevSplitServing
from vlm_lab.data.health import BadSampleCounter
from vlm_lab.data.records import CaptionedImages, RawSample, Record, raw_samples
from vlm_lab.data.shards import ShardStream, key_to_id, stream_raw_samples
from vlm_lab.data.transforms import open_image
from vlm_lab.distributed import world_info
from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_datamodule
from vlm_lab.towers.base import ImageConfig

Format = Literal["auto", "saved", "parquet", "arrow", "imagefolder", "hub"]
CaptionForm = Literal["auto", "string", "list"]
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Rows a shard reader takes from ``IterableDataset.iter`` at a time.
READ_BATCH = 64


# --------------------------------------------------------------------------------------------------
# Finding and opening a split


def detect_format(path: str) -> str:
    """Which kind of dataset ``path`` holds (module docstring), from what is in the folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if _looks_local(path):
            raise ConfigError(f"data.path: no dataset folder at {path}")
        return "hub"
    if folder.is_file():
        suffix = folder.suffix.lower().lstrip(".")
        if suffix in ("parquet", "arrow"):
            return suffix
        raise ConfigError(f"data.path={path} is a file; give a folder, or a .parquet or .arrow file")
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return "saved"
    # metadata files sit at the top or in the split folders: look there only, not through every image.
    tops = [folder, *(child for child in folder.iterdir() if child.is_dir())]
    if any((top / name).is_file() for top in tops for name in METADATA_FILES):
        return "imagefolder"
    for suffix in ("parquet", "arrow"):
        if next(folder.rglob(f"*.{suffix}"), None) is not None:
            return suffix
    raise ConfigError(f"data.path={path}: no dataset found there (a save_to_disk folder, Parquet or Arrow files, or "
                      f"images with a metadata.jsonl); set data.format to say which")


def _looks_local(path: str) -> bool:
    """A path no hub id can be (``owner/name`` or ``name``): absolute, relative with dots, or deeper."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def hub_offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


class HFSplits:
    """The splits of one ``datasets`` dataset, opened map-style or streaming, with their shard files.

    Args:
        path: a local folder (or file), or a hub id.
        format: one of ``Format`` (``auto``: :func:`detect_format`).
        cache_dir: where ``datasets`` caches what it prepares (Parquet turned into Arrow, hub files);
            default: its own (``HF_DATASETS_CACHE``).
    """

    def __init__(self, path: str, format: str = "auto", cache_dir: str | None = None) -> None:
        self.path, self.cache_dir = path, cache_dir
        self.format = detect_format(path) if format == "auto" else format
        if self.format == "hub":
            if Path(path).expanduser().exists():
                raise ConfigError(f"data.format=hub but data.path={path} is a local path; give a hub id (owner/name)")
            if hub_offline():
                raise ConfigError(f"data.path={path!r} is not a local folder, and as a Hugging Face hub id it needs "
                                  f"the network, but HF_HUB_OFFLINE is set; run online or point data.path at a local copy")
        elif not Path(path).expanduser().exists():
            raise ConfigError(f"data.path: no dataset folder at {path} (data.format={self.format})")
        self._files: dict[str, list[str]] | None = None
        self._saved: Any = None

    def names(self) -> list[str]:
        """The dataset's split names."""
        if self.format == "saved":
            saved = self._load_saved()
            return [str(name) for name in saved] if isinstance(saved, dict) else [_lone_split_name(saved)]
        if self.format == "hub":
            import datasets

            return [str(name) for name in self._guard(lambda: datasets.get_dataset_split_names(self.path))]
        return list(self.data_files())

    def data_files(self) -> dict[str, list[str]]:
        """Split name -> its files, in the order their rows are read (not for ``hub``)."""
        if self._files is None:
            if self.format == "saved":
                saved = self._load_saved()
                splits = saved if isinstance(saved, dict) else {_lone_split_name(saved): saved}
                self._files = {name: [c["filename"] for c in split.cache_files] for name, split in splits.items()}
            else:
                import datasets

                where = {"data_files": self.path} if Path(self.path).is_file() else {"data_dir": self.path}
                builder = self._guard(lambda: datasets.load_dataset_builder(self.format, **where))
                self._files = {str(name): list(files) for name, files in (builder.config.data_files or {}).items()}
            if not any(self._files.values()):
                raise ConfigError(f"data.path={self.path}: no {self.format} data files found")
        return self._files

    def open(self, name: str, streaming: bool) -> Any:
        """Split ``name`` as a ``datasets.Dataset`` (or an ``IterableDataset`` when ``streaming``)."""
        import datasets

        names = self.names()
        if name not in names:
            raise ConfigError(f"split {name!r} is not in {self.path}; its splits: {', '.join(names)}")
        if self.format == "saved" and not streaming:
            saved = self._load_saved()
            return saved[name] if isinstance(saved, dict) else saved
        if self.format == "hub":
            return self._guard(lambda: datasets.load_dataset(self.path, split=name, streaming=streaming,
                                                             cache_dir=self.cache_dir))
        # save_to_disk writes Arrow stream files, which the arrow builder streams.
        builder = "arrow" if self.format == "saved" else self.format
        files = self.data_files()[name] if self.format != "imagefolder" else None
        where = {"data_files": {name: files}} if files is not None else {"data_dir": self.path}
        return self._guard(lambda: datasets.load_dataset(builder, split=name, streaming=streaming,
                                                         cache_dir=self.cache_dir, **where))

    def shard_counts(self, name: str) -> list[int] | None:
        """Rows per file of a split, which are its stream's shards (Parquet footers, Arrow files), or None."""
        if self.format not in ("saved", "parquet", "arrow"):
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        counts = []
        for file in self.data_files()[name]:
            if file.endswith(".parquet"):
                counts.append(pq.ParquetFile(file).metadata.num_rows)
            else:  # Arrow: stream format as save_to_disk writes it, else the file format
                with pa.memory_map(file) as source:
                    try:
                        counts.append(pa.ipc.open_stream(source).read_all().num_rows)
                    except pa.ArrowInvalid:
                        counts.append(pa.ipc.open_file(file).read_all().num_rows)
        return counts

    def _load_saved(self) -> Any:
        if self._saved is None:
            import datasets

            self._saved = self._guard(lambda: datasets.load_from_disk(self.path))
        return self._saved

    def _guard(self, load: Callable[[], Any]) -> Any:
        """``load()``, with what ``datasets`` raises for a dataset it cannot open as one ConfigError line."""
        try:
            return load()
        except ConfigError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as error:  # includes ConnectionError, ArrowInvalid
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"data.path={self.path} (format {self.format}): {message}") from None


def _lone_split_name(dataset: Any) -> str:
    """A lone saved ``Dataset`` is the split it was loaded as, else ``train``."""
    return str(dataset.split) if dataset.split is not None else "train"


# --------------------------------------------------------------------------------------------------
# Columns


def caption_form(features: Any, column: str, wanted: str, where: str) -> str:
    """``string`` or ``list``: the form of the caption column, checked against ``wanted``."""
    from datasets import LargeList, List, Value

    _require_column(features, column, "caption_column", where)
    feature = features[column]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        form = "string"
    elif (isinstance(feature, (List, LargeList)) and isinstance(feature.feature, Value)
          and feature.feature.dtype in ("string", "large_string")):
        form = "list"
    else:
        raise ConfigError(f"data.caption_column={column!r} of {where} holds {feature}, not captions "
                          f"(a string, or a list of strings per image)")
    if wanted != "auto" and wanted != form:
        holds = "one string per row" if form == "string" else "a list of strings per row"
        raise ConfigError(f"data.captions={wanted!r}, but column {column!r} of {where} holds {holds}; "
                          f"set data.captions={form!r} (or 'auto')")
    return form


def check_image_column(features: Any, column: str, where: str) -> None:
    """The image column must hold images (``Image``), encoded bytes, or file paths."""
    from datasets import Image as ImageFeature
    from datasets import Value

    _require_column(features, column, "image_column", where)
    feature = features[column]
    if isinstance(feature, ImageFeature):
        return
    if isinstance(feature, Value) and feature.dtype in ("binary", "large_binary", "string", "large_string"):
        return
    if isinstance(feature, dict) and set(feature) >= {"bytes"}:
        return
    raise ConfigError(f"data.image_column={column!r} of {where} holds {feature}, not images "
                      f"(an Image feature, encoded bytes, or file paths)")


def _require_column(features: Any, column: str, argument: str, where: str) -> None:
    if features is None:
        raise ConfigError(f"{where} does not say its columns (features); it cannot be checked for "
                          f"data.{argument}={column!r}")
    if column not in features:
        raise ConfigError(f"data.{argument}={column!r} is not a column of {where}; its columns: {', '.join(features)}")


def undecoded(dataset: Any, column: str) -> Any:
    """``dataset`` with its Image column left encoded (``{"bytes", "path"}``): decoded here instead."""
    from datasets import Image as ImageFeature

    if isinstance((dataset.features or {}).get(column), ImageFeature):
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def open_image_value(value: Any, decode_size: tuple[int, int] | None) -> Image.Image:
    """Decode an image column's value (``{"bytes", "path"}``, bytes, a path or a PIL image).

    Raises ``FileNotFoundError`` when the image is missing (None, or a path that does not exist).
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise FileNotFoundError("no image")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    return open_image(bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else str(value), decode_size)


def image_value_missing(value: Any) -> bool:
    if isinstance(value, dict):
        if value.get("bytes"):
            return False
        value = value.get("path")
    return value is None or (isinstance(value, str) and not Path(value).exists())


def captions_of(value: Any) -> tuple[str, ...]:
    """A caption column's value as captions: a string, or a list of strings (None: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    return tuple(c.strip() for c in value if isinstance(c, str))


# --------------------------------------------------------------------------------------------------
# Map-style: a split's rows at random


def table_records(table: Any, caption_column: str, name: str) -> list[Record]:
    """One record per row of a ``datasets.Dataset`` (its caption column only is read); the row is the id."""
    return [Record(f"{name}[{row}]", captions_of(value), row) for row, value in enumerate(table[caption_column])]


def image_identities(table: Any, image_column: str, id_column: str | None, where: str) -> list[str]:
    """What names each row's image, the same on every machine and in any row order: what chooses the
    dev split's rows (``vlm_lab/data/dev_split.py``).

    - ``id_column`` when the user names one (its values as text: an id, a URL, a file name...);
    - else the file names the image column stores (``Image`` features keep the original file's path;
      a column of paths is one), the name alone as ``coco_captions`` uses it, so a dataset converted
      from COCO-style files gets the same dev images; only when every row has one and no two rows
      share one (many converters store no names, or one name for all);
    - else a SHA-256 of the image's encoded bytes: what is stored, whoever stored it (this reads every
      image once, undecoded). A row whose image is missing is named so, and dev never wants it.

    Row numbers are not identities: they change when the dataset is rewritten, re-sharded or filtered.
    """
    if id_column is not None:
        _require_column(table.features, id_column, "dev_split.id_column", where)
        return [str(value) for value in table[id_column]]
    names = [Path(path).name if path else None for path in _stored_paths(table, image_column)]
    if all(names) and len(set(names)) == len(names):
        return names  # type: ignore[return-value]
    identities = []
    for batch in table.select_columns([image_column]).with_format("arrow").iter(batch_size=READ_BATCH):
        for value in batch.column(image_column).to_pylist():
            identities.append(_bytes_identity(value))
    return identities


def _stored_paths(table: Any, column: str) -> list[str | None]:
    """The file path each row's image column stores (``Image``: its ``path``; a string column: itself)."""
    paths: list[str | None] = []
    for batch in table.select_columns([column]).with_format("arrow").iter(batch_size=1024):
        values = batch.column(column)
        if hasattr(values.type, "get_field_index") and values.type.get_field_index("path") >= 0:
            paths += values.combine_chunks().field("path").to_pylist()
        elif str(values.type) in ("string", "large_string"):
            paths += values.to_pylist()
        else:
            paths += [None] * len(values)
    return paths


def _bytes_identity(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        value = Path(value).read_bytes() if Path(value).is_file() else None
    if not value:
        return "missing image"
    return "sha256:" + hashlib.sha256(bytes(value)).hexdigest()


class HFCaptionedImages(CaptionedImages):
    """A ``datasets.Dataset`` split as :class:`CaptionedImages`: ``records`` (:func:`table_records`)
    give the captions, the table's image column the images, read by row when drawn."""

    def __init__(self, table: Any, records: list[Record], image_column: str, name: str,
                 transform: Callable[[Image.Image], torch.Tensor], bad: BadSampleCounter,
                 decode_size: tuple[int, int] | None = None, per_caption: bool = False) -> None:
        super().__init__(records, transform, bad, decode_size, per_caption=per_caption)
        self.images = undecoded(table.select_columns([image_column]), image_column)
        self.image_column, self.name = image_column, name

    def _value(self, record_index: int) -> Any:
        # A record's id is its table row (table_records); records may be a subset (a dev split's).
        return self.images[self.records[record_index].image_id][self.image_column]

    def open_record_image(self, record_index: int) -> Image.Image:
        return open_image_value(self._value(record_index), self.decode_size)

    def image_missing(self, record_index: int) -> bool:
        return image_value_missing(self._value(record_index))

    def image_identity(self) -> str:
        # The split's Arrow files (as prepared by datasets: their names hold its fingerprint), their
        # sizes and times, and the column: equal strings, equal images in equal rows.
        files = [(c["filename"], *_size_and_time(c["filename"])) for c in self.images.cache_files]
        rows = [r.image_id for r in self.records]
        # Which rows, when not all of them in order (a split carved into train and dev).
        subset = () if rows == list(range(len(self.images))) else (hashlib.sha1(repr(rows).encode()).hexdigest(),)
        digest = hashlib.sha1(repr((self.name, self.image_column, len(self.records), files, *subset)).encode()).hexdigest()
        return f"hf_dataset {len(self.records)} rows {digest} decode_size={self.decode_size} {self.transform}"


def _size_and_time(file: str) -> tuple[int, int]:
    stat = os.stat(file)
    return stat.st_size, stat.st_mtime_ns


# --------------------------------------------------------------------------------------------------
# Streaming: an IterableDataset's shards


class HFShards:
    """The shards of a ``datasets.IterableDataset`` as a :class:`~vlm_lab.data.shards.StreamSource`.

    Shard ``i`` is ``dataset.shard(num_shards, i, contiguous=True)``: for Parquet and Arrow data,
    file ``i`` of the split. A sample's key is its shard and position (``SSSPPPPPPPPP``, digits: its
    image id is that number).
    """

    def __init__(self, dataset: Any, image_column: str, caption_column: str, name: str,
                 counts: list[int] | None, shard_names: list[str] | None = None) -> None:
        self.dataset = undecoded(dataset.select_columns([image_column, caption_column]), image_column)
        self.image_column, self.caption_column, self.name = image_column, caption_column, name
        self._counts, self._names = counts, shard_names

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards

    def shard_name(self, shard: int) -> str:
        return self._names[shard] if self._names else f"{self.name} shard {shard}"

    def counts(self) -> list[int] | None:
        return None if self._counts is None else list(self._counts)

    def read(self, shard: int, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        part = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        position = 0
        try:
            # iter(), not a for loop over the dataset: inside a loader worker the latter would split
            # the shard among the workers again (datasets' own torch integration).
            for rows in part.iter(batch_size=READ_BATCH):
                for image, caption in zip(rows[self.image_column], rows[self.caption_column]):
                    yield {"__key__": f"{shard}{position:09d}", "__url__": self.shard_name(shard),
                           "image": image, "caption": caption}
                    position += 1
        except Exception as error:  # a damaged file: what was read stands, the rest of the shard is lost
            if not on_error(error):
                raise

    def decode(self, raw: dict[str, Any], decode_size: tuple[int, int] | None,
               with_image: bool = True) -> dict[str, Any] | str:
        if image_value_missing(raw["image"]):
            return "missing image"
        offered = captions_of(raw["caption"])
        captions = [c for c in offered if c]
        if not captions:
            return "empty caption" if offered else "missing caption"
        image = None
        if with_image:
            try:
                image = open_image_value(raw["image"], decode_size)
            except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                return "undecodable image"
        return {"image": image, "captions": captions, "image_id": key_to_id(raw["__key__"]), "key": raw["__key__"]}


# --------------------------------------------------------------------------------------------------
# The data module


@register_datamodule("hf_dataset")
class HFDatasetDataModule(DevSplitServing, CaptionDataModule):
    """Image-caption pairs from a Hugging Face ``datasets`` dataset (module docstring).

    Args:
        path: a local dataset folder (or a .parquet/.arrow file), or a hub id (online only).
        format: ``auto`` (from the folder's content), ``saved``, ``parquet``, ``arrow``,
            ``imagefolder`` or ``hub``.
        image_column: the column holding the images.
        caption_column: the column holding the captions.
        captions: the caption column's form: ``string`` (one per row), ``list`` (several per image:
            evaluation uses them all) or ``auto`` (as the dataset's features say).
        train_split, val_split, test_split: the dataset's split names for training, validation and
            test (null: none).
        streaming: read the splits as ``datasets`` streams, sharded across ranks and workers.
        train_samples, val_samples, test_samples: samples per epoch of a streamed split, over all
            ranks (default: the rows of its Parquet/Arrow files).
        train_sampling: ``image`` (one random caption per image per epoch) or ``caption`` (one
            entry per caption; map-style only).
        unique_images_per_batch: training batches never hold one image twice (with ``train_sampling:
            caption``: every caption still once per epoch; map-style only; ``vlm_lab/data/unique_images.py``).
        dev_split: ``{images: N}`` sets N training images aside as the ``dev`` split (map-style only;
            chosen by :func:`image_identities`, ``id_column`` naming the column to use), ``validate:
            true`` makes a fit validate on it (``vlm_lab/data/dev_split.py``).
        cache_dir: where ``datasets`` caches what it prepares (default: its own cache).
        batch_size: training images per batch.
        eval_batch_size: validation/test images per batch (default: ``batch_size``).
        num_workers: data loader worker processes.
        worker_slots: batches each worker may have in flight in reused shared memory (0: PyTorch's
            hand-off; see ``vlm_lab/data/handoff.py``).
        shuffle_buffer: samples each streaming training worker shuffles among.
        augment: training augmentation: true (a random 90-100% crop) or a mapping of settings for timm's
            ``create_transform`` (``vlm_lab.data.transforms.Augmentation``: auto_augment, color_jitter...).
        seed: fixes each epoch's order, crops and caption draws.
    """

    def __init__(self, tokenizer: Any, image_config: ImageConfig, max_length: int,
                 path: str, format: Format = "auto",
                 image_column: str = "image", caption_column: str = "caption", captions: CaptionForm = "auto",
                 train_split: str | None = "train", val_split: str | None = "validation",
                 test_split: str | None = "test", streaming: bool = False,
                 train_samples: int | None = None, val_samples: int | None = None, test_samples: int | None = None,
                 train_sampling: Literal["image", "caption"] = "image", unique_images_per_batch: bool = False,
                 dev_split: dict[str, Any] | None = None, cache_dir: str | None = None,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 worker_slots: int = 4, shuffle_buffer: int = 1000, augment: bool | dict[str, Any] = False,
                 seed: int = 0) -> None:
        super().__init__(tokenizer, image_config, max_length, batch_size, eval_batch_size, num_workers, augment,
                         seed, worker_slots)
        if streaming and train_sampling == "caption":
            raise ConfigError("data.train_sampling=caption needs map-style data; with data.streaming=true each image "
                              "comes once per epoch with one random caption (train_sampling: image)")
        if streaming and unique_images_per_batch:
            raise ConfigError("data.unique_images_per_batch=true needs map-style data; with data.streaming=true "
                              "each image comes once per epoch anyway")
        self.dev = DevSplit.from_value(dev_split)
        if streaming and self.dev is not None:
            raise ConfigError("data.dev_split needs map-style data (data.streaming=false): a stream cannot leave "
                              "chosen rows out of its shards; write the dev rows to a split of their own instead")
        self.splits = HFSplits(path, format, cache_dir)
        self.path, self.streaming, self.train_sampling = path, streaming, train_sampling
        self.unique_images_per_batch = unique_images_per_batch
        self.image_column, self.caption_column, self.captions = image_column, caption_column, captions
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.samples = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.shuffle_buffer = shuffle_buffer
        self._opened: dict[str, Any] = {}
        self._records: dict[str, list[Record]] = {}

    def opened(self, split: str) -> Any:
        """The ``datasets`` object of one of our splits (train/val/test), opened once, columns checked."""
        if split not in self._opened:
            if split == "dev":  # carved from train (records)
                raise ConfigError("hf_dataset has no dev split: set data.dev_split, e.g. {images: 500}, to set "
                                  "training images aside for it")
            name = self.split_names[split]
            if name is None:
                raise ConfigError(f"hf_dataset has no {split} split: set data.{split}_split to one of "
                                  f"{', '.join(self.splits.names())}")
            dataset = self.splits.open(name, self.streaming)
            where = f"{self.path} ({name})"
            check_image_column(dataset.features, self.image_column, where)
            caption_form(dataset.features, self.caption_column, self.captions, where)
            self._opened[split] = dataset
        return self._opened[split]

    def dataset(self, split: str) -> Dataset:
        if self.streaming:
            rank, world_size = world_info()
            return self.stream(split, rank, world_size)
        per_caption = split == "train" and self.train_sampling == "caption"
        table = self.table_split(split)
        return HFCaptionedImages(self.opened(table), self.records(split), self.image_column, self.split_label(split),
                                 self.transform(split), self.bad_samples[self.counted_split(split)], self.decode_size,
                                 per_caption=per_caption)

    def table_split(self, split: str) -> str:
        """The split whose table holds ``split``'s rows: train's for dev (when there is a dev split)."""
        return "train" if split == "dev" and self.dev is not None else split

    def split_label(self, split: str) -> str:
        """How messages name a split: ``path:split name`` (``path:train (dev)`` for the dev split)."""
        table = self.table_split(split)
        return f"{self.path}:{self.split_names[table]}" + (" (dev)" if table != split else "")

    def records(self, split: str) -> list[Record]:
        """The records of a map-style split (its caption column is read once); with ``dev_split``,
        train's and dev's are carved from the training split's."""
        if split not in self._records:
            if self.dev is not None and split in ("train", "dev"):
                table = self.opened("train")
                records = table_records(table, self.caption_column, self.split_label("train"))
                identities = image_identities(table, self.image_column, self.dev.id_column, self.split_label("train"))
                self._records["train"], self._records["dev"] = self.dev.carve(
                    records, self.split_label("train"), identity=lambda record: identities[record.image_id])
            else:
                self._records[split] = table_records(self.opened(split), self.caption_column, self.split_label(split))
        return self._records[split]

    def source(self, split: str) -> HFShards:
        """The streamed split as a shard source."""
        dataset, name = self.opened(split), self.split_names[split]
        counts = self.splits.shard_counts(name)
        files = self.splits.data_files()[name] if counts is not None else None
        if counts is not None and len(counts) != dataset.num_shards:
            counts, files = None, None  # datasets split the files further: their counts do not apply
        return HFShards(dataset, self.image_column, self.caption_column, self.split_label(split), counts, files)

    def stream(self, split: str, rank: int, world_size: int) -> ShardStream:
        """The streamed split as process ``rank`` of ``world_size`` reads it."""
        source = self.source(split)
        samples = self.samples[split]
        if samples is None and source.counts() is None:
            raise ConfigError(f"data.path={self.path}: the rows per shard of split {self.split_names[split]!r} are "
                              f"unknown (not Parquet or Arrow files), so the epoch length is unknown; "
                              f"set data.{split}_samples")
        return ShardStream(
            [source], split, self.transform(split), self.collate(split),
            self.batch_size if split == "train" else self.eval_batch_size, self.bad_samples[split],
            rank=rank, world_size=world_size, num_workers=self.num_workers, samples_per_epoch=samples,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, decode_size=self.decode_size,
        )

    def raw_samples(self, split: str) -> Iterator[RawSample]:
        if self.streaming:
            yield from stream_raw_samples(self.source(split), self.bad_samples[split])
            return
        images = self.dataset(split)
        for row, sample in enumerate(raw_samples(images.records)):
            yield RawSample(sample.captions, sample.image_id, sample.where,
                            lambda row=row: images.open_record_image(row))

    def split_summary(self, split: str) -> dict[str, int | None]:
        if self.streaming:
            source = self.source(split)
            counts = source.counts()
            return {"images": sum(counts) if counts is not None else self.samples[split], "captions": None,
                    "shards": source.num_shards}
        records = self.records(split)
        return {"images": len(records), "captions": sum(len(r.captions) for r in records)}

