"""``blip caption-dir``: caption (or ask one question about) every image of a folder, a file list or local webdataset
shards, into one JSONL file, resumably.

- Inputs: a folder (recursive, image extensions), a text file of image paths (relative ones are relative to the
  list's folder), or shards (``shards/{000..009}.tar``, local files only). Data-loader workers decode and resize.
- Output: one JSON object per image: ``"path"`` (or ``"key"`` and ``"shard"``), ``"caption"`` (or ``"question"`` and
  ``"answer"``), ``"model"`` and ``"settings"``. Lines are appended in chunks with one write each; a run killed at
  any point and re-run with the same command skips the images already in the output (a torn last line is cut off)
  and writes every image exactly once. Lines follow the order in which chunks finish, not the input order.
- Unreadable images, and sub-folders that cannot be listed, go to the errors file (``"path"`` or ``"key"``,
  ``"reason"``), are counted as skipped and are warned about; a re-run tries them again and rewrites the errors file.
- A file name that is not valid UTF-8 (Linux allows any bytes) is kept losslessly: it is read as Python's
  ``surrogateescape`` str and written with ``\\udcXX`` escapes, which ``json.loads`` turns back into that str and
  ``os.fsencode`` into the original bytes; the JSONL file itself stays valid UTF-8.
- Results are written every ``chunk_size`` images or ``flush_seconds``, whichever comes first, and on Ctrl-C (which
  then raises :class:`Interrupted`, saying how many were saved); a chunk's write is never cut by Ctrl-C.
- One process at a time per output: rank 0 holds a lock (``OUT.lock``, :mod:`blip.file_lock`) for the whole run, so
  a second run on the same ``--out`` is refused with the holder's pid instead of writing every image twice.
- Resuming needs the same model and settings as the output's: a model path is compared by the file it names
  (``run/``, ``./run`` and an absolute path are one model); a refusal lists the recorded and the new values.
- Under ``torchrun`` each rank captions its own share into ``OUT.rank{r}.jsonl``; rank 0 merges them into ``OUT``
  when every rank has finished.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .file_lock import exclusive_lock
from .predictor import Decoding, Predictor, UsageError

log = logging.getLogger("blip.caption_dir")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


# ---- inputs -------------------------------------------------------------------------------------------------------
def list_inputs(src: str) -> tuple[list[str], list[str], list[dict]]:
    """SRC -> (image paths, shard paths, error records of sub-folders that could not be listed); exactly one of
    the first two is non-empty."""
    if ".tar" in src:
        from .data.webdataset import expand_urls
        shards = expand_urls(src)
        remote = [s for s in shards if "://" in s or s.startswith("pipe:")]
        if remote:
            raise UsageError(f"caption-dir reads local shards only, got {remote[0]}")
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise UsageError(f"{len(missing)} of {len(shards)} shards are missing, e.g. {missing[0]}")
        return [], shards, []
    path = Path(src)
    if path.is_dir():
        paths, unreadable = _walk_images(path)
        if not paths:
            raise UsageError(f"{src}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder" +
                             (f"; {len(unreadable)} sub-folder(s) could not be read, e.g. {unreadable[0]['path']}: "
                              f"{unreadable[0]['reason']}" if unreadable else ""))
        return paths, [], unreadable
    if path.is_file():   # names that are not UTF-8 stay lossless (surrogateescape), as os.listdir gives them
        lines = [line.strip() for line in path.read_text(errors="surrogateescape").splitlines()]
        paths = [str(path.parent / line) for line in lines if line and not line.startswith("#")]  # absolute stay
        return list(dict.fromkeys(paths)), [], []   # a path listed twice is captioned once
    raise UsageError(f"{src}: no such folder, file list or shard pattern")


def _walk_images(root: Path) -> tuple[list[str], list[dict]]:
    """Image files under ``root`` (recursive, symlinked folders not followed), sorted, and an error record for each
    folder that could not be listed (a permission error is reported, never silently left out)."""
    unreadable: list[dict] = []

    def report(e: OSError) -> None:
        unreadable.append({"path": e.filename or str(root), "reason": f"folder not listed: {e.strerror or e}"})

    paths = [os.path.join(folder, name) for folder, _, names in os.walk(root, onerror=report) for name in names
             if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    return sorted(paths), unreadable


def count_images(shards: list[str]) -> int:
    """Image members of local tar shards, from their headers alone (sizes the progress bar)."""
    import tarfile

    from .data.webdataset import IMAGE_EXTENSIONS
    n = 0
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                n += sum(m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS for m in tar)
        except (OSError, tarfile.TarError):
            continue   # a broken shard is reported when it is read
    return n


def default_errors_path(out: str | Path) -> Path:
    """``captions.jsonl`` -> ``captions.errors.jsonl``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")


