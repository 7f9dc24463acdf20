"""Process-group setup and model wrapping: one process without torch.distributed, DDP, or FSDP2.

A run is distributed only when launched by torchrun (or SLURM), i.e. when WORLD_SIZE > 1 is in the environment;
a single process never needs an initialised process group (LAVIS's stage 1 does).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Read torchrun/SLURM variables, pick the device and initialise the process group when world_size > 1."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of scalar metrics over ranks (for logging only)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: v / info.world_size for k, v in zip(keys, t.tolist())}


def all_reduce_sum_int(value: int, info: DistInfo) -> int:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.long, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return int(t.item())


_CONTROL_GROUP: list = []


def _control_group():
    """A CPU (gloo) group for control messages: agreeing on a failure must not wait for the GPU stream."""
    if not _CONTROL_GROUP:
        _CONTROL_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _CONTROL_GROUP[0]


class PeerFailed(RuntimeError):
    """Another rank stopped the job; the message quotes its error."""


def stop_if_any_rank_failed(error: BaseException | None, info: DistInfo) -> None:
    """Collective: raise on every rank if any rank has an `error` (its own error on the failing rank, PeerFailed
    quoting it elsewhere), so that no rank is left waiting in a collective its peer never reaches."""
    if not info.distributed:
        if error is not None:
            raise error
        return
    group = _control_group()
    flag = torch.tensor([int(error is not None)])
    dist.all_reduce(flag, group=group)
    if int(flag.item()) == 0:
        return
    messages: list = [None] * info.world_size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise PeerFailed(f"rank {rank} stopped the job: {message}")


def block_lists(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every nn.ModuleList in the model (ViT blocks, BERT layers, LLM decoder layers):
    the units of FSDP sharding and activation checkpointing. (Training forwards project cross-attention K/V inside
    each layer; only decoding precomputes them, and evaluation under FSDP runs on an unsharded copy.)"""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            blocks += [m for m in module if sum(p.numel() for p in m.parameters()) > 0]
    return blocks


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, *, mixed_dtype: torch.dtype | None = None,
               find_unused_parameters: bool = False) -> nn.Module:
    """Wrap for data parallelism. strategy: none | ddp | fsdp | auto (ddp when distributed)."""
    if strategy == "auto":
        strategy = "ddp" if info.distributed else "none"
    if strategy == "none" or not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=mixed_dtype, reduce_dtype=torch.float32) if mixed_dtype else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        # frozen-only blocks (e.g. the LLM of stage 2) are sharded too: that is where the memory is
        for block in block_lists(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r} (none | ddp | fsdp | auto)")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers (FSDP2 shards in place, nothing to unwrap)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`)."""
    if enabled:
        yield
        return
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        with inner.no_sync():
            yield
    elif hasattr(inner, "set_requires_gradient_sync"):  # FSDP2 module
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield
