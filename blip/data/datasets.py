"""Training and evaluation datasets: BLIP-style JSON annotation lists and the deterministic, resumable stream.

`ImageTextStream` is the one training pipeline for every source (webdataset shards, JSON lists, mixtures):

    per slot (rank r, worker w): units of each source (shards / chunks of annotations), permuted per (seed, epoch)
    → shuffle buffer (seeded per slot) → weighted mix of sources → decode + transform (bad samples skipped, counted)
    → batches.

An epoch is a fixed number of batches per rank (equal on every rank, as DDP needs). Logical worker w of W makes the
batches k ≡ w (mod W) of its rank, so the batch order is a function of (seed, epoch, rank, W) only; to resume at batch
b, worker w skips the batches it made before b (decoding but not transforming them) and the workers are rotated by b
so that the DataLoader's round robin hands out batch b first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip.data.collate import collate_image_text
from blip.data.mixing import Source, mixed, slot_stream
from blip.data.nlvr2 import swap_left_right
from blip.data.skips import BadSample, DatasetError, DecodeGuard, SkipCounter
from blip.data.text import answer_weights
from blip.data.webdataset import stable_id


@dataclass
class JsonSource:
    """A BLIP-style annotation list: `[{"image": relative path, "caption": str | [str, ...], "image_id"?}, ...]`
    (COCO Karpathy, VG, CC3M/CC12M, SBU as the BLIP repo ships them). One sample per (image, caption) pair.

    For VQA lists (`{"image", "question", "answer": [...]}`) use `text_field="question"`: the unique answers travel
    along as the sample's "answers" with their loss "weights": BLIP's VQAv2 rule (each answer's share of the
    annotators) or, with `answer_weight` set, that weight for every answer (BLIP gives VG-QA answers 0.2).
    Instruction lists (`{"image", "text_input", "text_output"}`, LAVIS InstructBLIP) use `text_field="text_input"`:
    the target travels along as the sample's "text_output".
    A caption that is not a string (null, a number) is skipped and counted as bad_text; an entry without the
    "image" or text field is an error naming the entry."""

    annotation: str | Path
    image_root: str | Path = ""
    text_field: str = "caption"
    answer_weight: float | None = None
    unit_size: int = 256  # annotations per unit: the granularity of splitting across ranks/workers
    pairs: list[tuple[str, object, int, dict]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pairs = []
        for index, entry in enumerate(read_annotations(self.annotation)):
            if not isinstance(entry, dict) or "image" not in entry or self.text_field not in entry:
                keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise DatasetError(f"{self.annotation}: entry {index} has {keys}, every entry needs 'image' and "
                                   f"{self.text_field!r} (for VQA lists set text_field: question); fix or drop it")
            texts = entry[self.text_field]
            texts = texts if isinstance(texts, list) else [texts]
            image_id = entry.get("image_id", entry["image"])
            image_id = image_id if isinstance(image_id, int) else stable_id(str(image_id))
            extra = self._answers(entry["answer"]) if "answer" in entry else {}
            if "text_output" in entry:   # instruction data ({image, text_input, text_output}): the target travels along
                extra["text_output"] = str(entry["text_output"])
            self.pairs += [(entry["image"], t, image_id, extra) for t in texts]

    def _answers(self, answer: str | list[str]) -> dict:
        answers, weights = answer_weights(answer if isinstance(answer, list) else [answer])
        if self.answer_weight is not None:
            weights = [float(self.answer_weight)] * len(answers)
        return {"answers": answers, "weights": weights}

    @property
    def name(self) -> str:
        return f"{self.annotation} (image_root {str(self.image_root)!r})"

    @property
    def num_samples(self) -> int:
        return len(self.pairs)

    @property
    def num_units(self) -> int:
        return -(-len(self.pairs) // self.unit_size)

    def iter_unit(self, index: int, skips: SkipCounter) -> Iterator[dict]:
        for image, text, image_id, extra in self.pairs[index * self.unit_size:(index + 1) * self.unit_size]:
            yield {"key": image, "image": Path(self.image_root) / image, "text": text, "image_id": image_id,
                   "extra": extra}


def read_annotations(path: str | Path) -> list:
    """A JSON annotation list, or DatasetError naming the file and what is wrong with it."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the annotation file ({e}); check data.root / the path") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a valid JSON annotation list ({e}); re-download or re-export it") from e
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a JSON list of entries, found {type(entries).__name__}")
    return entries


