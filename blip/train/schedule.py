"""Per-iteration learning-rate schedules. Every group's LR is `base_lr * factor(step) * group["lr_scale"]`.

- cosine: linear warmup warmup_lr → lr over warmup_steps, then cosine lr → min_lr until total_steps (BLIP-2).
- cosine_epoch: the cosine of BLIP's fine-tuning / LAVIS's runner, constant within each epoch:
  `min_lr + (lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2` (warmup as above).
- step: BLIP pretraining; linear warmup warmup_lr → lr over warmup_steps, then `max(min_lr, lr * decay_rate**epoch)`.
- constant: linear warmup, then lr.
The state is just the step count, so resuming restores the exact LR.
"""

from __future__ import annotations

import math

import torch


class IterationSchedule:
    def __init__(self, optimizer: torch.optim.Optimizer, *, name: str = "cosine", lr: float, total_steps: int,
                 steps_per_epoch: int, warmup_steps: int = 0, warmup_lr: float = 0.0, min_lr: float = 0.0,
                 decay_rate: float = 0.9) -> None:
        if name not in ("cosine", "cosine_epoch", "step", "constant"):
            raise ValueError(f"unknown schedule {name!r} (cosine | cosine_epoch | step | constant)")
        self.optimizer, self.name, self.lr = optimizer, name, lr
        self.total_steps, self.steps_per_epoch = max(1, total_steps), max(1, steps_per_epoch)
        self.warmup_steps, self.warmup_lr, self.min_lr, self.decay_rate = warmup_steps, warmup_lr, min_lr, decay_rate
        self.step_count = 0
        self.apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.name == "constant":
            return self.lr
        if self.name == "step":
            return max(self.min_lr, self.lr * self.decay_rate ** (step // self.steps_per_epoch))
        if self.name == "cosine_epoch":
            epochs = max(1, -(-self.total_steps // self.steps_per_epoch))
            progress = min(1.0, (step // self.steps_per_epoch) / epochs)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.apply()