def record_id(record: dict) -> str:
    return record["path"] if "path" in record else f"{record['shard']}#{record['key']}"


def _decode(source, name: str, transform) -> dict:
    from .data.images import ImageDecodeError, load_image
    try:
        return {"pixels": transform(load_image(source)), "error": None}
    except ImageDecodeError as e:
        return {"pixels": None, "error": e.reason}
    except Exception as e:  # noqa: BLE001 - any decoder failure is this image's problem, reported and skipped
        return {"pixels": None, "error": f"{type(e).__name__}: {e} ({name})"}


class ImageFiles(Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"record": {"path": self.paths[i]}, **_decode(self.paths[i], self.paths[i], self.transform)}


class ShardImages(IterableDataset):
    """Images of webdataset shards; each data-loader worker reads its own shards and skips those already done."""

    def __init__(self, shards: list[str], transform, done: set[str]):
        self.shards, self.transform, self.done = shards, transform, done

    def __iter__(self) -> Iterator[dict]:
        from .data.skips import SkipCounter
        from .data.webdataset import IMAGE_EXTENSIONS, iter_tar_samples
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info is not None else self.shards
        for shard in mine:
            skips = SkipCounter()
            for sample in iter_tar_samples(shard, skips):
                record = {"key": sample.get("__key__", "?"), "shard": shard}
                if record_id(record) in self.done:
                    continue
                data = next((sample[k] for k in IMAGE_EXTENSIONS if k in sample), None)
                if data is None:
                    yield {"record": record, "pixels": None, "error": f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in "
                           f"the sample, only {sorted(k for k in sample if not k.startswith('__'))}"}
                    continue
                yield {"record": record, **_decode(data, record_id(record), self.transform)}
            for reason, n in skips.counts.items():  # a broken tar ends its shard: report it as one error
                yield {"record": {"key": None, "shard": shard}, "pixels": None,
                       "error": f"shard read error ({reason}); the rest of this shard was not read"}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if it["error"] is None]
    return {"records": [it["record"] for it in good],
            "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
            "errors": [{**it["record"], "reason": it["error"]} for it in items if it["error"] is not None]}


