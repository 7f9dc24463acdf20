"""CapFilt (BLIP paper §3.3): bootstrap a noisy image–text dataset with a captioner and a filter; the job.

The two steps: :mod:`blip.capfilt.captioner` (sampling synthetic captions) and :mod:`blip.capfilt.filter` (ITM
scores, the keep rule). This module runs them over sharded inputs, resumably.

For every image the captioner (a COCO-fine-tuned :class:`~blip.models.blip_tasks.BlipCaption`) samples
``num_captions`` synthetic captions (nucleus sampling, top_p 0.9); the filter (a COCO-fine-tuned
:class:`~blip.models.blip_tasks.BlipRetrieval`) scores the web caption(s) and the synthetic ones with its ITM head,
and captions whose match probability is under ``threshold`` are dropped (BLIP's filter: ITM, threshold 0.5).

Output (``out_dir``), in the img2dataset layout the project's loader (:class:`blip.data.webdataset.WebDatasetSource`)
reads:
- ``shards/UUUUU-CCCC.tar``: one sample per kept (image, caption) pair: ``{key}.jpg|png|webp`` (the original image
  bytes), ``{key}.txt`` (the caption), ``{key}.json`` (``image_id`` shared by all captions of an image,
  ``source_key``, ``caption_source`` "web"/"synthetic", ``itm_score``);
- ``index.json``: one record per input image with every caption (text, source, ITM score, kept, output key) and,
  for JSON inputs, BLIP-style ``image`` + ``caption`` (kept captions) fields, so
  :class:`blip.data.datasets.JsonSource` reads it with the original image root;
- ``skipped.json``: one record per input that is not in ``index.json`` (key or shard, reason, detail), so every input
  appears exactly once in one of the two;
- ``summary.json``: images read / skipped (by reason), captions kept / dropped per source, shard list, sample count;
- ``settings.json``: the output-changing settings, the input and the models, recorded by the first run; a resume
  with other ones is refused (:class:`CapFiltSettingsError` lists the differences).

Work is split into units (an input shard, or ``images_per_unit`` entries of a JSON list), units into chunks of
``chunk_size`` input samples; unit u goes to rank ``u % world_size``. Every chunk is written to a temporary name and
renamed, its shard first and then its record file (``records/UUUUU-CCCC.json``, the commit point); a finished unit
gets ``records/UUUUU.done``. A restarted run skips committed chunks without decoding them and redoes the chunk
that was in flight, so nothing is lost or duplicated. Every synthetic caption samples from its own random stream,
seeded by (seed, sample key, caption index), so a killed-and-resumed run writes the same bytes as an uninterrupted
one, whatever the number of ranks, the batch size or the chunk size.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..data.datasets import batched, check_text, read_annotations
from ..data.images import ImageTooLargeError, load_image
from ..data.skips import BadSample, DatasetError, SkipCounter
from ..data.text import pre_caption
from ..data.tokenizer import get_tokenizer
from ..data.transforms import image_transform
from ..data.webdataset import WebDatasetSource, stable_id
from .captioner import sample_captions
from .filter import itm_match_scores, keep_caption

log = logging.getLogger("blip.capfilt")
PASS_THROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class CapFiltConfig:
    num_captions: int = 1           # synthetic captions per image (BLIP: 1; BLIP-2 sampled 10)
    prompt: str = "a picture of "   # the COCO captioner's prompt, stripped from the synthetic captions
    top_p: float = 0.9
    max_length: int = 20            # tokens, the prompt included (BLIP's convention)
    min_length: int = 5
    repetition_penalty: float = 1.1  # BLIP's sampling default
    threshold: float = 0.5          # ITM match probability under which a caption is dropped
    filter_web: bool = True         # score (and possibly drop) the web captions too
    filter_synthetic: bool = True
    max_words: int = 30             # web captions are cleaned with pre_caption(text, max_words) before scoring
    batch_size: int = 32            # images per batch
    chunk_size: int = 1000          # input samples per output shard / commit
    images_per_unit: int = 10000    # JSON inputs: entries per unit
    seed: int = 0
    max_image_pixels: int | None = 50_000_000  # larger images (by their header) are skipped as too_large
    num_workers: int = 4            # decode / transform threads
    progress: bool = True


# the settings that change what a run writes: a resumed run must use the same ones (batch_size, num_workers and
# progress do not change a byte of the output)
OUTPUT_SETTINGS = ("num_captions", "prompt", "top_p", "max_length", "min_length", "repetition_penalty", "threshold",
                   "filter_web", "filter_synthetic", "max_words", "chunk_size", "images_per_unit", "seed",
                   "max_image_pixels")


# ---------------------------------------------------------------------------------------------------------------
# inputs: units of raw samples {"key", "image": bytes | path, "texts": [str], "image_id", "path"?}
class CapFiltInput:
    """Webdataset shards (``urls``: brace patterns, lists, ``::``-joined) or a BLIP-style JSON list (``annotation``
    of ``{"image": path, "caption": str | [str], "image_id"?}`` with ``image_root``)."""

    def __init__(self, urls=None, annotation: str | Path | None = None, image_root: str | Path = "",
                 images_per_unit: int = 10000):
        if (urls is None) == (annotation is None):
            raise ValueError("give exactly one of urls (webdataset shards) or annotation (JSON list)")
        self.images_per_unit, self.image_root = images_per_unit, Path(image_root)
        self.shards = WebDatasetSource(urls, num_samples=0) if urls is not None else None
        self.annotation = annotation
        self.entries = read_annotations(annotation) if annotation is not None else None

    def describe(self) -> dict:
        """What is read, for the settings a resumed run is checked against."""
        if self.shards is not None:
            return {"urls": self.shards.shards}
        return {"annotation": str(self.annotation), "image_root": str(self.image_root),
                "images_per_unit": self.images_per_unit}

    @property
    def num_units(self) -> int:
        if self.shards is not None:
            return self.shards.num_units
        return -(-len(self.entries) // self.images_per_unit)

    def iter_unit(self, unit: int, skips: SkipCounter) -> Iterator[dict]:
        if self.shards is not None:
            for s in self.shards.iter_unit(unit, skips):
                yield {"key": s["key"], "image": s["image"], "texts": [s["text"]], "image_id": s["image_id"]}
            return
        first = unit * self.images_per_unit
        for index, entry in enumerate(self.entries[first:first + self.images_per_unit], start=first):
            if not isinstance(entry, dict) or "image" not in entry:
                raise DatasetError(f"{self.annotation}: entry {index} has no 'image' field ({entry!r:.80}); "
                                   "fix or drop it")
            texts = entry.get("caption", [])
            image_id = entry.get("image_id", entry["image"])
            yield {"key": entry["image"], "image": self.image_root / entry["image"], "path": entry["image"],
                   "texts": texts if isinstance(texts, list) else [texts],
                   "image_id": image_id if isinstance(image_id, int) else stable_id(str(image_id))}


# ---------------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _image_bytes(raw: dict, image: Image.Image) -> tuple[bytes, str]:
    """The original bytes when they are JPEG / PNG / WEBP, else the decoded image re-encoded as JPEG."""
    data = raw["image"] if isinstance(raw["image"], (bytes, bytearray)) else Path(raw["image"]).read_bytes()
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - decodable by load_image but not by a bare open: re-encode
        fmt = None
    if fmt in PASS_THROUGH_FORMATS:
        return bytes(data), PASS_THROUGH_FORMATS[fmt]
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpg"


def prefetch(pool: ThreadPoolExecutor, fn: Callable, items: list, depth: int) -> Iterator:
    """``map(fn, items)`` in order, computed by ``pool`` at most ``depth`` items ahead of the consumer (so decoding
    overlaps the model's work without holding a whole chunk of decoded images)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class CapFilt:
    """Captioner + filter over a :class:`CapFiltInput`; :meth:`run` writes ``out_dir`` (see module docstring)."""

    def __init__(self, captioner: nn.Module, filter_model: nn.Module, cfg: CapFiltConfig | None = None,
                 tokenizer=None, device: str | torch.device | None = None):
        self.captioner, self.filter = captioner.eval(), filter_model.eval()
        self.cfg = cfg or CapFiltConfig()
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer("blip")
        self.device = torch.device(device) if device is not None else next(captioner.parameters()).device
        self.dtype = next(captioner.parameters()).dtype
        self.cap_transform = image_transform(captioner.cfg.image_size, train=False, kind="blip")
        self.filt_transform = None if filter_model.cfg.image_size == captioner.cfg.image_size else \
            image_transform(filter_model.cfg.image_size, train=False, kind="blip")

    # ---- one batch ------------------------------------------------------------------------------------------
    def synthesize(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """[B, 3, H, W] -> B lists of ``num_captions`` sampled captions
        (:func:`blip.capfilt.captioner.sample_captions`)."""
        return sample_captions(self.captioner, self.tokenizer, pixels, keys, self.cfg, self.device)

    def itm_scores(self, pixels: torch.Tensor, texts: list[list[str]]) -> list[list[float]]:
        """ITM match probability of every (image i, text) for the texts of image i
        (:func:`blip.capfilt.filter.itm_match_scores`)."""
        return itm_match_scores(self.filter, self.tokenizer, pixels, texts, self.device)

    def _prepare(self, raw: dict) -> dict:
        """Decode + transform (runs in a worker thread): the item, or {"key", "reason", "detail"} if it is skipped.
        Web captions that are not text (null, non-UTF-8, NUL) are left out and listed under "bad_web_captions"."""
        try:
            image = load_image(raw["image"], max_pixels=self.cfg.max_image_pixels)
            data, ext = _image_bytes(raw, image)
        except ImageTooLargeError as exc:
            return {"key": raw["key"], "reason": "too_large", "detail": str(exc)}
        except (ValueError, OSError) as exc:   # ImageDecodeError is a ValueError; a missing file an OSError
            return {"key": raw["key"], "reason": "bad_image", "detail": str(exc)}
        texts, bad = [], []
        for text in raw["texts"]:
            try:
                texts.append(check_text(text))
            except BadSample as b:
                bad.append(b.detail)
        raw = {**raw, "texts": texts, **({"bad_web_captions": bad} if bad else {})}
        pix_cap = self.cap_transform(image)
        return {**raw, "bytes": data, "ext": ext, "pix_cap": pix_cap,
                "pix_filt": pix_cap if self.filt_transform is None else self.filt_transform(image)}

    def process_batch(self, items: list[dict]) -> list[dict]:
        """Decoded items -> per-image records with every caption, its source, ITM score and verdict."""
        c = self.cfg
        stack = lambda k: torch.stack([it[k] for it in items]).to(self.device, self.dtype)  # noqa: E731
        keys = [it["key"] for it in items]
        synthetic = self.synthesize(stack("pix_cap"), keys) if c.num_captions else [[] for _ in items]
        captions = []
        for it, syn in zip(items, synthetic):
            caps = [{"text": t, "score_text": pre_caption(t, c.max_words), "source": "web"} for t in it["texts"]]
            caps += [{"text": t, "score_text": t, "source": "synthetic"} for t in syn]
            captions.append(caps)
        scores = self.itm_scores(stack("pix_filt"), [[x["score_text"] for x in caps] for caps in captions])
        records = []
        for it, caps, sc in zip(items, captions, scores):
            for cap, s in zip(caps, sc):
                filtered = c.filter_web if cap["source"] == "web" else c.filter_synthetic
                cap["itm_score"] = round(s, 6)
                cap["kept"] = keep_caption(cap["score_text"], s, c.threshold, filtered)
                del cap["score_text"]
            rec = {"key": it["key"], "image_id": it["image_id"], "captions": caps, "_bytes": it["bytes"],
                   "_ext": it["ext"], **({"bad_web_captions": it["bad_web_captions"]} if "bad_web_captions" in it
                                         else {})}
            if "path" in it:
                rec["image"] = it["path"]
            records.append(rec)
        return records

    # ---- a chunk, a unit, the run ---------------------------------------------------------------------------
    def _write_chunk(self, out: Path, unit: int, chunk: int, records: list[dict], skips: dict[str, int],
                     num_input: int, skipped_inputs: list[dict]) -> None:
        from webdataset import TarWriter

        name = f"{unit:05d}-{chunk:04d}"
        buf = io.BytesIO()
        n = 0
        with TarWriter(buf, encoder=False, mtime=0.0) as tar:
            for rec in records:
                for j, cap in enumerate(rec["captions"]):
                    if not cap["kept"]:
                        continue
                    key = f"{unit:05d}{chunk:04d}{n:06d}"
                    meta = {"image_id": rec["image_id"], "source_key": rec["key"], "caption_source": cap["source"],
                            "caption_index": j, "itm_score": cap["itm_score"]}
                    tar.write({"__key__": key, rec["_ext"]: rec["_bytes"], "txt": cap["text"].encode(),
                               "json": json.dumps(meta, sort_keys=True).encode()})
                    cap["sample_key"] = f"{name}.tar:{key}"
                    n += 1
        _atomic_write(out / "shards" / f"{name}.tar", buf.getvalue())
        for rec in records:
            rec.pop("_bytes"), rec.pop("_ext")
            if "image" in rec:
                rec["caption"] = [cap["text"] for cap in rec["captions"] if cap["kept"]]
        commit = {"unit": unit, "chunk": chunk, "shard": f"shards/{name}.tar", "num_input": num_input,
                  "num_samples": n, "skipped": skips, "records": records, "skipped_inputs": skipped_inputs}
        _atomic_write(out / "records" / f"{name}.json", json.dumps(commit, sort_keys=True).encode())

    def _batches(self, prepared: Iterator[dict], skips: SkipCounter, bar=None) -> Iterator[list[dict]]:
        """Decoded items in batches of ``batch_size``; undecodable images are counted, recorded and dropped."""
        def decoded() -> Iterator[dict]:
            for item in prepared:
                if "reason" not in item:
                    yield item
                    continue
                skips.add(item["reason"], item["detail"])
                skips.records[-1]["key"] = item["key"]
                if bar is not None:
                    bar.update(1)

        return batched(decoded(), self.cfg.batch_size)

    def run_unit(self, source: CapFiltInput, unit: int, out: Path, pool: ThreadPoolExecutor, bar=None,
                 on_batch: Callable[[int, int, int], None] | None = None) -> None:
        """Process the chunks of ``unit`` not yet committed, then mark the unit done."""
        done = out / "records" / f"{unit:05d}.done"
        if done.exists():
            return
        num_chunks = 0
        source_skips = SkipCounter(record=True)   # broken shard / missing fields, counted with the chunk being read
        for chunk_index, raws in enumerate(batched(source.iter_unit(unit, source_skips), self.cfg.chunk_size)):
            num_chunks += 1
            read_skips, read_records = source_skips.take(), source_skips.take_records()
            if (out / "records" / f"{unit:05d}-{chunk_index:04d}.json").exists():
                if bar is not None:
                    bar.update(len(raws))
                continue
            skips = SkipCounter(record=True)
            skips.counts.update(read_skips)
            skips.records += read_records
            records = []
            prepared = prefetch(pool, self._prepare, raws, depth=2 * self.cfg.batch_size)
            for index, batch in enumerate(self._batches(prepared, skips, bar)):
                records += self.process_batch(batch)
                if bar is not None:
                    bar.update(len(batch))
                if on_batch is not None:
                    on_batch(unit, chunk_index, index)
            self._write_chunk(out, unit, chunk_index, records, dict(skips.counts), len(raws), skips.records)
        _atomic_write(done, json.dumps({"unit": unit, "num_chunks": num_chunks,
                                        "skipped_after_last_chunk": source_skips.take(),
                                        "skipped_inputs_after_last_chunk": source_skips.take_records()}).encode())

    def run(self, source: CapFiltInput, out_dir: str | Path, rank: int = 0, world_size: int = 1,
            on_batch: Callable[[int, int, int], None] | None = None, merge: bool = True,
            wait_timeout_s: float = 0.0, provenance: dict | None = None) -> dict | None:
        """Process this rank's units; then rank 0 merges (waiting up to ``wait_timeout_s`` for the other ranks'
        units). Returns the summary on the merging rank, else None. Safe to call again after a crash, with the same
        settings: the first call records them (``settings.json``: the output-changing config, the input, and
        ``provenance``, e.g. the captioner / filter sources) and a later call with other ones is refused."""
        out = Path(out_dir)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "records").mkdir(parents=True, exist_ok=True)
        record_settings(out, {"capfilt": {k: getattr(self.cfg, k) for k in OUTPUT_SETTINGS},
                              "input": source.describe(), **(provenance or {})})
        units = [u for u in range(source.num_units) if u % world_size == rank]
        for unit in units:   # temp files of a run killed mid-write (never committed): remove
            for stale in [*(out / "shards").glob(f"{unit:05d}-*.tmp*"), *(out / "records").glob(f"{unit:05d}*.tmp*")]:
                stale.unlink()
        bar = None
        if self.cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc=f"capfilt rank {rank}", unit="img", position=rank, dynamic_ncols=True)
        try:
            with ThreadPoolExecutor(max(1, self.cfg.num_workers)) as pool:
                for unit in units:
                    self.run_unit(source, unit, out, pool, bar, on_batch)
        finally:
            if bar is not None:
                bar.close()
        if not merge or rank != 0:
            return None
        deadline = time.monotonic() + wait_timeout_s
        while not all((out / "records" / f"{u:05d}.done").exists() for u in range(source.num_units)):
            if time.monotonic() > deadline:
                log.warning("capfilt: other ranks' units are not finished; run again (or merge_outputs) later")
                return None
            time.sleep(5.0)
        return merge_outputs(out, source.num_units, asdict(self.cfg))


