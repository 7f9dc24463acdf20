"""The README's examples run verbatim, so they cannot drift from the code.

Every ```bash and ```python block of README.md runs, unchanged, in a directory set up like a fresh clone after the
quick start: the repository's files at their relative paths, `.venv` (this interpreter's environment, with this
checkout's `blip` first on PYTHONPATH), a fresh `~` (so `~/.cache/blip` holds only what the quick start puts there) and
`outputs/` with the quick-start runs, which this test trains at a tiny size (the same commands with fewer steps and
less data; the README's commands are exercised, not its models' quality). The blocks in NOT_RUN are left out, each
with its reason; every other block must exit 0 and print what its check in CHECKS expects. Blocks are named by
the start of their first line.
"""
import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)
# blocks this test does not run -> why
NOT_RUN = {
    "# 1. set up and run the main job":
        "installs, trains for minutes and runs the whole suite: the quick start itself (.ci/run runs it); its runs "
        "are built here at a tiny size",
    ".venv/bin/python scripts/train.py stage=2": "the quick start's stage 2 (76 s): built here at a tiny size",
    ".venv/bin/python scripts/train.py stage=1 trainer.max_steps=200":
        "a 200-step run and multi-GPU launches (torchrun, released LLMs and datasets)",
}
# the quick start (scripts/train.py stage=1, then stage=2) at a tiny size: same configs, a few steps on little data
TINY = ["data.synthetic.num_train=64", "data.synthetic.num_val=12", "data.synthetic.shard_size=32",
        "trainer.batch_size=8", "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.tensorboard=false",
        "eval.enabled=false", "model.vision_init=null"]
STAGE2 = ["trainer.llm_warmup_steps=2"]
PORT = 8000   # the serve example's


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def name(code: str) -> str:
    """The entry of NOT_RUN or CHECKS that the block's first line starts with."""
    head = code.splitlines()[0].strip()
    found = [key for key in [*NOT_RUN, *CHECKS] if head.startswith(key)]
    assert len(found) == 1, f"README block {head!r}: run it here (CHECKS) or say why not (NOT_RUN)"
    return found[0]


