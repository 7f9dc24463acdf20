"""Exclusive locks that keep two processes off one job's files (a caption-dir output, a training run directory).

A lock is ``fcntl.flock`` on a small file that also holds the owner's pid (for the refusal message). The kernel drops
a flock when its process dies, however it dies, so a killed job never leaves a stale lock behind: the file may stay,
the lock does not. Locks are advisory and local to one machine's kernel (NFS may not honour them).
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HELD: dict[str, int] = {}   # lock file -> descriptor, for locks held until this process exits


class LockHeldError(OSError):
    """Another process holds the lock; the message names the lock file, the holder's pid and what to do."""


def _acquire(path: Path, what: str) -> int:
    """Take the lock on ``path`` (created if missing) without waiting; returns its descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeldError(f"{what} is in use by process {holder} (lock {path}); wait for it to end or stop "
                                "it (a lock dies with its process, so a killed job never blocks)") from None
        if _same_file(fd, path):
            break
        os.close(fd)   # the holder removed the file while we waited for its lock: lock the file now there
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock on ``path`` for the ``with`` block, then remove the file; LockHeldError at once if another holder
    has it (a second ``with`` on the same file in this process is refused too: the lock belongs to one open file)."""
    fd = _acquire(Path(path), what)
    try:
        yield
    finally:
        Path(path).unlink(missing_ok=True)   # before the unlock: a waiter then finds it gone and takes a new file
        _release(fd)


def hold_until_exit(path: str | Path, what: str) -> None:
    """Take the lock on ``path`` and keep it until this process exits (the kernel releases it then). Taking a lock
    this process already holds this way is a no-op, so a job re-run in one process (a notebook, a test) is not
    refused by itself."""
    key = os.path.abspath(path)
    if key not in _HELD:
        _HELD[key] = _acquire(Path(key), what)

