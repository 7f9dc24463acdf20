"""Every Python file of the repository keeps its lines within 120 characters (characters, not bytes)."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 120


def python_files() -> list[Path]:
    """The git-tracked ``.py`` files; without git (or outside a checkout) those under blip/, scripts/ and tests/."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=ROOT, capture_output=True, check=True).stdout
        tracked = [ROOT / name for name in out.decode("utf-8").split("\0") if name]
        return [p for p in tracked if p.is_file()]   # a tracked file deleted in the work tree is not checked
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for d in ("blip", "scripts", "tests") for p in (ROOT / d).rglob("*.py"))


def test_no_line_over_120_characters():
    files = python_files()
    assert files, f"no Python files found under {ROOT}"
    long = [f"{path.relative_to(ROOT)}:{i}: {len(line)}"
            for path in files
            for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1) if len(line) > MAX_LINE]
    assert not long, f"{len(long)} line(s) over {MAX_LINE} characters:\n" + "\n".join(long)
