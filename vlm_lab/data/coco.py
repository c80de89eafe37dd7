"""COCO captions, and any dataset in its annotation format (Flickr8k/30k, Karpathy splits).

The official layout under ``data.root``::

    train2017/*.jpg   val2017/*.jpg   annotations/captions_train2017.json   annotations/captions_val2017.json

or any captions file given as ``data.{train,val,test}_ann`` with its image folder
``data.{train,val,test}_images``. A captions file is JSON with ``images`` (``id``, ``file_name``) and
``annotations`` (``image_id``, ``caption``); other fields are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal


from vlm_lab.data.base import CaptionDataModule
from vlm_lab.data.dev_split import DevSplit, DevSplitServing
from vlm_lab.data.records import CaptionedImages, RawSample, Record, raw_samples
from vlm_lab.errors import ConfigError
from vlm_lab.registry import register_datamodule
from vlm_lab.towers.base import ImageConfig

OFFICIAL = {
    "train": ("train2017", "annotations/captions_train2017.json"),
    "val": ("val2017", "annotations/captions_val2017.json"),
}


def read_coco_captions(ann_file: str | Path, images_dir: str | Path) -> list[Record]:
    """One record per image with at least one caption, in the file's image order.

    Captions keep the file's annotation order. Raises ``ConfigError`` naming the file and the field
    when the JSON is not a captions file (a field missing or of the wrong type). Dirty entries are
    kept, to be skipped and counted when drawn: an image entry whose ``id`` an earlier one has (the
    first wins), captions that are empty or not UTF-8. Annotations with the same ``id`` are all kept
    (they are told apart by their captions, and COCO's annotation ids are not used); very long captions
    are kept and cut by the tokenizer at ``model.tokenizer.max_length``.
    """
    ann_file = Path(ann_file)
    try:
        # Bytes that are not UTF-8 spoil only the captions they sit in (records.caption_problem).
        data = json.loads(ann_file.read_bytes().decode("utf-8", errors="surrogateescape"))
    except ValueError as error:
        raise ConfigError(f"{ann_file} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{ann_file}: expected a JSON object with 'images' and 'annotations'")
    for field in ("images", "annotations"):
        if not isinstance(data.get(field), list):
            problem = "has no" if field not in data else "has a non-list"
            raise ConfigError(f"{ann_file} {problem} '{field}' field; a COCO captions file has 'images' and 'annotations'")
    captions: dict[int, list[str]] = {}
    for i, annotation in enumerate(data["annotations"]):
        _require(annotation, {"image_id": int, "caption": str}, ann_file, f"annotations[{i}]")
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    records, seen = [], set()
    for i, image in enumerate(data["images"]):
        _require(image, {"id": int, "file_name": str}, ann_file, f"images[{i}]")
        if image["id"] in captions:
            records.append(Record(str(Path(images_dir) / image["file_name"]), tuple(captions[image["id"]]),
                                  image["id"], duplicate=image["id"] in seen))
            seen.add(image["id"])
    if not records:
        raise ConfigError(f"{ann_file}: no image has a caption (no 'annotations' entry matches an 'images' id)")
    return records


def _require(entry: Any, fields: dict[str, type], ann_file: Path, where: str) -> None:
    """``entry`` is a JSON object with each of ``fields`` of its type, else a one-line ConfigError."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{ann_file}: {where} should be an object with {', '.join(map(repr, fields))}, "
                          f"not {json.dumps(entry)[:60]}")
    for field, kind in fields.items():
        if field not in entry:
            raise ConfigError(f"{ann_file}: {where} has no '{field}' field")
        value = entry[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            name = {int: "an integer", str: "a string"}[kind]
            raise ConfigError(f"{ann_file}: {where}.{field} should be {name}, not {json.dumps(value)[:60]}")


@register_datamodule("coco_captions")
class CocoCaptionsDataModule(DevSplitServing, CaptionDataModule):
    """Image-caption pairs in the COCO captions format.

    Training has one entry per image whose caption is drawn at random each epoch
    (``train_sampling: image``), or one entry per caption (``train_sampling: caption``, so an epoch
    sees every caption, and a batch may hold two captions of one image). Validation and test give each
    image once with all its captions, for multi-caption retrieval. Images are prepared as the vision
    tower says (``ImageConfig``); ``augment`` adds a random 90-100% crop in training.

    Args:
        root: a folder in the official COCO 2017 layout (train2017/, val2017/, annotations/).
        train_ann, val_ann, test_ann: captions JSON files (override ``root`` for their split).
        train_images, val_images, test_images: the image folders of those files.
        train_sampling: ``image`` (one random caption per image per epoch) or ``caption``.
        dev_split: ``{images: N}`` sets N training images aside as the ``dev`` split (chosen by a hash
            of their file names); ``validate: true`` makes it a fit's validation split
            (``vlm_lab/data/dev_split.py``).
        unique_images_per_batch: training batches never hold one image twice (with ``train_sampling:
            caption``: every caption still once per epoch; ``vlm_lab/data/unique_images.py``).
        batch_size: training images per batch.
        eval_batch_size: validation/test images per batch (default: ``batch_size``).
        num_workers: data loader worker processes.
        worker_slots: batches each worker may have in flight in reused shared memory (0: PyTorch's
            hand-off, fresh shared memory per batch; see ``vlm_lab/data/handoff.py``).
        augment: training augmentation: true (a random 90-100% crop) or a mapping of settings for timm's
            ``create_transform`` (``vlm_lab.data.transforms.Augmentation``: auto_augment, color_jitter...).
        seed: fixes each epoch's order and the seeds of its loader workers (caption draws and crops
            made in workers; those made with ``num_workers: 0`` follow the experiment's ``seed``).
    """

    def __init__(self, tokenizer: Any, image_config: ImageConfig, max_length: int,
                 root: str | None = None,
                 train_ann: str | None = None, train_images: str | None = None,
                 val_ann: str | None = None, val_images: str | None = None,
                 test_ann: str | None = None, test_images: str | None = None,
                 train_sampling: Literal["image", "caption"] = "image", unique_images_per_batch: bool = False,
                 dev_split: dict[str, Any] | None = None,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 worker_slots: int = 4,
                 augment: bool | dict[str, Any] = False, seed: int = 0) -> None:
        super().__init__(tokenizer, image_config, max_length, batch_size, eval_batch_size, num_workers, augment,
                         seed, worker_slots)
        self.train_sampling, self.unique_images_per_batch = train_sampling, unique_images_per_batch
        self.dev = DevSplit.from_value(dev_split)
        if self.dev is not None and self.dev.id_column is not None:
            raise ConfigError("data.dev_split.id_column is an hf_dataset setting; coco_captions chooses dev images "
                              "by file name")
        given = {"train": (train_ann, train_images), "val": (val_ann, val_images), "test": (test_ann, test_images)}
        self.sources = {split: _resolve(split, root, ann, images) for split, (ann, images) in given.items()}
        if not any(self.sources.values()):
            raise ConfigError("coco_captions needs data.root (the COCO 2017 layout) or data.train_ann/val_ann "
                              "with data.train_images/val_images")
        self._records: dict[str, list[Record]] = {}

    def records(self, split: str) -> list[Record]:
        """The split's records (its captions file is read once); ``dev`` is carved from train's."""
        if split not in self._records:
            if split == "dev" and self.dev is None:
                raise ConfigError("coco_captions has no dev split: set data.dev_split, e.g. {images: 500}, to set "
                                  "training images aside for it")
            source = self.sources["train" if split == "dev" else split]
            if source is None:
                raise ConfigError(f"coco_captions has no {split} split: set data.{split}_ann and data.{split}_images"
                                  + (" (COCO 2017 has no test captions)" if split == "test" else "")
                                  + (" (the dev split is carved from train)" if split == "dev" else ""))
            if split in ("train", "dev") and self.dev is not None:
                self._records["train"], self._records["dev"] = self.dev.carve(read_coco_captions(*source), source[0])
            else:
                self._records[split] = read_coco_captions(*source)
        return self._records[split]

    def dataset(self, split: str) -> CaptionedImages:
        per_caption = split == "train" and self.train_sampling == "caption"
        return CaptionedImages(self.records(split), self.transform(split), self.bad_samples[self.counted_split(split)],
                               self.decode_size, per_caption=per_caption)

    def raw_samples(self, split: str) -> Iterator[RawSample]:
        return raw_samples(self.records(split))

    def split_summary(self, split: str) -> dict[str, int | None]:
        records = self.records(split)
        return {"images": len(records), "captions": sum(len(r.captions) for r in records)}


def _resolve(split: str, root: str | None, ann: str | None, images: str | None) -> tuple[str, str] | None:
    """(captions file, image folder) of a split, checked to exist, or None when the split is absent."""
    if ann is not None or images is not None:
        if ann is None or images is None:
            given, missing = ("ann", "images") if ann is not None else ("images", "ann")
            raise ConfigError(f"data.{split}_{given} is set but data.{split}_{missing} is not; give both")
        if not Path(ann).is_file():
            raise ConfigError(f"data.{split}_ann: no captions file at {ann}")
        if not Path(images).is_dir():
            raise ConfigError(f"data.{split}_images: no image folder at {images}")
        return ann, images
    if root is None or split not in OFFICIAL:
        return None
    if not Path(root).is_dir():
        raise ConfigError(f"data.root: no folder at {root}")
    folder, ann_file = (Path(root) / part for part in OFFICIAL[split])
    for expected in (ann_file, folder):
        if not expected.exists():
            raise ConfigError(f"data.root={root} is not in the COCO 2017 layout: {expected} does not exist "
                              f"(expected train2017/, val2017/, annotations/captions_{{train,val}}2017.json)")
    return str(ann_file), str(folder)