def check_labelling(out: str, work: Path) -> None:
    """caption-dir's summary and JSONL, three match lines (ITM, ITC, text), the server's predict answer."""
    lines = out.splitlines()
    summary = [line for line in lines if line.startswith("captioned ")]
    assert summary == ["captioned 12, skipped 0 (unreadable: captions.errors.jsonl), already done 0 -> captions.jsonl"]
    records = [json.loads(line) for line in (work / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 12 and json.loads(lines[lines.index(summary[0]) + 1]) == records[0]   # head -1
    assert all(r.keys() == {"key", "shard", "caption", "model", "settings"} and r["caption"].strip() for r in records)
    assert {r["model"] for r in records} == {"outputs/stage2_blip2_tiny_opt_synthetic"}
    scores = [line.split("\t") for line in lines if re.fullmatch(r"\d\.\d{4}\t-?\d\.\d{4}\t.+", line)]
    assert [s[2] for s in scores] == ["a large white triangle in the bottom left", "a small red circle in the top left",
                                      "a large white triangle in the top right"]
    assert all(0 <= float(itm) <= 1 and -1 <= float(itc) <= 1 for itm, itc, _ in scores)
    answers = [json.loads(line) for line in lines if line.startswith('{"output"')]   # curl: the server's reply
    assert len(answers) == 1 and list(answers[0]) == ["output"] and answers[0]["output"].strip()


def check_python_api(out: str, work: Path) -> None:
    """Two captions, then the ITC similarities and ITM probabilities of one image with two texts."""
    captions, scores = out.splitlines()
    captions = ast.literal_eval(captions)
    assert len(captions) == 2 and all(isinstance(c, str) and c.strip() for c in captions)
    found = re.fullmatch(r"tensor\(\[\[(\S+), (\S+)\]\]\) tensor\(\[\[(\S+), (\S+)\]\]\)", scores)   # [1, 2] each
    assert found, scores
    itc, itm = [float(v) for v in found.groups()[:2]], [float(v) for v in found.groups()[2:]]
    assert all(-1 <= v <= 1 for v in itc) and all(0 <= v <= 1 for v in itm)


def check_tensor_api(out: str, work: Path) -> None:
    """The input's shape, device and dtype; the ITC cosine at tensor level equal to the string API's; the version and
    the first zoo names."""
    from importlib.metadata import version
    shape, scores, names = out.splitlines()
    found = re.fullmatch(r"\(1, 3, (\d+), (\d+)\) cpu torch\.float32", shape)
    assert found and found[1] == found[2], shape
    tensor_level, string_level = scores.split()
    assert tensor_level == string_level and -1 <= float(tensor_level) <= 1, scores
    assert names == f"{version('blip')} ['blip-base', 'blip-base-capfilt-large']", names


def check_new_rows(out: str, work: Path) -> None:
    """The rows of the fine-tuning example: 512 + 64 captions of the new style, each naming its image."""
    root = work / "data" / "shapes_new_style"
    for split, n in (("train", 512), ("val", 64)):
        rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n and all((root / r["image"]).is_file() and len(r["caption"].split()) in (3, 4)
                                      for r in rows)


def check_fine_tuning(out: str, work: Path) -> None:
    """Two task=custom runs (full, LoRA) with their before / after lines, then caption-dir with the full run."""
    changes = [line for line in out.splitlines() if line.startswith("held-out caption rows (64), before -> after")]
    assert len(changes) == 2 and all("bleu4" in line and "cider" in line for line in changes), out[-3000:]
    for name in ("custom", "custom_lora"):
        results = json.loads(next((work / "outputs" / name).glob("*/results.json")).read_text())
        assert results["before"]["num_items"] == results["after"]["num_items"] == 64
    assert "captioned 576, skipped 0" in out
    first = json.loads(out.splitlines()[-2])   # head -2
    assert first["model"] == "outputs/custom" and first["caption"].strip()


# blocks that run -> the check of what they printed
def check_replicate_client(out: str, work: Path) -> None:
    """The Replicate Python client, pointed at the server, prints the caption the server made (one line between the
    server's access log lines, the last of them the client's version lookup)."""
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("INFO:")]
    assert len(lines) == 1 and lines[0].strip(), out
    assert '"POST /v1/predictions HTTP/1.1" 201' in out, out


CHECKS = {
    "# 1. caption a folder (recursive), a text file of paths, or local shards into JSONL": check_labelling,
    "import blip": check_python_api,
    "# the tensor API, fed as the string API feeds it": check_tensor_api,
    "export BLIP_SERVE_API_TOKEN=": check_replicate_client,
    "import json, pathlib": check_new_rows,
    ".venv/bin/python scripts/train.py task=custom": check_fine_tuning,
}


def test_every_block_is_run_or_listed_with_a_reason():
    assert sorted(name(code) for _, code in blocks()) == sorted([*NOT_RUN, *CHECKS])   # each entry names one block


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh clone after the quick start (tiny runs) and the environment its commands run in."""
    tmp = tmp_path_factory.mktemp("readme")
    work, home = tmp / "clone", tmp / "home"
    work.mkdir()
    home.mkdir()
    for entry in ROOT.iterdir():   # the repository's files, at their relative paths
        if entry.name not in (".git", ".venv", "outputs", "data") and not entry.name.startswith((".pytest", ".ruff")):
            (work / entry.name).symlink_to(entry)
    (work / ".venv").symlink_to(sys.prefix)   # the environment itself: its python finds its pyvenv.cfg
    assert (work / ".venv/bin/blip").is_file(), f"the blip command is not installed in {sys.prefix} (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "BLIP_CACHE"}
    env.update(HOME=str(home), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for stage, extra in (("1", []), ("2", STAGE2)):
        res = subprocess.run([str(work / ".venv/bin/python"), "scripts/train.py", f"stage={stage}", *TINY, *extra],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stage2 = work / "outputs" / "stage2_blip2_tiny_opt_synthetic"
    assert len(list((work / "outputs").glob("stage*/*/checkpoints/step_*/state.pt"))) == 2
    # a newer stage-2 run still before its first checkpoint: `outputs/<name>` passes over it
    newer = stage2 / "9999-12-31_23-59-59"
    (newer / "checkpoints").mkdir(parents=True)
    shutil.copy(next(stage2.glob("*/config.yaml")), newer / "config.yaml")
    return work, env


def run_block(lang: str, code: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    """One block, verbatim, in its own process group, killed when the block ends (a server a failed block left in
    the background); output goes to files, which a leftover process cannot hold open as it would a pipe."""
    python = str(work / ".venv/bin/python")
    cmd = ["bash", "-e", "-o", "pipefail", "-c", code] if lang == "bash" else [python, "-c", code]
    with open(work.parent / "block.out", "w+") as out, open(work.parent / "block.err", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=240)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


@pytest.mark.slow
def test_readme_blocks_run_verbatim(clone):
    work, env = clone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", PORT)) != 0, f"port {PORT} is taken: the serve example needs it"
    # the README's shape: the first held-out image of the quick-start data, which the tiny data shares
    shard = next((Path(env["HOME"]) / ".cache/blip/synthetic").glob("shapes-*/val-000000.tar"))
    with tarfile.open(shard) as tar:
        assert tar.extractfile("100000000.jpg").read() == (ROOT / "examples" / "shape.jpg").read_bytes()
    ran = []
    for lang, code in blocks():
        head = name(code)
        if head in NOT_RUN:
            continue
        res = run_block(lang, code, work, env)
        assert res.returncode == 0, f"README block {head!r} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        CHECKS[head](res.stdout, work)
        ran.append(head)
    assert sorted(ran) == sorted(CHECKS)
