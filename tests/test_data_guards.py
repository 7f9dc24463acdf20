"""Bad data never hangs a job and is never lost silently: a source with nothing decodable stops the job with a named
error; bad captions, oversized images and truncated shards are skipped and counted; counters are cumulative."""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from blip.data.datasets import ImageTextStream, JsonSource, TrainData
from blip.data.images import ImageTooLargeError, load_image
from blip.data.skips import DatasetError, SkipCounter
from blip.data.transforms import image_transform
from blip.data.webdataset import WebDatasetSource


def jpeg(color=(200, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]], end_marker: bool = True) -> None:
    """Samples {"__key__": str, ext: bytes} as a webdataset tar (without the end-of-archive blocks if asked)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        members_end = buf.tell()
    data = buf.getvalue()
    path.write_bytes(data if end_marker else data[:members_end])


def stream(sources, batch_size=4, batches=3, **kw):
    return ImageTextStream(sources, image_transform(16), batch_size=batch_size, batches_per_epoch=batches,
                           shuffle_buffer=0, **kw)


def skipped(batches) -> Counter:
    total = Counter()
    for b in batches:
        total.update(b["skipped"])
    return total


def write_json(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(jpeg((60 * i, 100, 50)))
    return root


# ---- sources that yield nothing usable end the job -----------------------------------------------------------
def test_wrong_image_root_ends_the_job_with_a_named_error(tmp_path, photos):
    ann = write_json(tmp_path / "train.json", [{"image": f"{i}.jpg", "caption": f"photo {i}"} for i in range(4)])
    data = TrainData(stream([JsonSource(ann, tmp_path / "wrong_root")]))
    with pytest.raises(DatasetError) as err:
        next(data.iterate(epoch=0))
    msg = str(err.value)
    assert "train.json" in msg and "wrong_root" in msg and "full pass" in msg and "bad_image" in msg
    assert "no such file" in msg and "image_root" in msg


def test_a_shard_of_html_pages_ends_the_job_through_a_worker_process(tmp_path):
    html = b"<html><body>404 Not Found</body></html>"
    write_tar(tmp_path / "s-0.tar", [{"__key__": f"{i:04d}", "jpg": html, "txt": b"a cat"} for i in range(6)])
    data = TrainData(stream([WebDatasetSource(str(tmp_path / "s-0.tar"), num_samples=6)]), num_workers=1)
    with pytest.raises(DatasetError, match="HTML error page") as err:
        next(data.iterate(epoch=0))
    assert "s-0.tar" in str(err.value)


def test_consecutive_failures_limit_is_configurable(tmp_path, photos):
    entries = [{"image": f"missing_{i}.jpg", "caption": "x"} for i in range(30)]
    entries += [{"image": "0.jpg", "caption": "a good one"}]  # one decodable sample per pass: no full-pass error
    ann = write_json(tmp_path / "a.json", entries)
    assert len(list(stream([JsonSource(ann, photos)], batch_size=2, batches=2)))  # the default limit: slow but ok
    with pytest.raises(DatasetError, match="10 consecutive samples failed"):
        list(stream([JsonSource(ann, photos)], max_consecutive_failures=10))


def test_all_empty_captions_end_the_job(tmp_path, photos):
    ann = write_json(tmp_path / "a.json", [{"image": f"{i}.jpg", "caption": " ... "} for i in range(4)])
    from blip.data.text import pre_caption

    with pytest.raises(DatasetError, match="empty_text"):
        list(stream([JsonSource(ann, photos)], text_fn=pre_caption))


# ---- bad captions: counted, not fatal; malformed annotation files: named errors ----------------------------
def test_null_non_utf8_and_nul_captions_are_skipped_as_bad_text(tmp_path, photos):
    ann = write_json(tmp_path / "a.json", [{"image": "0.jpg", "caption": None}, {"image": "1.jpg", "caption": 7},
                                           {"image": "2.jpg", "caption": "a fine photo"}])
    batches = list(stream([JsonSource(ann, photos)], batch_size=2, batches=2))
    assert {t for b in batches for t in b["text"]} == {"a fine photo"}
    assert skipped(batches)["bad_text"] == 8  # 4 passes (one good sample each) over two bad entries

    write_tar(tmp_path / "s.tar", [{"__key__": "a", "jpg": jpeg(), "txt": b"caf\xe9 latte"},   # latin-1
                                   {"__key__": "b", "jpg": jpeg(), "txt": b"a\x00b"},
                                   {"__key__": "c", "jpg": jpeg(), "txt": "café".encode()}])
    batches = list(stream([WebDatasetSource(str(tmp_path / "s.tar"), num_samples=3)], batch_size=2, batches=1))
    assert batches[0]["text"] == ["café", "café"] and skipped(batches) == {"bad_text": 4}


def test_annotation_entries_without_fields_and_bad_json_are_named_errors(tmp_path):
    ann = write_json(tmp_path / "a.json", [{"image": "0.jpg", "caption": "x"}, {"image": "1.jpg", "text": "y"}])
    with pytest.raises(DatasetError, match=r"a\.json: entry 1 has \['image', 'text'\].*'caption'"):
        JsonSource(ann)
    (tmp_path / "b.json").write_text('[{"image": "0.jpg", "caption": "x"},')
    with pytest.raises(DatasetError, match=r"b\.json: not a valid JSON"):
        JsonSource(tmp_path / "b.json")


# ---- oversized images ------------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height and whose pixel data is missing: decoding it would fail as
    truncated, so a too_large verdict proves the size was checked from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_pixel_limit_skips_oversized_images_from_the_header(tmp_path, photos):
    with pytest.raises(ImageTooLargeError, match="9000x9000"):
        load_image(png_header_only(9000, 9000), max_pixels=50_000_000)
    with pytest.raises(ValueError, match="truncated"):
        load_image(png_header_only(100, 100), max_pixels=50_000_000)  # under the limit: decoded, and it is broken
    (photos / "big.png").write_bytes(png_header_only(9000, 9000))
    ann = write_json(tmp_path / "a.json", [{"image": "big.png", "caption": "huge"},
                                           {"image": "0.jpg", "caption": "ok"}])
    batches = list(stream([JsonSource(ann, photos)], batch_size=2, batches=1, max_image_pixels=50_000_000))
    assert batches[0]["text"] == ["ok", "ok"] and skipped(batches) == {"too_large": 2}


# ---- truncated shards -------------------------------------------------------------------------------------------
def test_a_shard_cut_at_a_member_boundary_reports_the_lost_samples(tmp_path):
    samples = [{"__key__": f"{i:04d}", "jpg": jpeg(), "txt": f"sample {i}".encode()} for i in range(8)]
    write_tar(tmp_path / "00000.tar", samples[:3], end_marker=False)  # 5 of 8 samples lost with the tail
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 8, "successes": 8, "failed_to_download": 0}))
    write_tar(tmp_path / "00001.tar", samples[:2], end_marker=False)  # no stats: the truncation itself is counted
    write_tar(tmp_path / "00002.tar", samples[:2])                    # complete: nothing counted
    skips = SkipCounter()
    source = WebDatasetSource(str(tmp_path / "{00000..00002}.tar"), num_samples=7)
    read = [len(list(source.iter_unit(u, skips))) for u in range(3)]
    assert read == [3, 2, 2]
    assert skips.counts == {"lost_in_shard": 5, "shard_truncated": 2}


# ---- cumulative counters, rate-limited logging -----------------------------------------------------------------
def test_skip_counts_are_cumulative_and_logging_is_rate_limited(caplog):
    now = [0.0]
    skips = SkipCounter(log_first=2, log_interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="blip.data"):
        for i in range(6):
            skips.add("bad_image", f"img{i}")
        assert skips.take() == {"bad_image": 6}
        now[0] = 11.0
        skips.add("bad_image", "img6")
        skips.add("bad_image", "img7")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["skipped sample (bad_image, #1): img0", "skipped sample (bad_image, #2): img1"]
    assert lines[2:] == ["skipped samples so far: {'bad_image': 7} (latest: bad_image: img6)"]
    assert skips.counts == {"bad_image": 8} and skips.take() == {"bad_image": 2}
