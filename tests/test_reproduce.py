"""REPRODUCE.md stays usable: every command in its tables composes as printed (the task, the split, the keys it
sets exist), and every published value names the table or page it was read from."""
import re

import pytest

from test_configs import ROOT, compose_cfg
from test_recipes import compose_eval

# a value's source: a paper table ("BLIP T7", "BLIP-2 T3"), LAVIS's model zoo, its BLIP-2 README, or an issue
SOURCE = re.compile(r"\((?:[^)]*; )?(BLIP T\d|BLIP-2 T\d|LAVIS zoo|LAVIS #\d+|LAVIS's BLIP-2 README)")
PLACEHOLDERS = {"$CKPT": "/ckpt", "$DATA": "/data", "$LLM": "/llm", "<the run>": "/run"}


def rows() -> list[list[str]]:
    """The cells of every table row of REPRODUCE.md (header and rule rows left out)."""
    found = []
    for line in (ROOT / "REPRODUCE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0] != "benchmark" and not set(cells[0]) <= {"-"}:
            found.append(cells)
    return found


def commands(script: str) -> list[list[str]]:
    """The overrides of each backquoted ``scripts/<script>.py`` command in the tables."""
    out = []
    for cells in rows():
        for span in re.findall(r"`([^`]*scripts/" + script + r"\.py[^`]*)`", " ".join(cells)):
            for name, value in PLACEHOLDERS.items():
                span = span.replace(name, value)
            out.append(span.split(f"scripts/{script}.py", 1)[1].split())
    return out


def test_every_published_value_names_its_source_and_none_is_unchecked():
    assert "†" not in (ROOT / "REPRODUCE.md").read_text()
    table_rows = rows()
    assert len(table_rows) > 30
    for cells in table_rows:
        assert len(cells) == 5, cells[0]
        assert SOURCE.search(cells[3]), f"{cells[0]}: the published value names no table or page"


@pytest.mark.parametrize("args", commands("evaluate"), ids=lambda a: " ".join(a)[:80])
def test_evaluate_commands_compose(args):
    cfg = compose_eval([a for a in args if not a.startswith("checkpoint=")])
    assert cfg.split in cfg.task.splits, f"{cfg.task.name} has no split {cfg.split}"


@pytest.mark.parametrize("args", commands("train"), ids=lambda a: " ".join(a)[:80])
def test_train_commands_compose(args):
    cfg = compose_cfg(args)
    assert cfg.eval_task is not None   # a fine-tuning recipe: the run ends with its benchmark
