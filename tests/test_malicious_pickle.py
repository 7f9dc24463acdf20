"""A checkpoint whose pickle runs code when unpickled (its payload creates a marker file) fed through every entry
point that reads torch files: the marker must never appear, and the error must name the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip.checkpoints import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"): code from the file runs and leaves the marker behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def planted(tmp_path):
    """(write(path, state), marker): torch.save `state` with the payload hidden inside it."""
    marker = tmp_path / "PWNED"

    def write(path: Path, state: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**state, "extra": Payload(marker)}, path)
        return path

    yield write, marker
    assert not marker.exists(), "the checkpoint's code ran"


def test_the_payload_is_real(tmp_path, planted):
    write, _ = planted
    other = tmp_path / "proof"
    torch.save({"x": Payload(other)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)  # what blip must never do
    assert other.exists()


def test_blip_load_and_the_cli(tmp_path, planted):
    import blip

    write, _ = planted
    path = write(tmp_path / "model_base_caption.pth", {"model": {"w": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match=r"model_base_caption\.pth: cannot be read .*Unsupported global") as err:
        blip.load(path)
    assert "weights_only=False" not in str(err.value)  # no advice to run the file's code
    cli = subprocess.run([sys.executable, "-m", "blip.cli", "caption", "--model", str(path), str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and "model_base_caption.pth" in cli.stderr


def run_dir_with(tmp_path: Path, write, payload_in: str) -> Path:
    """A training run whose newest checkpoint hides the payload in `payload_in` (state.pt or rng_rank0.pt)."""
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    files = {"state.pt": {"model": {"w": torch.zeros(2)}, "trainer": {}}, "rng_rank0.pt": {"t": torch.get_rng_state()}}
    for name, state in files.items():
        write(step / name, state) if name == payload_in else torch.save(state, step / name)
    (tmp_path / "run" / "config.yaml").write_text("model:\n  arch: blip_tiny\n  task: caption\n  image_size: 32\n")
    return tmp_path / "run"


@pytest.mark.parametrize("name", ["state.pt", "rng_rank0.pt"])
def test_resume_reads_state_and_rng_files_safely(tmp_path, planted, name):
    from blip.train.checkpoint import load_checkpoint
    from blip.train.distributed import DistInfo

    write, _ = planted
    run = run_dir_with(tmp_path, write, name)
    with pytest.raises(CheckpointError, match=rf"step_00000002/{name}: cannot be read"):
        load_checkpoint(run / "checkpoints" / "step_00000002", DistInfo())


def test_run_dirs_init_from_and_capfilt_sources(tmp_path, planted):
    import blip
    from blip.api import load_task_model
    from blip.train.init import init_from_checkpoint

    write, _ = planted
    run = run_dir_with(tmp_path, write, "state.pt")
    with pytest.raises(CheckpointError, match="state.pt: cannot be read"):
        blip.load(run)
    with pytest.raises(CheckpointError, match="state.pt: cannot be read"):
        init_from_checkpoint(torch.nn.Linear(2, 2), run)
    with pytest.raises(CheckpointError, match="state.pt: cannot be read"):
        load_task_model(run, "blip_tiny", "caption")
