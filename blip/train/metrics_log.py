"""Metric sinks of the main rank: JSONL file, TensorBoard, and the tqdm progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricLogger:
    """Writes one JSON line per logged step and the same scalars to TensorBoard; inert on non-main ranks."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True, total_steps: int = 0,
                 initial_step: int = 0, progress_bar: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train")

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def progress(self, n: int, postfix: dict[str, str] | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
