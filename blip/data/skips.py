"""Bad samples: skipped, counted and logged — and the guard that stops a job whose source yields nothing usable.

A single bad sample is never fatal (web data always has some). A source that yields no decodable sample in a full
pass, or only failures `max_consecutive_failures` times in a row, is misconfigured (a wrong `image_root`, shards of
HTML error pages, empty captions): waiting for a batch that never comes would hang the job, so it stops with a
`DatasetError` naming the source, the reasons and the first failing samples.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("blip.data")


class DatasetError(ValueError):
    """A dataset that cannot be used as configured. The message names the file (and entry) and the fix."""


class BadSample(Exception):
    """One sample that cannot be used; `reason` is the skip counter's key (bad_image, too_large, bad_text...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SkipCounter:
    """Cumulative skip counts by reason, with rate-limited logging: the first `log_first` skips of each reason are
    logged one by one, after that at most one line per `log_interval_s` seconds with the running totals.

    `counts` are the totals since creation; `take()` returns the counts added since its previous call (batches
    carry those to the main process, which keeps the run's totals)."""

    def __init__(self, log_first: int = 5, log_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, record: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self.records: list[dict] | None = [] if record else None  # {"reason", "detail"} of every skip, if asked
        self._pending: Counter[str] = Counter()
        self.log_first, self.log_interval_s, self.clock = log_first, log_interval_s, clock
        self._last_summary = clock()
        self.muted = False  # set while fast-forwarding on resume: those samples were already counted

    def add(self, reason: str, detail: str, n: int = 1) -> None:
        if self.muted:
            return
        self.counts[reason] += n
        self._pending[reason] += n
        if self.records is not None:
            self.records.append({"reason": reason, "detail": detail, **({"count": n} if n != 1 else {})})
        total = self.counts[reason]
        if total - n < self.log_first:
            log.warning("skipped sample (%s, #%d): %s", reason, total, detail)
        elif self.clock() - self._last_summary >= self.log_interval_s:
            self._last_summary = self.clock()
            log.warning("skipped samples so far: %s (latest: %s: %s)", dict(self.counts), reason, detail)

    def take(self) -> dict[str, int]:
        """Counts added since the last call."""
        out = dict(self._pending)
        self._pending.clear()
        return out

    def take_records(self) -> list[dict]:
        """The recorded skips since the last call (with `record=True`)."""
        out, self.records = self.records or [], [] if self.records is not None else None
        return out


@dataclass
class _SourceHealth:
    pass_index: int = 0
    seen: int = 0          # samples of the current pass that reached decoding
    decoded: int = 0       # ... and decoded
    consecutive: int = 0   # failures since the last decoded sample
    reasons: Counter = field(default_factory=Counter)
    first_failures: list[str] = field(default_factory=list)


class DecodeGuard:
    """Watches the decoded (not the raw) samples of each source and raises `DatasetError` when a source yields
    nothing usable: a whole pass without one decoded sample, or `max_consecutive` failures in a row.

    Call `decoded(source, pass_index)` / `failed(source, pass_index, bad)` for every sample that reaches decoding."""

    def __init__(self, names: Sequence[str], max_consecutive: int = 1000) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {max_consecutive}")
        self.names, self.max_consecutive = list(names), max_consecutive
        self.health = [_SourceHealth() for _ in self.names]

    def _new_pass(self, source: int, pass_index: int) -> _SourceHealth:
        h = self.health[source]
        if pass_index != h.pass_index:
            if h.seen and not h.decoded:
                self._fail(source, f"no sample decoded in a full pass over the source ({h.seen} tried)")
            h.pass_index, h.seen, h.decoded = pass_index, 0, 0
        h.seen += 1
        return h

    def decoded(self, source: int, pass_index: int) -> None:
        h = self._new_pass(source, pass_index)
        h.decoded += 1
        h.consecutive = 0

    def failed(self, source: int, pass_index: int, bad: BadSample) -> None:
        h = self._new_pass(source, pass_index)
        h.consecutive += 1
        h.reasons[bad.reason] += 1
        if len(h.first_failures) < 3:
            h.first_failures.append(bad.detail)
        if h.consecutive >= self.max_consecutive:
            self._fail(source, f"{h.consecutive} consecutive samples failed to decode")

    def _fail(self, source: int, what: str) -> None:
        h = self.health[source]
        firsts = "\n  ".join(h.first_failures)
        raise DatasetError(
            f"dataset {self.names[source]}: {what}; skip reasons {dict(h.reasons)}; first failures:\n  {firsts}\n"
            "Check the source's paths (image_root, shard URLs) and its files (images, captions); "
            "data.max_consecutive_failures sets the limit.")
