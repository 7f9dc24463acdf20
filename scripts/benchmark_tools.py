"""Measurement helpers of scripts/benchmark.py: interleaved timing, peak memory, FLOPs, the markdown record."""
from __future__ import annotations

import ctypes
import gc
import os
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``): memory an earlier call freed would
    otherwise stay resident and be reused without growing the RSS, hiding the next call's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS growth is a lower bound
        pass


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or on CPU the RSS sampled every 2 ms after
    :func:`release_free_heap`."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            release_free_heap()
            self.base, self.stop = rss_bytes(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes() - self.base)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, rss_bytes() - self.base)


def count_flops(fn: Callable[[], object], inference_of: torch.nn.Module | None = None) -> int:
    """FLOPs of one call (matmuls, convolutions, attention: what ``torch.utils.flop_counter`` counts).

    inference_of: the model an inference call runs (its parameters stop requiring grad meanwhile: the counter's
    module tracker cannot hook tensors that require grad under inference mode)."""
    flags = [] if inference_of is None else [(p, p.requires_grad) for p in inference_of.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return counter.get_total_flops()


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device and dtype (the denominator of model FLOP utilisation)."""
    n = 8192 if device.startswith("cuda") else 2048  # 1024 on a CPU reads 15-25% under the models' own matmuls
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


class Race:
    """Times several sides of one workload interleaved (side A, side B, A, B, ...), so that a machine that
    speeds up or slows down during the run affects both alike. Medians; peak memory from one extra call each."""

    def __init__(self, device: str, iters: int, warmup: int):
        self.device, self.iters, self.warmup = device, iters, warmup

    def __call__(self, sides: dict[str, Callable[[], object]]) -> dict[str, dict]:
        for fn in sides.values():
            for _ in range(self.warmup):
                fn()
        times = {name: [] for name in sides}
        for _ in range(self.iters):
            for name, fn in sides.items():
                sync(self.device)
                t0 = time.perf_counter()
                fn()
                sync(self.device)
                times[name].append(time.perf_counter() - t0)
        result = {}
        for name, fn in sides.items():
            with PeakMemory(self.device) as mem:
                fn()
            result[name] = {"s": statistics.median(times[name]), "peak_mb": mem.peak / 2 ** 20}
        return result


def row(name: str, batch: int, equal: bool | None, timing: dict[str, dict], flops: int | None = None,
        **extra) -> dict:
    """One record: images/s, ratio, peak memory of ``hf`` and ``blip`` (and ``blip_compiled`` when timed)."""
    out = {"workload": name, "batch": batch, "outputs_equal": equal, **extra}
    for side, t in timing.items():
        out[f"{side}_img_s"] = batch / t["s"]
        out[f"{side}_s"] = t["s"]
        out[f"{side}_peak_mb"] = round(t["peak_mb"], 1)
    if "hf" in timing:
        for side in timing:
            if side != "hf":
                out[f"{side}_ratio"] = timing["hf"]["s"] / timing[side]["s"]
    out["blip_flops"] = flops
    return out


# ---- docs/benchmarks.md ---------------------------------------------------------------------------------------

COLUMNS = [("workload", "workload"), ("batch", "batch"), ("outputs_equal", "outputs equal"),
           ("hf_s", "HF s/call"), ("blip_s", "blip s/call"), ("hf_img_s", "HF img/s"), ("blip_img_s", "blip img/s"),
           ("blip_ratio", "ratio"),
           ("blip_compiled_img_s", "blip compiled img/s"), ("blip_compiled_ratio", "compiled ratio"),
           ("hf_peak_mb", "HF peak MB"), ("blip_peak_mb", "blip peak MB"), ("blip_mfu", "blip MFU"),
           ("ratio_at_peak", "ratio at 100% MFU")]


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key == "outputs_equal":
        return "yes" if value else "NO"
    if key == "blip_mfu":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.2f}" if key.endswith(("ratio", "_s")) else f"{value:.1f}"
    return str(value)


def table(out: dict) -> str:
    env = out["environment"]
    lines = [f"Run {env['date']} on {env['device']} ({env['cpu_threads']} CPU threads, load average "
             f"{env['load_average']}), torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}, "
             f"size {env['size']}, {env['new_tokens']} new tokens, median of {env['iters']}; matmul peak "
             f"{out['matmul_peak_tflops']:.2f} TFLOP/s. {env['note']}".rstrip(), "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in out["rows"]:
        lines.append("| " + " | ".join(_cell(key, r.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, out: dict) -> None:
    """Replace this device kind's section (between ``<!-- BEGIN cpu -->`` / ``<!-- END cpu -->`` or the ``gpu``
    pair) of ``path`` with the run's table; the rest of the file is kept."""
    kind = "cpu" if out["environment"]["device_kind"] == "cpu" else "gpu"
    begin, end = f"<!-- BEGIN {kind} -->", f"<!-- END {kind} -->"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: f"{begin}\n{table(out)}\n{end}", text))
