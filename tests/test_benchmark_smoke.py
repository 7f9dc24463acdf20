"""scripts/benchmark.py must keep running (tiny sizes, CPU): it is how speed claims are measured on a GPU."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--size", "tiny", "--device", "cpu",
                    "--dtype", "fp32", "--batch", "2", "--new-tokens", "3", "--iters", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    for key in ("blip_caption_beam1", "blip_caption_beam3", "blip_caption_train_step", "blip2_opt_greedy"):
        assert result[key]["hf_img_s"] > 0 and result[key]["blip_img_s"] > 0