def check_text(text: object) -> str:
    """A caption as str; BadSample("bad_text") for a non-string (null), non-UTF-8 bytes or a NUL character."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("bad_text", f"caption is not UTF-8 ({e})") from None
    if not isinstance(text, str):
        raise BadSample("bad_text", f"caption is {type(text).__name__} ({text!r}), not a string")
    if "\x00" in text:
        raise BadSample("bad_text", f"caption contains a NUL character ({text[:40]!r})")
    return text


def decode(raw: dict, transform: Callable | None, text_fn: Callable[[str], str],
           max_pixels: int | None = None) -> dict:
    """Raw sample → {"pixel_values", "text", "image_id", "key", ...}; raises BadSample (bad_text, empty_text,
    too_large, bad_image) naming the sample.

    A pair sample (NLVR2: `raw["image"]` is a (left, right) tuple) gives pixel_values [2, 3, H, W], each image
    transformed on its own; with `raw["random_swap"]` the pair is swapped with probability 0.5 together with the
    words "left" / "right" of its (cleaned) text, as BLIP trains NLVR2.
    With `transform=None` the image is only decoded (used when fast-forwarding, to skip the same samples)."""
    from blip.data.images import ImageTooLargeError, load_image

    try:
        text = text_fn(check_text(raw["text"]))
    except BadSample as bad:
        raise BadSample(bad.reason, f"{raw['key']}: {bad.detail}") from None
    if not text:
        raise BadSample("empty_text", raw["key"])
    paired = isinstance(raw["image"], tuple)
    try:
        images = [load_image(p, max_pixels=max_pixels) for p in (raw["image"] if paired else [raw["image"]])]
    except ImageTooLargeError as exc:
        raise BadSample("too_large", f"{raw['key']}: {exc}") from None
    except (ValueError, OSError) as exc:  # ImageDecodeError is a ValueError; a missing file an OSError
        raise BadSample("bad_image", f"{raw['key']}: {exc}") from None
    pixel_values = None
    if transform is not None:
        pixel_values = torch.stack([transform(im) for im in images]) if paired else transform(images[0])
        if raw.get("random_swap") and torch.rand(()) < 0.5:
            pixel_values, text = pixel_values.flip(0), swap_left_right(text)
    return {"pixel_values": pixel_values, "text": text, "image_id": raw["image_id"], "key": raw["key"],
            **raw.get("extra", {})}


def _identity(text: str) -> str:
    return text


class ImageTextStream(IterableDataset):
    """Batches `{"pixel_values", "text", "image_ids", "key" (sample keys), "batch_index", "skipped"}` of one rank
    for one epoch. `transform` (image) and `text_fn` (text cleaning): one function for every source, or one per
    source."""

    def __init__(self, sources: Sequence[Source], transform: Callable | Sequence[Callable], *, batch_size: int,
                 batches_per_epoch: int,
                 weights: Sequence[float] | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000,
                 text_fn: Callable[[str], str] | Sequence[Callable[[str], str]] = _identity,
                 max_image_pixels: int | None = None, max_consecutive_failures: int = 1000) -> None:
        self.sources = list(sources)
        self.transforms = list(transform) if isinstance(transform, Sequence) else [transform] * len(self.sources)
        if len(self.transforms) != len(self.sources):
            raise ValueError(f"{len(self.transforms)} transforms for {len(self.sources)} sources")
        self.text_fns = list(text_fn) if isinstance(text_fn, Sequence) else [text_fn] * len(self.sources)
        if len(self.text_fns) != len(self.sources):
            raise ValueError(f"{len(self.text_fns)} text functions for {len(self.sources)} sources")
        self.weights = list(weights) if weights is not None else [s.num_samples for s in self.sources]
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.max_image_pixels, self.max_consecutive_failures = max_image_pixels, max_consecutive_failures
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iterator starts (set before creating the DataLoader iterator)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _samples(self, slot: int, num_slots: int, skips: SkipCounter, seeds: list[int]) -> Iterator[dict]:
        streams = [slot_stream(s, seed=self.seed + 1000 * i, epoch=self.epoch, slot=slot, num_slots=num_slots,
                               skips=skips, shuffle_buffer=self.shuffle_buffer, rng=np.random.default_rng(seeds + [i]))
                   for i, s in enumerate(self.sources)]
        streams = [_tagged(stream, i) for i, stream in enumerate(streams)]
        return mixed(streams, self.weights, np.random.default_rng(seeds + [len(self.sources)]))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        logical = (worker + self.start_batch) % num_workers  # rotation: DataLoader worker 0 makes batch start_batch
        slot, num_slots = self.rank * num_workers + logical, self.world_size * num_workers
        seeds = [self.seed, self.epoch, slot, num_slots]
        skips = SkipCounter()
        guard = DecodeGuard([source_name(s) for s in self.sources], self.max_consecutive_failures)
        raw = self._samples(slot, num_slots, skips, seeds)
        counter = 0
        for k in range(logical, self.batches_per_epoch, num_workers):
            fast_forward = k < self.start_batch
            skips.muted = fast_forward
            samples = []
            while len(samples) < self.batch_size:
                sample = next(raw)
                counter += 1
                # augmentation randomness is a function of the sample's place in the stream, not of worker state
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((*seeds, counter)) & 0x7FFF_FFFF_FFFF_FFFF)
                    try:
                        out = decode(sample, None if fast_forward else self.transforms[sample["source"]],
                                     self.text_fns[sample["source"]], self.max_image_pixels)
                    except BadSample as bad:
                        skips.add(bad.reason, bad.detail)
                        guard.failed(sample["source"], sample["pass"], bad)
                        continue
                guard.decoded(sample["source"], sample["pass"])
                samples.append(out)
            if fast_forward:
                continue
            batch = collate_image_text(samples)
            batch["batch_index"] = k
            batch["skipped"] = skips.take()
            yield batch


def _tagged(stream: Iterator[dict], source: int) -> Iterator[dict]:
    for sample in stream:
        sample["source"] = source
        yield sample


def source_name(source: Source) -> str:
    return getattr(source, "name", type(source).__name__)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training threads


@dataclass
class TrainData:
    """The training stream of one rank plus what the trainer needs to know about it."""

    dataset: ImageTextStream
    num_workers: int = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        self.dataset.set_position(epoch, start_batch)
        if start_batch >= self.batches_per_epoch:
            return iter(())
        # an own generator: creating the iterator must not draw from the global RNG (a resumed run creates it at
        # another point of the RNG stream than the uninterrupted run did)
        generator = torch.Generator().manual_seed(self.dataset.seed * 100_003 + epoch)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, generator=generator,
                            worker_init_fn=_worker_init if self.num_workers else None,
                            prefetch_factor=4 if self.num_workers else None)
        return iter(loader)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size``, the last one shorter (``itertools.batched`` from Python 3.12, as lists)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def eval_batches(source: Source, transform: Callable, batch_size: int,
                 text_fn: Callable[[str], str] = _identity, max_image_pixels: int | None = None) -> Iterator[dict]:
    """Every readable sample of `source` once, in order, unaugmented (for held-out evaluation on rank 0)."""
    skips = SkipCounter()

    def samples() -> Iterator[dict]:
        for unit in range(source.num_units):
            for raw in source.iter_unit(unit, skips):
                try:
                    yield decode(raw, transform, text_fn, max_image_pixels)
                except BadSample as bad:
                    skips.add(bad.reason, bad.detail)

    for batch in batched(samples(), batch_size):
        yield collate_image_text(batch)
