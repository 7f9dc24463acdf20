"""Resumable checkpoints: atomic, keep-last-N, tensors and plain containers only (loadable with weights_only=True).

Layout (:mod:`blip.run_layout`): `<dir>/step_00001000/` holding `state.pt` (model, optimizer, schedule, scaler,
trainer position), `rng_rank{r}.pt` (each rank's RNG states) and `manifest.json` (each file's size and sha256). A
checkpoint is written into a hidden temp directory and renamed into place only when complete, so a run killed
mid-write leaves the previous checkpoint intact; a resume checks the manifest and falls back to the newest intact
checkpoint when bytes changed afterwards (:func:`resume_point`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from blip.checkpoints import CheckpointError, read_torch_file
from blip.run_layout import (MANIFEST, STATE, checkpoint_name, intact_checkpoint, list_checkpoints, manifest_of,
                             verify_checkpoint)
from blip.train.distributed import DistInfo, barrier, stop_if_any_rank_failed

log = logging.getLogger("blip.train")


def rng_state() -> dict:
    """All RNG states of this process as tensors / lists (no pickled objects)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; `str()` names the errno, the cause and the path."""


def remove_stale_tmp(directory: str | Path) -> list[Path]:
    """Remove the temp directories of saves that never completed (a killed run, a full disk): at the start of a run,
    before anything resumes or writes. Returns what was removed."""
    d = Path(directory)
    stale = sorted(d.glob(".step_*.tmp")) if d.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(directory: Path) -> None:
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest_of(directory), f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write(obj: dict, path: Path) -> None:
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:  # torch's zip writer reports a failed write as a RuntimeError raised while unwinding
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from e


def _save_error(e: OSError, path: Path) -> CheckpointSaveError:
    return CheckpointSaveError(e.errno, f"{e.strerror or e} while writing checkpoint {path}; free space (or fix "
                                        "the permissions) and resume=latest: the last complete checkpoint is kept",
                               str(getattr(e, "filename", None) or path))


def save_checkpoint(directory: str | Path, step: int, state: dict, info: DistInfo, keep_last: int | None = 3) -> Path:
    """Collective: every rank calls it (each saves its RNG), rank 0 writes `state` and the manifest of every file and
    publishes atomically: files and directory are fsynced before the rename, so a published checkpoint is complete
    even after a power loss.
    A failed write (e.g. ENOSPC) removes the partial temp directory and raises CheckpointSaveError on every rank."""
    d = Path(directory)
    final = d / checkpoint_name(step)
    tmp = d / f".{final.name}.tmp"
    error = None
    if info.is_main:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _save_error(e, tmp)
    stop_if_any_rank_failed(error, info)
    try:
        _write(rng_state(), tmp / f"rng_rank{info.rank}.pt")
        if info.is_main:
            _write(state, tmp / STATE)
    except OSError as e:
        error = _save_error(e, tmp)
    barrier(info)  # every rank's files are written (or failed) before the partial directory may go
    if error is not None and info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    stop_if_any_rank_failed(error, info)
    if info.is_main:
        try:
            _write_manifest(tmp)   # after every rank's files: it lists them all
            _fsync(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(d)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = _save_error(e, final)
        if error is None and keep_last:
            for old in list_checkpoints(d)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    stop_if_any_rank_failed(error, info)
    return final


def load_checkpoint(path: str | Path, info: DistInfo) -> dict:
    """The saved state (on CPU), with this rank's RNG state under "rng" (None if the world size changed)."""
    p = Path(path)
    state = read_torch_file(p / STATE)
    rng_file = p / f"rng_rank{info.rank}.pt"
    state["rng"] = read_torch_file(rng_file) if rng_file.exists() else None
    return state


def resume_point(ckpt: Path) -> Path:
    """The checkpoint a resume of ``ckpt`` loads: ``ckpt`` when its files match its manifest, else the newest earlier
    checkpoint of its run that does; each one passed over is logged with why. A checkpoint from before manifests is
    taken when its ``state.pt`` is whole, logged as unverified. CheckpointError when none of them is intact."""
    good, skipped = intact_checkpoint(ckpt)
    for bad, why in skipped:
        log.warning("resume: skipping checkpoint %s: %s", bad, why)
    if good is None:
        raise CheckpointError(f"resume: no intact checkpoint in {ckpt.parent} up to {ckpt.name} (each is logged "
                              "above with why); start a new run or init_from= another run")
    if not (good / MANIFEST).is_file():
        log.warning("resume: %s has no %s (saved before checksums were written): its bytes are unverified", good,
                    MANIFEST)
    return good


def set_aside_damaged_after(ckpt: Path) -> list[Path]:
    """Rename the checkpoints newer than ``ckpt`` in its directory that fail their check to ``step_*.corrupt`` (kept
    for inspection, no longer a checkpoint), so the resumed run's own saves are its newest and a later resume or
    ``blip.load`` never meets them. Returns the new names. Rank 0, with the run directory locked."""
    moved = []
    for later in list_checkpoints(ckpt.parent):
        if later.name <= ckpt.name:
            continue
        try:
            verify_checkpoint(later)
        except CheckpointError:
            target, n = later.with_name(later.name + ".corrupt"), 0
            while target.exists():   # set aside before, by an earlier resume
                n += 1
                target = later.with_name(f"{later.name}.corrupt-{n}")
            moved.append(later.rename(target))
    return moved
