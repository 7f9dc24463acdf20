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


# ---- long runs: Ctrl-C, odd file names, a second process, unreadable folders, resuming -------------------------
# Runs the CLI with Predictor.caption patched: on call HOOK_AT the hook named by HOOK runs ("interrupt": Ctrl-C, which
# a terminal sends to the whole process group; "hold": mark HOOK_FILE and wait, keeping the job alive).
CLI_WITH_HOOK = """
import os, signal, sys, time
from blip.cli import main
from blip.predictor import Predictor
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal: a background job inherits SIGINT ignored
real, calls = Predictor.caption, [0]
def caption(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["HOOK_AT"]):
        if os.environ["HOOK"] == "interrupt":
            os.killpg(os.getpgid(0), signal.SIGINT)
        else:
            open(os.environ["HOOK_FILE"], "w").close()
            time.sleep(120)
    return real(self, *args, **kwargs)
Predictor.caption = caption
sys.exit(main(sys.argv[1:]))
"""


def _photos(root: Path, fixtures: Path, n: int) -> Path:
    """``n`` images (links to the fixture photos) in three sub-folders of ``root``."""
    names = ["cat.jpg", "rocket.jpg", "coffee.jpg", "astronaut.jpg"]
    for i in range(n):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        os.symlink(fixtures / "images" / names[i % 4], root / f"d{i % 3}" / f"{i:03d}.jpg")
    return root


def _cli_with_hook(args: list, hook: str, at: int, hook_file: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "HOOK": hook, "HOOK_AT": str(at), "HOOK_FILE": str(hook_file)}
    return subprocess.Popen([sys.executable, "-c", CLI_WITH_HOOK, "caption-dir", *map(str, args), "--workers", "1",
                             "--no-progress"], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_ctrl_c_saves_what_was_done_in_one_line_and_the_rerun_finishes(tmp_path, fixtures, models, one_thread):
    src = _photos(tmp_path / "photos", fixtures, 24)
    out = tmp_path / "caps.jsonl"
    args = [src, "--out", out, "--model", models["caption"], "--batch-size", "4", "--max-new-tokens", "6"]
    proc = _cli_with_hook([*args, "--chunk-size", "1000"], "interrupt", at=3)   # Ctrl-C inside the third batch
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == [f"interrupted: 8 saved to {out}, re-run the same command to resume"]
    assert len(read_jsonl(out)) == 8   # the two finished batches, though a chunk is 1000 images
    assert caption_dir(*args, "--out", out) == 0
    rows = read_jsonl(out)
    assert len(rows) == 24 and len({r["path"] for r in rows}) == 24


def test_results_are_flushed_every_few_seconds_whatever_the_chunk_size(tmp_path, fixtures, models, one_thread):
    from blip.caption_dir import Outputs
    predictor = Predictor(blip.load(models["caption"]), name="tiny")
    appended = []
    real_flush = CaptionDirJob._flush

    def flush(files: Outputs, rows, bad, counts):
        appended.append(len(rows))
        return real_flush(files, rows, bad, counts)

    clock = iter(range(0, 10_000, 20))   # every batch takes 20 s on this clock
    job = CaptionDirJob(predictor, batch_size=2, chunk_size=1000, flush_seconds=30, num_workers=0, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CaptionDirJob, "_flush", staticmethod(flush))
        patch.setattr("blip.caption_dir.monotonic", lambda: next(clock))
        job.run(str(_photos(tmp_path / "photos", fixtures, 8)), tmp_path / "caps.jsonl")
    assert appended == [4, 4, 0]   # every second batch is 40 s after the last write; the last flush has nothing


def test_a_file_name_that_is_not_utf8_is_captioned_and_resumed(tmp_path, fixtures, models, capsys, one_thread):
    src = tmp_path / "photos"
    src.mkdir()
    odd = os.path.join(os.fsencode(src), b"caf\xe9-\xff.jpg")   # Latin-1 bytes: not valid UTF-8
    os.symlink(os.fsencode(fixtures / "images" / "cat.jpg"), odd)
    (src / "rocket.jpg").symlink_to(fixtures / "images" / "rocket.jpg")
    out = tmp_path / "caps.jsonl"
    assert caption_dir(src, "--out", out, "--model", models["caption"]) == 0
    assert "captioned 2, skipped 0" in capsys.readouterr().out
    rows = read_jsonl(out)   # Python's json: \udcXX escapes -> the surrogateescape str of the name
    assert sorted(os.fsencode(r["path"]) for r in rows) == sorted([odd, os.fsencode(src / "rocket.jpg")])
    out.read_bytes().decode("utf-8")   # the file itself is valid UTF-8
    assert caption_dir(src, "--out", out, "--model", models["caption"]) == 0
    assert "captioned 0, skipped 0" in capsys.readouterr().out


def test_a_second_process_on_the_same_output_is_refused(tmp_path, fixtures, models, capsys, one_thread):
    src = _photos(tmp_path / "photos", fixtures, 8)
    out, started = tmp_path / "caps.jsonl", tmp_path / "first-is-captioning"
    first = _cli_with_hook([src, "--out", out, "--model", models["caption"]], "hold", at=1, hook_file=started)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never started captioning"
            time.sleep(0.05)
        assert caption_dir(src, "--out", out, "--model", models["caption"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"in use by process {first.pid}" in err, err
        assert not out.exists() or out.read_text() == ""   # the refused run wrote nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    assert caption_dir(src, "--out", out, "--model", models["caption"]) == 0   # the lock died with its process
    assert len(read_jsonl(out)) == 8


def test_an_unreadable_folder_is_reported_not_left_out_silently(tmp_path, fixtures, models, capsys, caplog,
                                                                 monkeypatch, one_thread):
    src = _photos(tmp_path / "photos", fixtures, 6)
    locked = src / "d1"
    locked.chmod(0)
    if os.geteuid() == 0:   # root reads a mode-000 folder anyway: answer as the kernel answers anyone else
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real_scandir(path)
        monkeypatch.setattr(os, "scandir", scandir)
    try:
        assert caption_dir(src, "--out", tmp_path / "caps.jsonl", "--model", models["caption"]) == 0
    finally:
        locked.chmod(0o755)
    assert "captioned 4, skipped 1" in capsys.readouterr().out
    [error] = read_jsonl(tmp_path / "caps.errors.jsonl")
    assert error["path"] == str(locked) and "Permission denied" in error["reason"]
    assert any(str(locked) in r.getMessage() for r in caplog.records)


def test_resume_knows_a_model_by_its_resolved_path_and_a_refusal_shows_both(tmp_path, fixtures, models, capsys,
                                                                            monkeypatch, one_thread):
    images, out = fixtures / "images", tmp_path / "caps.jsonl"
    monkeypatch.chdir(models["caption"].parent)
    name = models["caption"].name
    assert caption_dir(images, "--out", out, "--model", name, "--max-new-tokens", "4") == 0
    for same in (f"./{name}", str(models["caption"])):
        assert caption_dir(images, "--out", out, "--model", same, "--max-new-tokens", "4") == 0
        assert "captioned 0," in capsys.readouterr().out
    assert caption_dir(images, "--out", out, "--model", name, "--max-new-tokens", "5") == 2
    err = capsys.readouterr().err
    assert "max_new_tokens 4" in err and "this run: 5" in err, err
