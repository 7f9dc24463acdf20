"""Resumable checkpoints: atomic, keep-last-N, tensors and plain containers only (loadable with weights_only=True).

Layout: `<dir>/step_00001000/` holding `state.pt` (model, optimizer, schedule, scaler, trainer position) and
`rng_rank{r}.pt` (each rank's RNG states). A checkpoint is written into a hidden temp directory and renamed into
place only when complete, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from blip.train.distributed import DistInfo, barrier

CHECKPOINT_DIR = re.compile(r"^step_(\d{8})$")


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


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and
             (p / "state.pt").exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: str | Path, step: int, state: dict, info: DistInfo, keep_last: int | None = 3) -> Path:
    """Collective: every rank calls it (each saves its RNG), rank 0 writes `state` and publishes atomically."""
    d = Path(directory)
    final = d / f"step_{step:08d}"
    tmp = d / f".step_{step:08d}.tmp"
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(info)
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        torch.save(state, tmp / "state.pt")
    barrier(info)
    if info.is_main:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(d)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: str | Path, info: DistInfo) -> dict:
    """The saved state (on CPU), with this rank's RNG state under "rng" (None if the world size changed)."""
    p = Path(path)
    state = torch.load(p / "state.pt", map_location="cpu", weights_only=True)
    rng_file = p / f"rng_rank{info.rank}.pt"
    state["rng"] = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
    return state
