"""Metric sinks of the main rank: JSONL file, TensorBoard, and the tqdm progress bar.

A failing sink (a full disk, a broken TensorBoard writer) is reported and the step goes on: metrics are a record
of training, not a reason to stop it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm import tqdm


log = logging.getLogger("blip.train")


class MetricLogger:
    """Writes one JSON line per logged step and the same scalars to TensorBoard; inert on non-main ranks.

    A run resumed at `initial_step` drops the records after that step (they are logged again as the run repeats
    those steps), so metrics.jsonl holds one record per step."""

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
        self.path = run_dir / "metrics.jsonl"
        if initial_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= initial_step]
            self.path.write_text("".join(kept))
        self.jsonl = open(self.path, "a", buffering=1)
        self.failing: set[str] = set()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=initial_step + 1 if initial_step else None)
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train")

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self._guarded("metrics.jsonl", lambda: self.jsonl.write(json.dumps(record) + "\n"), step)
        if self.tb is not None:
            self._guarded("tensorboard", lambda: [self.tb.add_scalar(f"{prefix}/{k}", v, step)
                                                  for k, v in metrics.items()], step)

    def _guarded(self, sink: str, write, step: int) -> None:
        """Run one sink's write; report its first failure (and its recovery) instead of ending the run."""
        try:
            write()
        except Exception as e:  # noqa: BLE001 - any sink failure: the training step itself is fine
            if sink not in self.failing:
                log.error("metrics sink %s failed at step %d (%s: %s); training continues, this sink's records "
                          "are missing until it recovers", sink, step, type(e).__name__, e)
            self.failing.add(sink)
            return
        if sink in self.failing:
            self.failing.discard(sink)
            log.warning("metrics sink %s works again at step %d", sink, step)

    def progress(self, n: int, postfix: dict[str, str] | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink, close in (("metrics.jsonl", self.jsonl), ("tensorboard", self.tb)):
            if close is not None:
                self._guarded(sink, close.close, -1)
