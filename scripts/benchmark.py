"""The performance record: blip against HF transformers, side by side in one run, on identical weights.

Every HF model is built from a config of the chosen size with random weights, saved with ``save_pretrained`` and
loaded into blip with ``blip.load`` — so both sides hold the same weights. For each workload the script first
checks that both sides give the same outputs (token ids, or logits / losses within a tolerance), then times both
interleaved (warm-up, device synchronisation, median of the repeats), and reports images/s, the ratio blip / HF,
peak memory and blip's model FLOP utilisation (FLOPs counted by ``torch.utils.flop_counter`` against a measured
matmul peak of this device and dtype). Generation uses min = max new tokens, so both sides do the same work.

    python scripts/benchmark.py --device cpu --size real --batch 8              # the CPU record
    python scripts/benchmark.py --device cuda --dtype bf16 --size real --batch 64 --best-batches 64,256,1024 --compile
    python scripts/benchmark.py --size tiny --device cpu                         # a fast check that everything runs
    python scripts/benchmark.py ... --out bench.json --markdown docs/benchmarks.md

Sizes: ``real`` is BLIP-base (ViT-B/16 at 384 px) and, on a GPU, BLIP-2 ViT-g + OPT-2.7b / FlanT5-XL; on a CPU
the BLIP-2 rows use ViT-g with OPT-125m / FlanT5-small-sized language models (the 2.7B/3B models need ~28 GB for
two copies). ``tiny`` is for tests. Rows without an HF counterpart (pretraining steps) report blip alone.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

# this checkout's blip, not whichever is installed: a record must describe the code it was run from
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from benchmark_tools import Race, matmul_peak, write_markdown  # noqa: E402
from benchmark_workloads import WORKLOADS  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    p.add_argument("--size", choices=("tiny", "real"), default="real" if cuda else "tiny")
    p.add_argument("--batch", type=int, default=8, help="the moderate batch every workload runs at")
    p.add_argument("--best-batches", default="", help="comma-separated batches to search each side's fastest "
                   "generation batch over (HF is overhead-bound at small batch), e.g. 64,256,1024")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--iters", type=int, default=3, help="timed repeats per side (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time blip with compile=True (CUDA graphs on GPU)")
    p.add_argument("--only", default="", help=f"comma-separated workloads; known: {','.join(WORKLOADS)}")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--markdown", default=None, help="write the table here (docs/benchmarks.md)")
    p.add_argument("--note", default="", help="free text stored with the run (e.g. the machine's load average)")
    args = p.parse_args(argv)
    args.torch_dtype = DTYPES[args.dtype]
    args.best_batches = [int(b) for b in args.best_batches.split(",") if b]
    return args


def environment(args) -> dict:
    import transformers
    cuda = args.device.startswith("cuda")
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"device_kind": "cuda" if cuda else "cpu", "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
            "cpu_threads": torch.get_num_threads(), "load_average": load, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "dtype": args.dtype,
            "size": args.size, "batch": args.batch, "new_tokens": args.new_tokens, "iters": args.iters,
            "compile": args.compile, "note": args.note}


def main(argv=None) -> dict:
    args = parse_args(argv)
    only = [w for w in args.only.split(",") if w]
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    race = Race(args.device, args.iters, args.warmup)
    out = {"environment": environment(args), "matmul_peak_tflops": matmul_peak(args.device, args.torch_dtype) / 1e12,
           "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, workload in WORKLOADS.items():
            if only and name not in only:
                continue
            rows = workload(args, Path(tmp) / name, race)
            for row in rows:
                row.setdefault("workload", name)
                add_utilisation(row, out["matmul_peak_tflops"] * 1e12)
                print(json.dumps(row), flush=True)
            out["rows"] += rows
            save(args, out)  # after every workload: a run cut short by a time limit keeps what it measured
    return out


def add_utilisation(row: dict, peak_flops: float) -> None:
    """blip's model FLOP utilisation, and the ratio to HF that blip would reach at the measured matmul peak (its
    FLOPs at 100% utilisation against HF's measured time): the most any implementation of those FLOPs can gain."""
    if row.get("blip_flops") and row.get("blip_s"):
        row["blip_mfu"] = row["blip_flops"] / row["blip_s"] / peak_flops
        if row.get("hf_s"):
            row["ratio_at_peak"] = row["hf_s"] / (row["blip_flops"] / peak_flops)


def save(args, out: dict) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.markdown:
        write_markdown(Path(args.markdown), out)


if __name__ == "__main__":
    main()
