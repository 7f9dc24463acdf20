"""scripts/benchmark.py must keep running (tiny sizes, CPU): it is how speed claims are measured. Its output check
must pass on every row it times: blip and HF give the same ids / logits / losses on the same weights."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_tiny(tmp_path, one_thread):
    out, md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nkept text\n\n<!-- BEGIN cpu -->\nold\n<!-- END cpu -->\n")
    load_script().main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2", "--new-tokens", "3",
                        "--iters", "1", "--warmup", "0", "--only", "caption,blip2_t5,caption_train_step",
                        "--out", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())
    names = [r["workload"] for r in result["rows"]]
    assert names == ["caption_greedy", "caption_beam3", "blip2_t5_caption", "blip2_t5_vqa", "caption_train_step"]
    for r in result["rows"]:
        assert r["outputs_equal"] is True, r
        assert r["hf_img_s"] > 0 and r["blip_img_s"] > 0 and r["blip_flops"] > 0, r
    text = md.read_text()
    assert "kept text" in text and "old" not in text and "| caption_beam3 | 2 | yes |" in text
