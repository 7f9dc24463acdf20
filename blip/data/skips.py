"""Counting and logging of skipped samples: bad data is reported, never fatal."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("blip.data")


class SkipCounter:
    """Counts skipped samples by reason; logs the first `log_first` of each reason, then every `log_every`-th."""

    def __init__(self, log_first: int = 5, log_every: int = 1000) -> None:
        self.counts: Counter[str] = Counter()
        self.log_first, self.log_every = log_first, log_every
        self.muted = False  # set while fast-forwarding on resume: those samples were already counted

    def add(self, reason: str, detail: str) -> None:
        if self.muted:
            return
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.log_first or n % self.log_every == 0:
            log.warning("skipped sample (%s, #%d): %s", reason, n, detail)

    def take(self) -> dict[str, int]:
        """Counts since the last call (so batches can carry them to the main process)."""
        out = dict(self.counts)
        self.counts.clear()
        return out
