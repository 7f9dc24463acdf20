"""`blip caption-dir`: folders with unusual images, a run killed with SIGKILL and re-run, shards, batch VQA, ranks."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

import blip
from blip.caption_dir import CaptionDirJob
from blip.cli import main
from blip.convert.blip import save_safetensors
from blip.predictor import Predictor
from tiny_weights import randomize

REPO = Path(__file__).resolve().parents[1]
UNDECODABLE = {"empty.jpg", "not_an_image.jpg", "truncated.jpg"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {}
    for task in ("caption", "vqa"):
        model = blip.create_model("blip_tiny", task)
        randomize(model, seed=1)
        out[task] = save_safetensors(model, d / f"{task}.safetensors")
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def caption_dir(*args):
    return main(["caption-dir", *map(str, args), "--workers", "1", "--no-progress"])


def test_folder_with_unusual_images(tmp_path, fixtures, models, capsys, one_thread):
    images = fixtures / "images"
    out = tmp_path / "caps.jsonl"
    assert caption_dir(images, "--out", out, "--model", models["caption"], "--batch-size", "4",
                       "--max-new-tokens", "6") == 0
    assert "captioned 12, skipped 3" in capsys.readouterr().out
    errors = read_jsonl(tmp_path / "caps.errors.jsonl")
    assert {Path(e["path"]).name for e in errors} == UNDECODABLE and all(e["reason"] for e in errors)
    rows = read_jsonl(out)
    every = sorted(str(p) for p in images.rglob("*") if p.is_file() and p.name not in UNDECODABLE)
    assert sorted(r["path"] for r in rows) == every
    assert {r["model"] for r in rows} == {str(models["caption"])} and rows[0]["settings"]["num_beams"] == 3
    # each caption is what the model's own API gives for that file alone ("a picture of " is 4 prompt tokens)
    model = blip.load(models["caption"])
    for row in rows[:3]:
        assert row["caption"] == model.caption(row["path"], num_beams=3, max_new_tokens=6, min_new_tokens=1)[0]

    # a second run finds everything done, tries the bad files again and rewrites the errors file
    assert caption_dir(images, "--out", out, "--model", models["caption"], "--batch-size", "4",
                       "--max-new-tokens", "6") == 0
    assert "captioned 0, skipped 3 (unreadable" in capsys.readouterr().out
    assert read_jsonl(out) == rows and len(read_jsonl(tmp_path / "caps.errors.jsonl")) == 3
    # other settings into the same output are refused (one line, exit 2)
    assert caption_dir(images, "--out", out, "--model", models["caption"], "--beams", "2") == 2
    assert "re-run with the same options" in capsys.readouterr().err


def test_killed_run_resumes_exactly_once(tmp_path, fixtures, models, one_thread):
    src = tmp_path / "photos"
    names = ["cat.jpg", "rocket.jpg", "coffee.jpg", "astronaut.jpg"]
    for i in range(64):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        os.symlink(fixtures / "images" / names[i % 4], src / f"d{i % 3}" / f"{i:03d}.jpg")
    (src / "notes.txt").write_text("not an image extension: not listed")
    args = [str(src), "--model", str(models["caption"]), "--batch-size", "4", "--chunk-size", "4",
            "--max-new-tokens", "6"]
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "blip.cli", "caption-dir", *args, "--out", str(out), "--workers",
                             "1", "--no-progress"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 4):
            assert proc.poll() is None, "caption-dir ended before its first chunk"
            assert time.monotonic() < deadline, "no first chunk within 120 s"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    lines_at_kill = out.read_bytes().count(b"\n")
    assert 4 <= lines_at_kill < 64, "the kill came too late to test resuming"

    assert caption_dir(*args, "--out", out) == 0
    assert caption_dir(*args, "--out", tmp_path / "whole.jsonl") == 0
    resumed, whole = read_jsonl(out), read_jsonl(tmp_path / "whole.jsonl")
    assert len(resumed) == 64 and len({r["path"] for r in resumed}) == 64
    assert sorted(resumed, key=lambda r: r["path"]) == sorted(whole, key=lambda r: r["path"])


def _shard(path: Path, samples: list[tuple[str, str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, ext, data in samples:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shards_and_batch_vqa(tmp_path, fixtures, models, capsys, one_thread):
    images = fixtures / "images"
    good = {n: (images / f"{n}.jpg").read_bytes() for n in ("cat", "rocket", "coffee")}
    _shard(tmp_path / "shard-0.tar", [("a0", "jpg", good["cat"]), ("a1", "jpg", good["rocket"]),
                                      ("a2", "jpg", (images / "unusual" / "truncated.jpg").read_bytes())])
    _shard(tmp_path / "shard-1.tar", [("b0", "jpg", good["coffee"]), ("b1", "txt", b"a caption, no image")])
    out = tmp_path / "vqa.jsonl"
    assert caption_dir(str(tmp_path / "shard-{0..1}.tar"), "--out", out, "--model", models["vqa"],
                       "--question", "what is this?", "--batch-size", "2", "--errors", tmp_path / "bad.jsonl") == 0
    rows = read_jsonl(out)
    assert sorted((Path(r["shard"]).name, r["key"]) for r in rows) == [
        ("shard-0.tar", "a0"), ("shard-0.tar", "a1"), ("shard-1.tar", "b0")]
    assert all(r["question"] == "what is this?" and isinstance(r["answer"], str) for r in rows)
    model = blip.load(models["vqa"])
    a0 = next(r for r in rows if r["key"] == "a0")
    assert a0["answer"] == model.answer(images / "cat.jpg", "what is this?")[0]  # BLIP's defaults
    assert sorted(e["key"] for e in read_jsonl(tmp_path / "bad.jsonl")) == ["a2", "b1"]
    assert "captioned 3, skipped 2" in capsys.readouterr().out
    # a caption model cannot answer: one line, exit 2
    assert caption_dir(tmp_path, "--out", tmp_path / "x.jsonl", "--model", models["caption"], "--question", "q") == 2
    assert "cannot answer" in capsys.readouterr().err


def test_ranks_share_the_work_and_merge_into_one_output(tmp_path, fixtures, models, one_thread):
    """Two ranks as threads (a barrier and a sum stand in for torch.distributed): each captions its share, rank 0
    merges; the result equals a single-process run."""
    images = fixtures / "images"
    predictor = Predictor(blip.load(models["caption"]), name="tiny")
    barrier, totals, lock = threading.Barrier(2, timeout=60), [], threading.Lock()

    def all_reduce(counts):
        with lock:
            totals.append(counts)
        barrier.wait()
        return {k: sum(c[k] for c in totals) for k in counts}

    results = {}

    def rank(r):
        job = CaptionDirJob(predictor, batch_size=3, num_workers=0, progress=False)
        results[r] = job.run(str(images), tmp_path / "ranks.jsonl", rank=r, world_size=2, barrier=barrier.wait,
                             all_reduce=all_reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == results[1] == {"captioned": 12, "skipped": 3, "already_done": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.errors.jsonl", "ranks.jsonl"]  # parts merged
    single = CaptionDirJob(predictor, batch_size=3, num_workers=0, progress=False)
    single.run(str(images), tmp_path / "single.jsonl")
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(read_jsonl(tmp_path / "ranks.jsonl"), key=key) == sorted(read_jsonl(tmp_path / "single.jsonl"),
                                                                            key=key)
    assert len(read_jsonl(tmp_path / "ranks.errors.jsonl")) == 3


def test_file_list(tmp_path, fixtures, models, capsys, one_thread):
    images = fixtures / "images"
    (tmp_path / "cat.jpg").symlink_to(images / "cat.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\ncat.jpg\n{images / 'rocket.jpg'}\n\ncat.jpg\n{images / 'missing.jpg'}\n")
    assert caption_dir(listing, "--out", tmp_path / "l.jsonl", "--model", models["caption"]) == 0
    assert sorted(r["path"] for r in read_jsonl(tmp_path / "l.jsonl")) == sorted(
        [str(tmp_path / "cat.jpg"), str(images / "rocket.jpg")])   # relative to the list; a repeat counted once
    assert [e["path"] for e in read_jsonl(tmp_path / "l.errors.jsonl")] == [str(images / "missing.jpg")]
    assert "captioned 2, skipped 1" in capsys.readouterr().out


def test_seeded_sampling_does_not_depend_on_batching(tmp_path, fixtures, models, one_thread):
    images = fixtures / "images"
    runs = {}
    for name, batch, seed in (("a", "2", "3"), ("b", "5", "3"), ("c", "5", "4")):
        assert caption_dir(images, "--out", tmp_path / f"{name}.jsonl", "--model", models["caption"], "--sample",
                           "--seed", seed, "--batch-size", batch, "--max-new-tokens", "6") == 0
        runs[name] = {r["path"]: r["caption"] for r in read_jsonl(tmp_path / f"{name}.jsonl")}
    assert runs["a"] == runs["b"] != runs["c"]
