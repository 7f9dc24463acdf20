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
from pathlib import Path

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


class _TailReader:
    """Passes reads through and keeps the last 512 bytes seen: a complete tar ends with zero blocks, one cut at a
    member boundary does not (tarfile then ends silently, as if the archive were complete)."""

    def __init__(self, stream) -> None:
        self.stream, self.tail = stream, b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.tail = (self.tail + data)[-512:]
        return data

    def drained_tail(self, limit: int = 1 << 16) -> bytes | None:
        """The last 512 bytes of the stream after reading what tarfile left (its end padding); None if more than
        `limit` bytes remain (tarfile stopped at an end marker, not at the end of the stream)."""
        rest = self.stream.read(limit)
        if rest and self.stream.read(1):
            return None
        return (self.tail + rest)[-512:]

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def expected_count(url: str) -> int | None:
    """The number of samples img2dataset wrote into a local shard (`{stem}_stats.json` "successes"), if known."""
    stats = Path(url).with_name(Path(url).stem + "_stats.json")
    if "://" in url or url.startswith("pipe:") or not stats.is_file():
        return None
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def iter_tar_samples(url: str, skips: SkipCounter) -> Iterator[dict]:
    """Samples of one shard as `{"__key__": str, "jpg": bytes, ...}`. A broken shard stops early and is counted
    (shard_error); a plain tar without its end-of-archive blocks is counted as shard_truncated, and where the
    shard's sample count is known (img2dataset's `_stats.json`) the samples it lost are counted (lost_in_shard)."""
    failed = []

    def on_error(exc: Exception) -> bool:
        failed.append(exc)
        skips.add("shard_error", f"{url}: {exc!r}")
        return False  # a tar stream cannot be resynchronised after an error: go on with the next shard

    try:
        stream = _TailReader(wds.gopen(url))
    except Exception as exc:  # noqa: BLE001 - unreadable shard: counted, logged, skipped
        on_error(exc)
        return
    seen = 0
    try:
        files = (dict(f, __url__=url) for f in tar_file_iterator(stream, handler=on_error))
        try:
            for sample in group_by_keys(files, handler=on_error):
                seen += 1
                yield sample
        except Exception as exc:  # noqa: BLE001 - e.g. tarfile.ReadError raised while opening the archive
            on_error(exc)
        if not failed and url.endswith(".tar") and (tail := stream.drained_tail()) is not None and any(tail):
            failed.append("truncated")
            skips.add("shard_truncated", f"{url}: the tar ends after {seen} samples without its end-of-archive "
                      "blocks (cut off at a member boundary); re-download or rewrite the shard")
    finally:
        stream.close()
    expected = expected_count(url)
    if expected is not None and seen < expected:
        skips.add("lost_in_shard", f"{url}: {seen} of the {expected} samples its _stats.json lists could be read",
                  n=expected - seen)


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
    def name(self) -> str:
        return str(self.urls) if isinstance(self.urls, str) else f"{self.shards[0]} (+{len(self.shards) - 1} shards)"

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
            yield {"key": f"{url}:{key}", "image": image, "text": _utf8_or_bytes(text), "image_id": image_id}


def _utf8_or_bytes(text: bytes) -> str | bytes:
    """The caption as str; bytes that are not UTF-8 stay bytes, for the decoder to skip and count (bad_text)."""
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        return text
