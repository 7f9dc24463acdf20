"""The training data stream: shards and JSON lists, determinism, rank/worker splits, resume, bad samples."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from blip.data.datasets import ImageTextStream, JsonSource, TrainData, eval_batches
from blip.data.mixing import mixed
from blip.data.skips import SkipCounter
from blip.data.synthetic import caption_for, ensure_synthetic_shards, parse_attributes
from blip.data.transforms import image_transform
from blip.data.webdataset import WebDatasetSource, expand_urls
from conftest import FIXTURES



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_synthetic_shards(tmp_path_factory.mktemp("cache"), num_train=240, num_val=40, shard_size=40,
                                   image_size=32)


def stream(sources, batch_size=8, batches=10, **kw):
    return ImageTextStream(sources, image_transform(16, train=kw.pop("train", False)), batch_size=batch_size,
                           batches_per_epoch=batches, **kw)


def texts(batches):
    return [t for b in batches for t in b["text"]]


def ids(batches):
    return [k for b in batches for k in b["key"]]


def test_synthetic_shards_are_cached_and_captions_parse(shards, tmp_path_factory):
    again = ensure_synthetic_shards(shards.root.parent, num_train=240, num_val=40, shard_size=40, image_size=32)
    assert again.train_urls == shards.train_urls and len(shards.train_urls) == 6
    attrs = {"size": "large", "color": "blue", "shape": "square", "position": "bottom right"}
    assert parse_attributes(caption_for(attrs)) == attrs
    assert parse_attributes("a red blue thing") == {"size": None, "color": None, "shape": None, "position": None}


def test_epoch_order_is_a_function_of_seed_and_epoch(shards):
    src = [WebDatasetSource(shards.train_urls, num_samples=240)]
    a = stream(src, seed=1, shuffle_buffer=50)
    b = stream(src, seed=1, shuffle_buffer=50)
    a.set_position(0)
    b.set_position(0)
    first, second = list(a), list(b)
    assert ids(first) == ids(second)
    assert torch.equal(first[3]["pixel_values"], second[3]["pixel_values"])
    b.set_position(1)
    assert ids(list(b)) != ids(first)  # a new epoch reshuffles
    assert len(set(ids(first))) == 80  # 10 batches of 8 distinct samples


def test_ranks_and_workers_read_disjoint_samples(shards):
    src = [WebDatasetSource(shards.train_urls, num_samples=240)]
    seen = []
    for rank in range(2):
        data = TrainData(stream(src, batches=6, rank=rank, world_size=2, seed=3), num_workers=2)
        seen.append(ids(list(data.iterate(epoch=0))))
    assert len(seen[0]) == len(seen[1]) == 48
    assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_at_the_exact_next_batch(shards, num_workers):
    src = [WebDatasetSource(shards.train_urls, num_samples=240)]
    data = TrainData(stream(src, batches=9, seed=5, train=True), num_workers=num_workers)
    full = list(data.iterate(epoch=2))
    resumed = list(data.iterate(epoch=2, start_batch=5))
    assert [b["batch_index"] for b in full] == list(range(9))
    assert [b["batch_index"] for b in resumed] == [5, 6, 7, 8]
    for got, want in zip(resumed, full[5:]):
        assert got["text"] == want["text"]
        assert torch.equal(got["pixel_values"], want["pixel_values"])  # same augmentation draws too


def _corrupt_shard(path: Path, good: Path) -> None:
    """Copy `good` and break one sample's JPEG; append a sample with no image."""
    with tarfile.open(good) as src, tarfile.open(path, "w") as dst:
        for i, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if i == 3 and member.name.endswith(".jpg"):
                data = data[:40]  # truncated JPEG
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
        text = b"a caption without an image"
        info = tarfile.TarInfo("zzz_orphan.txt")
        info.size = len(text)
        dst.addfile(info, io.BytesIO(text))


def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path, caplog):
    bad = tmp_path / "bad-000000.tar"
    _corrupt_shard(bad, Path(shards.train_urls[0]))
    truncated = tmp_path / "bad-000001.tar"
    truncated.write_bytes(Path(shards.train_urls[1]).read_bytes()[:5000])  # a shard cut mid-file
    missing = str(tmp_path / "does-not-exist.tar")
    src = [WebDatasetSource([str(bad), str(truncated), missing], num_samples=60)]
    batches = list(TrainData(stream(src, batch_size=10, batches=6)).iterate(epoch=0))
    assert all(len(b["text"]) == 10 for b in batches)  # batches stay full
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped["bad_image"] >= 1 and skipped["missing_field"] >= 1 and skipped["shard_error"] >= 2
    assert "skipped sample (bad_image" in caplog.text


def test_json_annotations_and_weighted_mixing(tmp_path):
    photos = sorted((FIXTURES / "images").glob("*.jpg"))[:2]
    assert photos, "tests/fixtures/images must hold test photos"
    ann_a = [{"image": p.name, "caption": "A photo, of things!", "image_id": f"coco_{i}"} for i, p in enumerate(photos)]
    ann_b = [{"image": photos[0].name, "caption": ["first caption", "second caption"]}]
    ann_b.append({"image": "missing.jpg", "caption": "gone"})
    (tmp_path / "a.json").write_text(json.dumps(ann_a))
    (tmp_path / "b.json").write_text(json.dumps(ann_b))
    a = JsonSource(tmp_path / "a.json", photos[0].parent)
    b = JsonSource(tmp_path / "b.json", photos[0].parent)
    assert (a.num_samples, b.num_samples) == (2, 3)
    from blip.data.text import pre_caption

    s = stream([a, b], batch_size=4, batches=25, weights=[3, 1], text_fn=pre_caption)
    batches = list(s)
    got = Counter(texts(batches))
    assert "a photo, of things" in got  # BLIP caption cleaning applied
    from_a = got["a photo, of things"] / sum(got.values())
    assert 0.6 < from_a < 0.9  # ~3:1 mixing
    same = [b["image_ids"][i].item() for b in batches for i, t in enumerate(b["text"]) if t.endswith("caption")]
    assert len(set(same)) == 1  # captions of one image share its id
    assert sum(sum(b["skipped"].values()) for b in batches) >= 1  # missing.jpg


def test_mixing_draws_in_proportion():
    def endless(tag):
        while True:
            yield {"tag": tag}

    import numpy as np

    draws = [next(g)["tag"] for g in [mixed([endless("a"), endless("b")], [1, 4], np.random.default_rng(0))]
             for _ in range(4000)]
    assert abs(draws.count("b") / 4000 - 0.8) < 0.03


def test_url_forms_and_pipe_reading(shards):
    assert expand_urls("x-{000..002}.tar::y.tar") == ["x-000.tar", "x-001.tar", "x-002.tar", "y.tar"]
    src = WebDatasetSource([f"pipe:cat {shards.train_urls[0]}"], num_samples=40)
    samples = list(src.iter_unit(0, SkipCounter()))
    assert len(samples) == 40 and all(isinstance(s["image"], bytes) for s in samples)
    assert all(v is not None for v in parse_attributes(samples[0]["text"]).values())
    val = list(eval_batches(WebDatasetSource(shards.val_urls, num_samples=40), image_transform(16), 16))
    assert [len(b["text"]) for b in val] == [16, 16, 8]


def test_batched_keeps_order_and_a_short_last_batch():
    from blip.data.datasets import batched

    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batched(iter(()), 3)) == []
