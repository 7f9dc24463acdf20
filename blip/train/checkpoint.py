"""Resumable checkpoints: atomic, keep-last-N, tensors and plain containers only (loadable with weights_only=True).

Layout (:mod:`blip.run_layout`): `<dir>/step_00001000/` holding `state.pt` (model, optimizer, schedule, scaler,
trainer position) and `rng_rank{r}.pt` (each rank's RNG states). A checkpoint is written into a hidden temp directory
and renamed into place only when complete, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from blip.checkpoints import read_torch_file
from blip.run_layout import STATE, checkpoint_name, list_checkpoints
from blip.train.distributed import DistInfo, barrier, stop_if_any_rank_failed

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
    """Collective: every rank calls it (each saves its RNG), rank 0 writes `state` and publishes atomically: files
    and directory are fsynced before the rename, so a published checkpoint is complete even after a power loss.
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
