"""Sharded, resumable evaluation passes: every item exactly once, results in dataset order for any world size.

Items are cut into fixed chunks of ``batch_size`` (chunk c = items [c*B, (c+1)*B)); rank r runs the chunks
c ≡ r (mod world size). Each finished chunk is written atomically to ``<work_dir>/<stage>/<c>.json`` (a list, one
result per item) or ``<c>.safetensors`` (a tensor, one row per item) through a temp file + ``os.replace``, so a
killed evaluation re-run skips the chunks on disk. After the pass every rank's chunks are gathered
(``all_gather_object``) and concatenated in chunk order: the merged result does not depend on how many ranks ran it, nor
on how often it was interrupted. A manifest pins what the chunks were computed from; a re-run with other settings
refuses to mix them.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger("blip.evaluate")


@dataclass
class EvalContext:
    """Where and how a pass runs. work_dir: the partial results (``output_dir/partial``)."""
    work_dir: Path
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    batch_size: int = 32
    num_workers: int = 0
    progress_bar: bool = True
    autocast_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON so that ``path`` is either absent or complete (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def check_manifest(ctx: EvalContext, manifest: dict) -> None:
    """Collective: pin the settings the partial results belong to; refuse to resume from other settings."""
    path = ctx.work_dir / "manifest.json"
    if ctx.is_main:
        if path.exists():
            old = json.loads(path.read_text())
            if old != manifest:
                diff = sorted(k for k in manifest.keys() | old.keys() if old.get(k) != manifest.get(k))
                raise RuntimeError(f"{ctx.work_dir} holds partial results of another evaluation (differs in {diff}): "
                                   "use another output_dir, or delete that folder to start over")
        else:
            write_json_atomic(path, manifest)
    if ctx.world_size > 1:
        dist.barrier()


def _save_chunk(path: Path, results: list | torch.Tensor) -> None:
    if isinstance(results, torch.Tensor):
        from safetensors.torch import save_file
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"rows": results.detach().float().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
    else:
        write_json_atomic(path, results)


def _load_chunk(path: Path) -> list | torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))["rows"]
    return json.loads(path.read_text())


def run_pass(ctx: EvalContext, stage: str, dataset: Dataset, collate: Callable[[list], Any],
             compute: Callable[[Any], list | torch.Tensor], unit: str = "img", tensors: bool = False
             ) -> list | torch.Tensor:
    """Collective: ``compute(batch)`` -> one JSON-able result per item (a list), or with ``tensors=True`` a tensor
    [items, ...]; returns the results of all items in dataset order on every rank (a list, or the concatenated
    float32 tensor). Chunks already on disk are read back, not recomputed."""
    n, bs = len(dataset), ctx.batch_size
    chunks = range(-(-n // bs))
    stage_dir = ctx.work_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".safetensors" if tensors else ".json"
    mine = [c for c in chunks if c % ctx.world_size == ctx.rank]
    todo = [c for c in mine if not (stage_dir / f"{c}{suffix}").exists()]
    if len(todo) < len(mine):
        log.info("%s: %d of %d chunks of rank %d already done, skipping them", stage, len(mine) - len(todo),
                 len(mine), ctx.rank)
    batches = [list(range(c * bs, min(n, (c + 1) * bs))) for c in todo]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=ctx.num_workers)
    bar = _progress(ctx, stage, sum(len(b) for b in batches), unit)
    for chunk, items, batch in zip(todo, batches, loader):
        with torch.inference_mode(), ctx.autocast():
            results = compute(batch)
        if len(results) != len(items):
            raise RuntimeError(f"{stage}: chunk {chunk} produced {len(results)} results for {len(items)} items")
        _save_chunk(stage_dir / f"{chunk}{suffix}", results)
        if bar is not None:
            bar.update(len(results))
    if bar is not None:
        bar.close()
    own = {c: _load_chunk(stage_dir / f"{c}{suffix}") for c in mine}
    parts = [own]
    if ctx.world_size > 1:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, own)
    merged = {c: r for part in parts for c, r in part.items()}
    if sorted(merged) != list(chunks):
        raise RuntimeError(f"{stage}: gathered chunks {sorted(merged)} != expected 0..{len(chunks) - 1}")
    if tensors:
        return torch.cat([merged[c] for c in chunks]) if n else torch.empty(0)
    return [item for c in chunks for item in merged[c]]


def _progress(ctx: EvalContext, stage: str, total: int, unit: str):
    """tqdm on rank 0 (rate in ``unit``/s, scaled by the world size: every rank runs an equal share)."""
    if not (ctx.progress_bar and ctx.is_main) or total == 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"{stage} (rank 0 of {ctx.world_size})", unit=unit, dynamic_ncols=True)


class ListDataset(Dataset):
    """``items[i] -> load(items[i], i)``: a map-style dataset over a list (images decoded in the workers)."""

    def __init__(self, items: Sequence, load: Callable[[Any, int], Any]):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.load(self.items[i], i)