# ---- output -------------------------------------------------------------------------------------------------------
def _jsonl_line(row: dict) -> bytes:
    """One JSON line in UTF-8. A file name that is not valid UTF-8 is a surrogateescape str; its lone surrogates
    cannot be UTF-8, so such a row is written with ASCII escapes (``\\udce9``), which read back to the same str."""
    try:
        return json.dumps(row, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(row).encode() + b"\n"


def _read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSONL file (a torn last line, from a killed run, is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _cut_torn_tail(path: Path) -> None:
    """Drop an incomplete last line left by a run killed mid-write."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Ctrl-C inside the block is raised when it ends, so a chunk's write is never cut (main thread only: signal
    handlers live there; inside another such block, the outer one defers it)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _append(path: Path, rows: list[dict]) -> None:
    """One write per chunk, flushed to disk before the next chunk starts."""
    if not rows:
        return
    with open(path, "ab") as f, _deferred_interrupt():
        f.write(b"".join(map(_jsonl_line, rows)))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Outputs:
    out: Path
    errors: Path
    rank: int = 0
    world_size: int = 1
    part: Path = field(init=False)
    error_part: Path = field(init=False)

    def __post_init__(self) -> None:
        multi = self.world_size > 1
        self.part = self.out.with_name(f"{self.out.name}.rank{self.rank}.jsonl") if multi else self.out
        self.error_part = self.errors.with_name(f"{self.errors.name}.rank{self.rank}.jsonl") if multi else self.errors

    def parts(self) -> list[Path]:
        return sorted(self.out.parent.glob(f"{glob.escape(self.out.name)}.rank*.jsonl"))

    def written(self) -> list[dict]:
        """Every complete line of the output and of any rank's part (whatever world size wrote them)."""
        return [row for path in [self.out, *self.parts()] for row in _read_jsonl(path)]

    def error_parts(self) -> list[Path]:
        return sorted(self.errors.parent.glob(f"{glob.escape(self.errors.name)}.rank*.jsonl"))

    def start(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.world_size == 1 and self.parts():  # left by an unfinished torchrun run
            self.merge()
        _cut_torn_tail(self.part)
        self.error_part.write_bytes(b"")   # errors are retried, so they are this run's

    def merge(self) -> None:
        """Rank 0, once every rank has finished: append the parts' new lines to OUT, then remove the parts."""
        _cut_torn_tail(self.out)
        seen = {record_id(r) for r in _read_jsonl(self.out)}
        new = [r for part in self.parts() for r in _read_jsonl(part) if record_id(r) not in seen]
        _append(self.out, list({record_id(r): r for r in new}.values()))
        errors = [r for part in self.error_parts() for r in _read_jsonl(part)]
        self.errors.write_bytes(b"".join(map(_jsonl_line, errors)))
        for path in [*self.parts(), *self.error_parts()]:
            path.unlink()


# ---- the job ------------------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`CaptionDirJob.run`, raised after this run's finished results were written to ``out``:
    ``saved`` of them (this rank's). Its text is the line the CLI prints; re-running the same command resumes."""

    def __init__(self, saved: int, out: Path):
        super().__init__(f"interrupted: {saved} saved to {out}, re-run the same command to resume")
        self.saved, self.out = saved, out


def lock_path(out: Path) -> Path:
    """``captions.jsonl`` -> ``captions.jsonl.lock``, held by the run writing that output."""
    return out.with_name(out.name + ".lock")


def same_model(recorded: str | None, current: str) -> bool:
    """Whether a recorded ``"model"`` and this run's name the same model: equal names, or paths to the same file or
    folder (``run/``, ``./run`` and ``/abs/run``)."""
    if recorded == current:
        return True
    try:
        return recorded is not None and os.path.samefile(recorded, current)
    except OSError:   # a zoo name, or a path that no longer exists
        return False


@dataclass
class CaptionDirJob:
    predictor: Predictor
    decoding: Decoding = field(default_factory=Decoding)
    question: str | None = None
    seed: int | None = None     # sampling: each image's stream is seeded by (seed, its path or key)
    batch_size: int = 16
    chunk_size: int = 1024      # images per flush to the output ...
    flush_seconds: float = 30.0  # ... or seconds since the last flush, whichever comes first
    num_workers: int = 2
    progress: bool = True

    def settings(self) -> dict:
        task = "caption" if self.question is None else "answer"
        extra = {k: v for k, v in (("question", self.question), ("seed", self.seed)) if v is not None}
        return {**self.predictor.settings(self.decoding, task), **extra}

    def label(self, pixels: torch.Tensor, records: list[dict]) -> list[dict]:
        from .capfilt.captioner import sample_seed
        seeds = [sample_seed(self.seed, record_id(r), 0) for r in records] if self.seed is not None else None
        if self.question is None:
            return [{"caption": c} for c in self.predictor.caption(pixels, self.decoding, seeds)]
        answers = self.predictor.answer(pixels, [self.question] * pixels.shape[0], self.decoding, seeds=seeds)
        return [{"question": self.question, "answer": a} for a in answers]

    def _check_same_settings(self, written: list[dict]) -> None:
        """Refuse to add to an output written with another model or settings, listing each recorded value next to
        this run's."""
        if not written:
            return
        model, settings = written[0].get("model"), written[0].get("settings") or {}
        ours = self.settings()
        differ = [] if same_model(model, self.predictor.name) else [f"model {model!r} (this run: "
                                                                     f"{self.predictor.name!r})"]
        differ += [f"{k} {settings.get(k, '(unset)')!r} (this run: {ours.get(k, '(unset)')!r})"
                   for k in sorted(settings.keys() | ours.keys()) if settings.get(k) != ours.get(k)]
        if differ:
            raise UsageError(f"the output already holds results made with other options: {'; '.join(differ)}; re-run "
                             "with the same options or choose another --out")

    def run(self, src: str, out: str | Path, errors: str | Path | None = None, rank: int = 0,
            world_size: int = 1, barrier=lambda: None, all_reduce=lambda counts: counts) -> dict:
        """Caption ``src`` into ``out``; returns {"captioned", "skipped", "already_done"} summed over ranks.
        Raises :class:`Interrupted` on Ctrl-C (after writing what was finished) and
        :class:`blip.file_lock.LockHeldError` when another process is writing ``out``."""
        self.predictor.require("caption" if self.question is None else "answer")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise UsageError("--batch-size and --chunk-size must be >= 1")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # rank 0 holds the output for the run; the ranks of one job share it
        with exclusive_lock(lock_path(out), f"the output {out}") if rank == 0 else nullcontext():
            return self._run(src, out, errors, rank, world_size, barrier, all_reduce)

    def _run(self, src: str, out: Path, errors: str | Path | None, rank: int, world_size: int, barrier,
             all_reduce) -> dict:
        files = Outputs(out, Path(errors) if errors else default_errors_path(out), rank, world_size)
        paths, shards, unreadable = list_inputs(src)
        written = files.written()
        self._check_same_settings(written)
        done = {record_id(r) for r in written}
        barrier()   # every rank has read what is done before any rank writes
        files.start()
        if rank == 0:   # folders that could not be listed: reported once, counted as skipped
            for err in unreadable:
                log.warning("skipped folder %s: %s", err["path"], err["reason"])
            _append(files.error_part, unreadable)
        transform, total = self.predictor.transform(), None
        if paths:
            pending = [p for p in paths if p not in done]
            dataset = ImageFiles(pending[rank::world_size], transform)
            total = len(dataset)
            already = len(paths) - len(pending)
        else:
            mine = shards[rank::world_size]
            dataset, already = ShardImages(mine, transform, done), len(done)
            if self.progress:   # a total gives the bar its ETA
                ours = set(mine)
                done_here = sum(1 for r in written if r.get("shard") in ours)
                total = max(count_images(mine) - done_here, 0)
        counts = self._label_all(dataset, total, files)
        counts["skipped"] += len(unreadable) if rank == 0 else 0
        counts = all_reduce({**counts, "already_done": already if rank == 0 else 0})
        barrier()
        if world_size > 1 and rank == 0:
            files.merge()
        return counts

    def _label_all(self, dataset, total: int | None, files: Outputs) -> dict:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                            pin_memory=self.predictor.device.type == "cuda")
        bar = tqdm(total=total, unit="img", dynamic_ncols=True, disable=not self.progress, desc="caption-dir")
        try:
            with logging_redirect_tqdm():
                return self._loop(loader, bar, files)
        finally:
            bar.close()

    def _loop(self, loader: DataLoader, bar, files: Outputs) -> dict:
        counts = {"captioned": 0, "skipped": 0}
        rows, bad = [], []
        base = {"model": self.predictor.name, "settings": self.settings()}
        last_flush = monotonic()
        try:
            for batch in loader:
                if batch["pixels"] is not None:
                    results = self.label(batch["pixels"], batch["records"])
                    rows += [{**rec, **result, **base} for rec, result in zip(batch["records"], results)]
                for err in batch["errors"]:
                    log.warning("skipped %s: %s", record_id(err), err["reason"])
                bad += batch["errors"]
                bar.update(len(batch["records"]) + len(batch["errors"]))
                now = monotonic()
                if len(rows) + len(bad) >= self.chunk_size or now - last_flush >= self.flush_seconds:
                    with _deferred_interrupt():   # written and forgotten together: never written twice
                        counts = self._flush(files, rows, bad, counts)
                        rows, bad, last_flush = [], [], now
            with _deferred_interrupt():
                counts = self._flush(files, rows, bad, counts)
                rows, bad = [], []
        except KeyboardInterrupt:   # keep every finished batch, then stop
            counts = self._flush(files, rows, bad, counts)
            raise Interrupted(counts["captioned"], files.out) from None
        return counts

    @staticmethod
    def _flush(files: Outputs, rows: list[dict], bad: list[dict], counts: dict) -> dict:
        _append(files.error_part, bad)
        _append(files.part, rows)   # last: a chunk counts as done only once its results are on disk
        return {"captioned": counts["captioned"] + len(rows), "skipped": counts["skipped"] + len(bad)}
