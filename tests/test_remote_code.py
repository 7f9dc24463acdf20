"""No code from a model directory ever runs: an LLM / tokenizer / HF directory whose config.json has an `auto_map`
to its own .py files is refused even when "y" is typed at transformers' prompt, and every transformers
`from_pretrained` call in the package goes through the one loader that sets `trust_remote_code=False`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINTS = """
import sys
import blip
from blip.data.tokenizer import get_tokenizer

directory = sys.argv[1]
def attempt(name, fn):
    try:
        fn()
        print(f"{name}: loaded")
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")

attempt("llm", lambda: blip.create_model("blip2_tiny_opt", "stage2", llm=directory))
attempt("hf_dir", lambda: blip.load(directory))
model = blip.create_model("blip2_tiny_opt", "stage2")
model.config.tokenizer = directory
attempt("llm_tokenizer", lambda: model.tokenizer)
attempt("bert_tokenizer", lambda: get_tokenizer("blip", directory))
"""


def remote_code_dir(root: Path, marker: Path) -> Path:
    """An HF-style directory whose config maps AutoConfig / AutoModelForCausalLM / AutoTokenizer to its own code;
    importing any of its modules creates `marker`."""
    d = root / "llm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "planted_lm", "architectures": ["Blip2ForConditionalGeneration"], "vocab_size": 16,
        "auto_map": {"AutoConfig": "configuration_planted.PlantedConfig",
                     "AutoModelForCausalLM": "modeling_planted.PlantedLM",
                     "AutoTokenizer": ["tokenization_planted.PlantedTokenizer", None]}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [
        "tokenization_planted.PlantedTokenizer", None]}}))
    code = f"open({str(marker)!r}, 'w').write('the directory ran its code')\n"
    for module in ("configuration_planted", "modeling_planted", "tokenization_planted"):
        (d / f"{module}.py").write_text(code)
    return d


def test_auto_map_code_never_runs_even_when_y_is_typed(tmp_path):
    marker = tmp_path / "PWNED"
    directory = remote_code_dir(tmp_path, marker)
    out = subprocess.run([sys.executable, "-c", ENTRY_POINTS, str(directory)], input="y\ny\ny\ny\n", cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert not marker.exists(), out.stdout + out.stderr[-2000:]
    results = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert set(results) == {"llm", "hf_dir", "llm_tokenizer", "bert_tokenizer"}, out.stderr[-2000:]
    for name in ("llm", "hf_dir", "llm_tokenizer"):
        assert results[name].startswith("CheckpointError") and "never runs a model directory's code" in results[name]
        assert str(directory) in results[name]
    assert not results["bert_tokenizer"].endswith("loaded")  # no vocab there: an error, and no code ran


def test_every_from_pretrained_call_refuses_remote_code():
    """AST scan: each `.from_pretrained(...)` call in blip/ and scripts/ passes trust_remote_code=False (in
    practice: the one loader, blip.checkpoints.hf_pretrained)."""
    offenders = []
    for path in [*ROOT.glob("blip/**/*.py"), *ROOT.glob("scripts/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                flag = next((k.value for k in node.keywords if k.arg == "trust_remote_code"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
