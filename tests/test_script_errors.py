"""scripts/train.py, evaluate.py and capfilt.py as users run them: a named error of the library (a path that does not
exist, a bad checkpoint) is one stderr line ``error: ...`` and exit status 2, --help is Hydra's help, and a bug keeps
its traceback. All of them share blip.cli.errors_as_one_line with the ``blip`` command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_fixtures import write_retrieval

REPO = Path(__file__).resolve().parents[1]


def script(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("BLIP_FULL_ERROR", None)
    return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, *named: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(part in lines[0] for part in named), lines[0]


@pytest.mark.parametrize("name", ["train.py", "evaluate.py", "capfilt.py"])
def test_help_is_hydras_help_without_a_traceback(name):
    proc = script(name, "--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Powered by Hydra" in proc.stdout


def test_train_resume_from_a_missing_run_is_one_line(tmp_path):
    proc = script("train.py", "stage=1", f"resume={tmp_path}/nonexistent", f"run_dir={tmp_path}/run",
                  f"output_root={tmp_path}")
    assert_one_error_line(proc, f"{tmp_path}/nonexistent")
    assert not (tmp_path / "run").exists()   # refused before the run claims a directory


def test_train_init_from_a_missing_checkpoint_is_one_line(tmp_path):
    proc = script("train.py", "stage=1", "model=blip_tiny", "model.vision_init=null",   # no encoder pre-training
                  f"init_from={tmp_path}/nonexistent", f"run_dir={tmp_path}/run",
                  f"output_root={tmp_path}", f"data.synthetic.cache_dir={tmp_path}/cache", "data.synthetic.num_train=8",
                  "data.synthetic.num_val=8", "data.synthetic.shard_size=8", "trainer.threads=1")
    assert_one_error_line(proc, f"{tmp_path}/nonexistent")


def test_evaluate_a_missing_checkpoint_is_one_line(tmp_path, fixtures):
    root = tmp_path / "data"
    write_retrieval(fixtures, root, "annotations/coco_karpathy_test.json", "val2014")
    proc = script("evaluate.py", "task=retrieval_coco", "split=test", f"data.root={root}", "device=cpu",
                  f"checkpoint={tmp_path}/nonexistent.pth", f"output_dir={tmp_path}/out")
    assert_one_error_line(proc, f"{tmp_path}/nonexistent.pth")


def test_capfilt_a_missing_captioner_is_one_line(tmp_path):
    proc = script("capfilt.py", f"input.urls={tmp_path}/shard.tar", f"output_dir={tmp_path}/out", "device=cpu",
                  f"captioner.source={tmp_path}/nonexistent")
    assert_one_error_line(proc, f"{tmp_path}/nonexistent")


def test_named_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    from blip.checkpoints import CheckpointError
    from blip.cli import errors_as_one_line
    monkeypatch.delenv("BLIP_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        with errors_as_one_line():
            raise CheckpointError("run/checkpoints/step_00000002/state.pt: truncated\n  (re-run)")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: run/checkpoints/step_00000002/state.pt: truncated (re-run)\n"
    with pytest.raises(SystemExit) as exit_:
        with errors_as_one_line("blip caption-dir"):
            raise KeyboardInterrupt
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(ZeroDivisionError):   # a bug: its traceback is what its reader needs
        with errors_as_one_line():
            _ = 1 / 0
    monkeypatch.setenv("BLIP_FULL_ERROR", "1")
    with pytest.raises(CheckpointError):      # debugging: named errors keep their traceback too
        with errors_as_one_line():
            raise CheckpointError("x")
