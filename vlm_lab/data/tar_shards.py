"""Webdataset tars as img2dataset writes them: shard lists, their sample counts, their samples.

img2dataset writes ``00000.tar, 00001.tar, ...`` holding ``KEY.jpg`` (the image), ``KEY.txt`` (the
caption) and ``KEY.json`` (url, sizes...), plus ``00000_stats.json`` beside each shard whose
``successes`` is the number of samples in it. The ``webdataset`` library reads the tars (local files,
``pipe:`` commands or URLs) and groups their members into samples; :class:`TarShards` makes a list of
them a source of a :class:`~vlm_lab.data.shards.ShardStream`.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from vlm_lab.data.shards import key_to_id
from vlm_lab.data.transforms import open_image
from vlm_lab.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")



def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(spec: str | list[str], field: str) -> list[str]:
    """Brace-expand a shard spec (``"cc3m/{00000..00331}.tar"`` or a list of such) and check it.

    Raises ``ConfigError`` for an empty list or local shards that do not exist.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for item in items if str(item).strip() for url in wds.shardlists.expand_urls(str(item))]
    if not urls:
        raise ConfigError(f"data.{field}: the shard list is empty; give paths such as 'shards/{{00000..00009}}.tar'")
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        raise ConfigError(f"data.{field}: {len(missing)} of {len(urls)} shard file(s) do not exist, e.g. {missing[0]}")
    return urls


def stats_path(url: str) -> Path:
    """Where img2dataset puts a shard's stats: ``00000.tar`` -> ``00000_stats.json``."""
    path = Path(url)
    stem = path.name[: -len(".tar")] if path.name.endswith(".tar") else path.stem
    return path.with_name(f"{stem}_stats.json")


def shard_sample_count(url: str) -> int | None:
    """Samples in a shard: its stats file's ``successes``, else a scan of a local tar, else None."""
    if not is_local(url):
        return None
    stats = stats_path(url)
    if stats.is_file():
        return stats_successes(stats)
    return count_tar_samples(url)


def stats_successes(stats: Path) -> int:
    """The ``successes`` of an img2dataset stats file; a one-line ConfigError naming file and field."""
    try:
        data = json.loads(stats.read_bytes())
    except ValueError as error:
        raise ConfigError(f"{stats} is not valid JSON ({error}); img2dataset stats files hold 'successes'") from None
    if not isinstance(data, dict) or "successes" not in data:
        raise ConfigError(f"{stats}: 'successes' missing; an img2dataset stats file gives the shard's sample count there")
    successes = data["successes"]
    if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
        raise ConfigError(f"{stats}: 'successes' should be a count (an integer >= 0), not {json.dumps(successes)[:60]}")
    return successes


def count_tar_samples(path: str) -> int:
    """Samples in a tar as webdataset groups them: runs of members sharing a key (headers only)."""
    count, previous = 0, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if not member.isreg() or key is None or Path(member.name).name.startswith("__"):
                    continue
                if key != previous:
                    count, previous = count + 1, key
    except (tarfile.TarError, OSError) as error:
        log.warning("counting samples in %s stopped at %d: %s", path, count, error)
    return count


class TarShards:
    """Webdataset tars (img2dataset's layout) as a :class:`~vlm_lab.data.shards.StreamSource`.

    ``urls`` is the expanded shard list (:func:`expand_shards`); the per-shard counts are read from
    the stats files (or a scan of local tars) the first time they are asked for.
    """

    def __init__(self, urls: list[str], name: str = "shards") -> None:
        self.urls, self.name = urls, name
        self._counts: list[int | None] | None = None

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def shard_name(self, shard: int) -> str:
        return self.urls[shard]

    def counts(self) -> list[int] | None:
        if self._counts is None:
            self._counts = [shard_sample_count(url) for url in self.urls]
        return None if any(c is None for c in self._counts) else list(self._counts)  # type: ignore[arg-type]

    def read(self, shard: int, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        return wds.tarfile_samples([{"url": self.urls[shard]}], handler=on_error)

    def decode(self, raw: dict[str, Any], decode_size: tuple[int, int] | None,
               with_image: bool = True) -> dict[str, Any] | str:
        return decode_sample(raw, decode_size, with_image)


def image_member(raw: dict[str, Any]) -> bytes | None:
    """The encoded image of a webdataset sample, whichever its extension."""
    return next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)


def sample_captions(raw: dict[str, Any]) -> list[str] | str:
    """A webdataset sample's captions, or the reason it has none.

    The caption is the ``.txt`` member (UTF-8; other bytes make an "undecodable caption"). A ``.json``
    member with a ``captions`` list (written by ``vlm-lab data convert --per image``) gives every
    caption of the image; a ``captions`` that is not a list of strings is a schema error
    (``ConfigError`` naming the shard, the key and the field), while a ``.json`` that is not JSON at
    all is ignored (img2dataset's metadata is optional).
    """
    if "txt" not in raw:
        return "missing caption"
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "undecodable caption"
    if not caption:
        return "empty caption"
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            meta = None  # metadata is optional: a broken one does not spoil the sample
        listed = meta.get("captions") if isinstance(meta, dict) else None
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
                raise ConfigError(f"{raw.get('__url__')}: {raw.get('__key__')}.json field 'captions' should be a "
                                  f"list of strings, not {json.dumps(listed)[:60]}")
            return [c.strip() for c in listed if c.strip()] or [caption]
    return [caption]


def decode_sample(raw: dict[str, Any], decode_size: tuple[int, int] | None = None,
                  with_image: bool = True) -> dict[str, Any] | str:
    """A webdataset sample -> ``{"image", "captions", "image_id", "key"}``, or the reason it is unusable."""
    image_bytes = image_member(raw)
    if image_bytes is None:
        return "missing image"
    captions = sample_captions(raw)
    if isinstance(captions, str):
        return captions
    image = None
    if with_image:
        try:
            image = open_image(image_bytes, decode_size)
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return "undecodable image"
    return {"image": image, "captions": captions, "image_id": key_to_id(raw["__key__"]), "key": raw["__key__"]}
