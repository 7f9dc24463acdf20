"""Webdataset shards as a data source: local paths, `pipe:` commands and http(s) URLs, as img2dataset writes them.

Shards are the unit of sharding across ranks/workers; reading one yields raw samples (undecoded bytes). Opening a
URL and walking the tar are webdataset's (`gopen`, `tar_file_iterator`, `group_by_keys`); errors in a shard (missing
file, truncated tar) end that shard, are counted and logged, and never stop the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import braceexpand
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from blip.data.skips import SkipCounter

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "caption")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """`"a-{000..009}.tar"`, `"x.tar::y.tar"` or a list of such → a flat list of shard URLs."""
    if isinstance(urls, str):
        urls = urls.split("::")
    return [u for spec in urls for u in braceexpand.braceexpand(spec)]


def stable_id(text: str) -> int:
    """A 63-bit integer id for a string, stable across processes and runs (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def iter_tar_samples(url: str, skips: SkipCounter) -> Iterator[dict]:
    """Samples of one shard as `{"__key__": str, "jpg": bytes, ...}`; a broken shard stops early and is counted."""

    def on_error(exc: Exception) -> bool:
        skips.add("shard_error", f"{url}: {exc!r}")
        return False  # a tar stream cannot be resynchronised after an error: go on with the next shard

    try:
        stream = wds.gopen(url)
    except Exception as exc:  # noqa: BLE001 - unreadable shard: counted, logged, skipped
        on_error(exc)
        return
    try:
        files = (dict(f, __url__=url) for f in tar_file_iterator(stream, handler=on_error))
        try:
            yield from group_by_keys(files, handler=on_error)
        except Exception as exc:  # noqa: BLE001 - e.g. tarfile.ReadError raised while opening the archive
            on_error(exc)
    finally:
        stream.close()


@dataclass
class WebDatasetSource:
    """Image–text pairs from webdataset shards. `num_samples` sizes the epoch (img2dataset prints it in its stats)."""

    urls: str | Sequence[str]
    num_samples: int
    image_keys: Sequence[str] = IMAGE_EXTENSIONS
    text_keys: Sequence[str] = TEXT_EXTENSIONS
    shards: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.shards = expand_urls(self.urls)
        if not self.shards:
            raise ValueError(f"no shards in {self.urls!r}")

    @property
    def num_units(self) -> int:
        return len(self.shards)

    def iter_unit(self, index: int, skips: SkipCounter) -> Iterator[dict]:
        """Raw samples `{"key", "image": bytes, "text": str, "image_id": int}` of shard `index`."""
        url = self.shards[index]
        for sample in iter_tar_samples(url, skips):
            key = sample.get("__key__", "?")
            image = next((sample[k] for k in self.image_keys if k in sample), None)
            text = next((sample[k] for k in self.text_keys if k in sample), None)
            if image is None or text is None:
                skips.add("missing_field", f"{url}:{key} has {sorted(k for k in sample if not k.startswith('__'))}")
                continue
            image_id = None
            if "json" in sample:
                try:
                    image_id = json.loads(sample["json"]).get("image_id")
                except (ValueError, AttributeError):
                    pass
            if not isinstance(image_id, int):
                image_id = stable_id(f"{url}:{key}")
            yield {"key": f"{url}:{key}", "image": image, "text": text.decode("utf-8", "replace"),
                   "image_id": image_id}
