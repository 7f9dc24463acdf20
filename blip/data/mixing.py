"""Deterministic stream plumbing: per-epoch unit order, rank/worker slots, shuffle buffer, weighted mixing.

Everything here is a pure function of its seeds, so the sample order of an epoch is a function of
(seed, epoch, rank, worker) and a resumed run can replay it exactly.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from blip.data.skips import DatasetError, SkipCounter

log = logging.getLogger(__name__)


class Source(Protocol):
    num_samples: int

    @property
    def num_units(self) -> int: ...

    def iter_unit(self, index: int, skips: SkipCounter) -> Iterator[dict]: ...


def slot_stream(source: Source, *, seed: int, epoch: int, slot: int, num_slots: int, skips: SkipCounter,
                shuffle_buffer: int = 0, rng: np.random.Generator | None = None) -> Iterator[dict]:
    """Endless raw samples of one slot (= one worker of one rank): its share of the units, re-permuted every pass,
    shuffled through a buffer within each pass (so a pass is read in full before the next begins).

    With at least as many units (shards) as slots each slot reads its own units; with fewer, every slot reads all
    units and keeps every `num_slots`-th sample, so small datasets still split evenly.
    """
    rng = rng if rng is not None else np.random.default_rng([seed, epoch, slot])
    for pass_index in itertools.count():
        order = np.random.default_rng([seed, epoch, pass_index]).permutation(source.num_units)
        produced = 0
        for sample in shuffled(_one_pass(source, order, slot, num_slots, skips), shuffle_buffer, rng):
            produced += 1
            sample["pass"] = pass_index  # the decode guard tells passes apart
            yield sample
        if produced == 0:
            name = getattr(source, "name", type(source).__name__)
            raise DatasetError(f"dataset {name}: slot {slot}/{num_slots} read no sample in a full pass over its "
                               f"{source.num_units} units (skips so far: {dict(skips.counts)}); check that the "
                               "shards / annotation files exist and are readable")


def _one_pass(source: Source, order: np.ndarray, slot: int, num_slots: int, skips: SkipCounter) -> Iterator[dict]:
    if source.num_units >= num_slots:
        for unit in order[slot::num_slots]:
            yield from source.iter_unit(int(unit), skips)
        return
    counter = 0
    for unit in order:
        for sample in source.iter_unit(int(unit), skips):
            if counter % num_slots == slot:
                yield sample
            counter += 1


def shuffled(stream: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle through a buffer of `buffer_size` samples (1 or less: no shuffling)."""
    if buffer_size <= 1:
        yield from stream
        return
    buffer: list[dict] = []
    for sample in stream:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def mixed(streams: Sequence[Iterator[dict]], weights: Sequence[float], rng: np.random.Generator,
          block: int = 1000) -> Iterator[dict]:
    """Interleave endless streams, stream i giving weights[i] / sum(weights) of the samples.

    Like a shuffled concatenation (BLIP's ConcatDataset), the shares are exact rather than drawn: each block of
    `block` samples takes floor or ceil of p_i * block from stream i (systematic sampling with a random offset,
    so the expected count is exactly p_i * block) in a random order.
    """
    if len(streams) == 1:
        yield from streams[0]
        return
    p = np.asarray(weights, dtype=np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {list(weights)}")
    edges = np.cumsum(p / p.sum())
    while True:
        points = (np.arange(block) + rng.random()) / block
        labels = np.minimum(np.searchsorted(edges, points, side="right"), len(streams) - 1)
        rng.shuffle(labels)
        for i in labels:
            yield next(streams[int(i)])


def mixing_weights(names: Sequence[str], sizes: Sequence[int], weights: Sequence[float | None]) -> list[float]:
    """Each source's share of the mix: proportional to its size when no weight is given (BLIP / LAVIS concatenate
    their datasets), the given weights otherwise (all or none). Logs the effective shares."""
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        missing = [n for n, g in zip(names, given) if not g]
        raise ValueError(f"data.datasets: `weight` is set on some datasets but not on {missing}; set it on all of "
                         f"them, or on none to mix in proportion to their sizes")
    shares = [float(w) for w in weights] if all(given) else [float(n) for n in sizes]
    total = sum(shares)
    if total <= 0 or min(shares) < 0:
        raise ValueError(f"data.datasets: mixing weights must be >= 0 with a positive sum, "
                         f"got {shares} for {list(names)}")
    how = "explicit weights" if all(given) else "proportional to size"
    log.info("data mix (%s): %s", how, ", ".join(f"{n} {100 * s / total:.2f}% ({size:,} samples)"
                                                 for n, s, size in zip(names, shares, sizes)))
    return shares
