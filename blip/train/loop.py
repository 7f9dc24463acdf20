"""The training loop: accumulation with `no_sync`, precision policy, clipping, per-iteration schedule, exact resume.

One optimizer step = `grad_accum` micro-batches. The position saved in a checkpoint is (epoch, micro-batches
consumed in the epoch), and the data stream can start at any such position, so a resumed run sees exactly the
samples the uninterrupted run would have seen next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from blip.run_layout import list_checkpoints
from blip.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from blip.train.distributed import (DistInfo, all_reduce_mean, all_reduce_sum_int, gradient_sync,
                                    stop_if_any_rank_failed, unwrap)
from blip.train.metrics_log import MetricLogger
from blip.train.precision import PrecisionPolicy
from blip.train.schedule import IterationSchedule


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` already consumed
    samples: int = 0  # samples seen, all ranks
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped, all ranks


class StopTraining(Exception):
    """Raised by a step callback to end `fit` early (e.g. to simulate a killed job in tests)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops before the optimizer step, so the last checkpoint stays good."""


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: IterationSchedule, *,
                 info: DistInfo = DistInfo(), precision: PrecisionPolicy | None = None, grad_accum: int = 1,
                 grad_clip: float | None = None, epochs: int = 1, max_steps: int | None = None,
                 log_every: int = 10, checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
                 keep_last: int = 3, logger: MetricLogger | None = None, fsdp: bool = False,
                 on_step: Callable[[TrainState, dict], None] | None = None, layout: dict | None = None,
                 save_frozen: bool = True) -> None:
        """layout: settings a resume cannot change without changing the data order (per-rank batch size; the
        world size and grad_accum are always included); saved with every checkpoint and checked on load.
        save_frozen: False saves only the trainable parameters and the buffers (fine-tuning from a base checkpoint
        the run points at: its frozen towers, e.g. a 2.7B LLM, are not copied into every checkpoint)."""
        self.model, self.optimizer, self.schedule, self.info = model, optimizer, schedule, info
        self.precision = precision or PrecisionPolicy(device_type=info.device.type)
        self.scaler = self.precision.grad_scaler()
        self.grad_accum, self.grad_clip, self.epochs, self.max_steps = grad_accum, grad_clip, epochs, max_steps
        self.log_every, self.checkpoint_dir, self.checkpoint_every = log_every, checkpoint_dir, checkpoint_every
        self.keep_last, self.logger, self.fsdp, self.on_step = keep_last, logger, fsdp, on_step
        self.save_frozen = save_frozen
        self.state = TrainState()
        self.history: list[dict] = []  # logged metrics (every `log_every` steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._saved_step: int | None = None
        self.layout = {**(layout or {}), "world_size": info.world_size, "grad_accum": grad_accum}

    # ---- checkpoint state --------------------------------------------------------------------------------
    def _model_and_optim_state(self) -> tuple[dict, dict]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model = unwrap(self.model)
        state = model.state_dict()
        if not self.save_frozen:
            frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        return state, self.optimizer.state_dict()

    def state_dict(self) -> dict:
        model_state, optim_state = self._model_and_optim_state()
        return {"model": model_state, "optimizer": optim_state, "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "trainer": asdict(self.state), "layout": dict(self.layout)}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state.get("layout"), self.layout)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        else:
            model = unwrap(self.model)
            if self.save_frozen:
                model.load_state_dict(state["model"])
            else:   # the frozen weights are the base's, already in the model
                frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
                missing, unexpected = model.load_state_dict(state["model"], strict=False)
                if unexpected or set(missing) - frozen:
                    raise RuntimeError(f"checkpoint does not fit the model: unexpected {unexpected[:5]}, missing "
                                       f"{sorted(set(missing) - frozen)[:5]}")
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["trainer"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])

    def save(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        state = self.state_dict()
        self._saved_step = self.state.step
        return save_checkpoint(self.checkpoint_dir, self.state.step, state, self.info, keep_last=self.keep_last)

    def resume(self, path: str | Path | None = None) -> bool:
        """Load `path`, or the latest checkpoint in `checkpoint_dir`; False if there is none."""
        if path is None:
            found = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
            if not found:
                return False
            path = found[-1]
        self.load_state_dict(load_checkpoint(path, self.info))
        return True

    # ---- training ----------------------------------------------------------------------------------------
    def total_steps(self, batches_per_epoch: int) -> int:
        total = self.epochs * (batches_per_epoch // self.grad_accum)
        return min(total, self.max_steps) if self.max_steps else total

    def _micro_step(self, batch: dict, sync: bool) -> dict[str, torch.Tensor]:
        with gradient_sync(self.model, sync):
            with self.precision.autocast():
                out = self.model(batch)
            loss = out["loss"] / self.grad_accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return {k: v.detach().float() for k, v in out.items() if k.startswith("loss") and v.numel() == 1}

    def _optimizer_step(self) -> float | None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        hook = getattr(unwrap(self.model), "after_optimizer_step", None)
        if callable(hook):
            hook()
        self.schedule.step()
        return grad_norm

    def fit(self, data) -> list[dict]:
        """Train until `epochs` (or `max_steps`) from the current state; `data` is a `TrainData`-like object."""
        per_epoch = data.batches_per_epoch - data.batches_per_epoch % self.grad_accum
        if per_epoch == 0:
            raise ValueError(f"an epoch has {data.batches_per_epoch} batches, fewer than grad_accum={self.grad_accum}")
        total = self.total_steps(data.batches_per_epoch)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        window_start, window_samples, window_steps = time.perf_counter(), 0, 0
        while self.state.step < total:
            batches: Iterator[dict] = data.iterate(self.state.epoch, self.state.batch)
            while self.state.batch < per_epoch and self.state.step < total:
                terms: dict[str, torch.Tensor] = {}
                num_samples, skipped = 0, {}
                for i in range(self.grad_accum):
                    batch = self._next_batch(batches)
                    for reason, n in batch.pop("skipped", {}).items():
                        skipped[reason] = skipped.get(reason, 0) + n
                    batch["progress"] = self.state.epoch + (self.state.batch + i) / per_epoch
                    num_samples += len(batch["text"]) if "text" in batch else len(batch["pixel_values"])
                    out = self._micro_step(_to_device(batch, self.info.device), sync=i == self.grad_accum - 1)
                    for k, v in out.items():
                        terms[k] = terms.get(k, 0) + v / self.grad_accum
                self._check_finite(terms)
                lr = self.optimizer.param_groups[-1]["lr"]
                grad_norm = self._optimizer_step()
                self.state.step += 1
                self.state.batch += self.grad_accum
                self.state.samples += num_samples * self.info.world_size
                for reason, n in skipped.items():
                    self.state.skipped[reason] = self.state.skipped.get(reason, 0) + n
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v
                window_samples += num_samples * self.info.world_size
                window_steps += 1
                if self.state.step % self.log_every == 0 or self.state.step == total:
                    self._log(sums, window_steps, window_samples, time.perf_counter() - window_start, lr, grad_norm)
                    sums, window_samples, window_steps, window_start = {}, 0, 0, time.perf_counter()
                if self.on_step is not None:
                    self.on_step(self.state, terms)
                if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
                    self.save()
            if self.state.batch >= per_epoch:
                self.state.epoch += 1
                self.state.batch = 0
        if self.checkpoint_dir is not None and self._saved_step != self.state.step:
            self.save()  # the final state, unless the periodic save just wrote it
        return self.history

    def _next_batch(self, batches: Iterator[dict]) -> dict:
        """The next micro-batch; a data error on any rank (e.g. a source with no readable sample) stops every rank
        here, before the forward, so no rank waits in a gradient all-reduce its peer never reaches."""
        batch, error = None, None
        try:
            batch = next(batches)
        except StopIteration:
            error = RuntimeError(f"the data stream ended early at epoch {self.state.epoch}, batch {self.state.batch}")
        except Exception as e:  # noqa: BLE001 - re-raised on this rank, reported to the others
            error = e
        stop_if_any_rank_failed(error, self.info)
        return batch

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        loss = terms.get("loss")
        error = None
        if loss is not None and not bool(torch.isfinite(loss).all()):
            last = list_checkpoints(self.checkpoint_dir)[-1:] if self.checkpoint_dir else []
            error = NonFiniteLossError(
                f"loss is {float(loss)} at step {self.state.step + 1} (epoch {self.state.epoch}, batch "
                f"{self.state.batch}): training stopped before the optimizer step; last good checkpoint: "
                f"{last[0] if last else 'none'}. Lower the learning rate, set trainer.grad_clip, or use fp32/bf16.")
        stop_if_any_rank_failed(error, self.info)

    def _log(self, sums: dict, steps: int, samples: int, seconds: float, lr: float, grad_norm: float | None) -> None:
        metrics = {k: float(v) / steps for k, v in sums.items()}
        metrics = all_reduce_mean(metrics, self.info)
        metrics["lr"] = lr
        metrics["samples_per_s"] = samples / max(seconds, 1e-9)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        skipped = all_reduce_sum_int(sum(self.state.skipped.values()), self.info)
        metrics["skipped_total"] = skipped
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.history.append(record)
        if self.logger is not None:
            self.logger.log(self.state.step, metrics)
            self.logger.progress(steps, {"loss": f"{metrics.get('loss', float('nan')):.3f}", "lr": f"{lr:.2e}",
                                         "img/s": f"{metrics['samples_per_s']:.0f}"})


def check_layout(saved: dict | None, current: dict) -> None:
    """Refuse to resume when the data layout changed: the saved position (epoch, micro-batch) would point at other
    samples, and the per-rank RNG states would not match the ranks."""
    if not saved:
        return  # a checkpoint from before layouts were recorded
    changed = {k: (saved[k], current[k]) for k in saved.keys() & current.keys() if saved[k] != current[k]}
    if changed:
        listed = ", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in sorted(changed.items())))
        raise ValueError(f"cannot resume: the checkpoint was written with {saved}, this run changes {listed}, "
                         "which changes the order and grouping of the data. Resume with the saved settings, or "
                         "start a new run from its weights with init_from=<checkpoint>.")
