"""Where a training run of ``scripts/train.py`` keeps its files: the one home of the run-directory layout.

::

    <output_root>/<name>/                 runs of one name ("the newest run of this name" is taken from here)
        <timestamp>[-N]/                  a run directory, claimed by creating its config.yaml
            config.yaml                   the resolved config (rebuilds the model: blip.runs.load_run)
            run.lock                      flock'ed by the process training in this directory (blip.file_lock)
            checkpoints/step_00001000/    a checkpoint, published atomically by renaming .step_00001000.tmp
                state.pt                  model, optimizer, schedule, scaler, trainer position
                rng_rank{r}.pt            each rank's RNG states
                manifest.json             each file's size and sha256, written before the rename
            checkpoints/step_00002000.corrupt/   a checkpoint that failed its check, set aside by a resume

Every function here is about paths and files only (no model is built), so the checkpoint reader
(:mod:`blip.convert.formats`), training and the loaders above them share it.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

from .checkpoints import CheckpointError, read_torch_file

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
STATE = "state.pt"
MANIFEST = "manifest.json"
RUN_LOCK = "run.lock"
CHECKPOINT_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of ``step`` (``step_00001000``); zero-padded so names sort by step."""
    return f"step_{step:08d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (``step_*/state.pt``) under ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and
             (p / STATE).exists()]
    return [p for _, p in sorted(found)]


def _runs_of_one_name(folder: Path) -> list[Path]:
    """The run directories directly inside ``folder`` (``outputs/<name>/<timestamp>``), oldest first."""
    if not folder.is_dir() or (folder / CONFIG).exists():
        return []
    return sorted(p for p in folder.iterdir() if (p / CONFIG).is_file())


def newest_run(folder: str | Path, exclude: Path | None = None) -> Path | None:
    """The newest run directory inside ``folder`` that has a finished checkpoint (runs are named by their start
    time, so the names sort by age); None when no run there has one."""
    for run in reversed(_runs_of_one_name(Path(folder))):
        if run != exclude and list_checkpoints(run / CHECKPOINTS):
            return run
    return None


def newest_checkpoint(output_root: str | Path, name: str, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint of the newest run ``output_root/name/*`` that has one (``latest:<name>``)."""
    run = newest_run(Path(output_root) / name, exclude)
    return None if run is None else list_checkpoints(run / CHECKPOINTS)[-1]


def find_run(path: str | Path) -> tuple[Path, Path] | None:
    """(config.yaml, newest checkpoint dir) of a run directory, one of its checkpoint dirs, or a folder of runs of
    one name (its newest run with a checkpoint); None when ``path`` is none of these."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / STATE).is_file() and (p.parent.parent / CONFIG).is_file():
        return p.parent.parent / CONFIG, p
    if (p / CONFIG).is_file() and (p / CHECKPOINTS).is_dir():
        found = list_checkpoints(p / CHECKPOINTS)
        if not found:
            raise CheckpointError(f"{p}: a training run without a finished checkpoint (checkpoints/step_*/state.pt); "
                                  "train longer or lower trainer.checkpoint_every")
        return p / CONFIG, found[-1]
    runs = _runs_of_one_name(p)
    if runs:
        run = newest_run(p)
        if run is None:
            raise CheckpointError(f"{p}: none of its {len(runs)} runs (newest: {runs[-1].name}) has a finished "
                                  "checkpoint (checkpoints/step_*/state.pt); train longer or lower "
                                  "trainer.checkpoint_every")
        return run / CONFIG, list_checkpoints(run / CHECKPOINTS)[-1]
    return None


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory / folder of runs."""
    p = Path(path)
    if (p / STATE).exists():
        return p
    run = find_run(p)
    if run is not None:
        return run[1]
    found = list_checkpoints(p / CHECKPOINTS)   # checkpoints without the run's config.yaml
    if not found:
        raise FileNotFoundError(f"no checkpoint in {p} (expected {p}/{STATE}, {p}/{CHECKPOINTS}/step_*/ or "
                                f"{p}/<run>/{CHECKPOINTS}/step_*/)")
    return found[-1]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_of(directory: Path) -> dict:
    """``{"files": {name: {"bytes", "sha256"}}}`` of every file in a checkpoint directory (its MANIFEST aside)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    return {"files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}}


def verify_checkpoint(ckpt: Path) -> bool:
    """Check a checkpoint directory's files against its MANIFEST: True when they match, False for a checkpoint saved
    before manifests existed whose ``state.pt`` at least is a whole torch zip file (unverified). A mismatch, a missing
    or unreadable file, or an empty / truncated ``state.pt`` is a CheckpointError naming the file and why."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        state = ckpt / STATE
        if not state.is_file() or state.stat().st_size == 0:
            raise CheckpointError(f"{state}: {'empty' if state.is_file() else 'missing'}")
        if not zipfile.is_zipfile(state):   # torch.save writes a zip archive; a cut one has no central directory
            raise CheckpointError(f"{state}: truncated (not a whole torch.save zip archive)")
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({type(e).__name__}: {e})") from None
    for name, expected in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, {expected['bytes']} when saved (truncated or rewritten)")
        if file_sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: its sha256 differs from the one saved in {MANIFEST} (the bytes changed "
                                  "after the save: a disk or copy error, or an edit)")
    return True


def intact_checkpoint(ckpt: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``ckpt`` when it passes :func:`verify_checkpoint`, else the newest earlier checkpoint of its directory that does
    (None when none does); with each checkpoint passed over and why, newest first."""
    same_run = CHECKPOINT_DIR.match(ckpt.name) is not None
    candidates = [p for p in list_checkpoints(ckpt.parent) if p.name <= ckpt.name] if same_run else [ckpt]
    skipped = []
    for candidate in reversed(candidates or [ckpt]):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as e:
            skipped.append((candidate, str(e)))
            continue
        return candidate, skipped
    return None, skipped


def own_run_dir(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step_*``), if it is one."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def read_run_weights(path: str | Path) -> tuple[Path, dict]:
    """The newest checkpoint directory of a run (or a checkpoint directory itself) and the model weights in its
    ``state.pt`` (the training objective's names)."""
    ckpt = checkpoint_path(path)
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as e:   # a model for use is never silently an older one: say which to take instead
        good, _ = intact_checkpoint(ckpt)
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {e}; " + (
            f"the newest intact one is {good}: load that directory" if good is not None else
            "no earlier checkpoint of this run is intact")) from None
    state = read_torch_file(ckpt / STATE)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{ckpt / STATE}: a training checkpoint holds a 'model' state dict; this one does not "
                              "(re-run the training or pick another checkpoint)")
    return ckpt, state["model"]