class CapFiltSettingsError(ValueError):
    """A resumed CapFilt run with other output-changing settings than the run that wrote the directory."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def record_settings(out: Path, settings: dict) -> None:
    """Write ``settings.json`` if this is the first run into ``out`` (exclusively: concurrent ranks agree on one),
    else refuse settings that differ from the recorded ones, listing every difference."""
    path = out / "settings.json"
    settings = json.loads(json.dumps(settings))  # as the file will hold them (tuples -> lists)
    tmp = path.with_name(f"settings.json.tmp{os.getpid()}")
    _atomic_write(tmp, json.dumps(settings, indent=1, sort_keys=True).encode())
    try:
        os.link(tmp, path)  # fails if another run (or rank) recorded first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    saved, now = _flatten(json.loads(path.read_text())), _flatten(settings)
    diff = [f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
            for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
    if diff:
        raise CapFiltSettingsError(
            f"{out} holds a CapFilt run with other settings ({path}); this run changes:\n  " + "\n  ".join(diff) +
            "\nResume with the recorded settings, or write to a new output_dir.")


def merge_outputs(out_dir: str | Path, num_units: int, config: dict | None = None) -> dict:
    """Concatenate the chunk records of all units (in order) into ``index.json``, ``skipped.json`` and
    ``summary.json``."""
    out = Path(out_dir)
    index, shards, skipped, skipped_inputs = [], [], Counter(), []
    counts = {src: Counter() for src in ("web", "synthetic")}
    images_in = samples = 0
    for unit in range(num_units):
        done = json.loads((out / "records" / f"{unit:05d}.done").read_text())
        for chunk in range(done["num_chunks"]):
            commit = json.loads((out / "records" / f"{unit:05d}-{chunk:04d}.json").read_text())
            images_in += commit["num_input"]
            samples += commit["num_samples"]
            skipped.update(commit["skipped"])
            skipped_inputs += commit.get("skipped_inputs", [])
            shards.append(commit["shard"])
            for rec in commit["records"]:
                index.append(rec)
                for cap in rec["captions"]:
                    counts[cap["source"]]["kept" if cap["kept"] else "dropped"] += 1
        skipped.update(done.get("skipped_after_last_chunk", {}))
        skipped_inputs += done.get("skipped_inputs_after_last_chunk", [])
    summary = {"images_in": images_in, "images_skipped": dict(skipped), "images_out":
               sum(any(c["kept"] for c in r["captions"]) for r in index), "num_samples": samples,
               "captions": {k: {"kept": v["kept"], "dropped": v["dropped"]} for k, v in counts.items()},
               "shards": shards, "config": config or {}}
    _atomic_write(out / "index.json", json.dumps(index, indent=1, sort_keys=True).encode())
    _atomic_write(out / "skipped.json", json.dumps(skipped_inputs, indent=1, sort_keys=True).encode())
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    log.info("capfilt: %d images in, %d skipped, %d samples out; captions %s", images_in, sum(skipped.values()),
             samples, summary["captions"])
    return summary


def output_urls(out_dir: str | Path) -> list[str]:
    """The shard paths of a finished CapFilt output, for :class:`~blip.data.webdataset.WebDatasetSource`."""
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    return [str(Path(out_dir) / s) for s in summary["shards"]]

