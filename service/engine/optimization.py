"""Optimizers and learning-rate schedules from the job spec.

The learning rate is a pure function of the global step (`LearningRate.at`), set on the optimizer before each
step. Nothing about the schedule needs saving in a checkpoint: resuming at step `s` gives the same rate as the
uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from service.spec import LrScheduleSpec, OptimizerSpec

__all__ = ["LearningRate", "build_optimizer", "set_lr"]


def build_optimizer(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (with momentum/Nesterov), Adam or AdamW with the spec's learning rate and weight decay."""
    params = list(params)
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=spec.weight_decay
        )
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}: expected sgd, adam or adamw")


@dataclass(frozen=True)
class LearningRate:
    """Learning rate as a function of the global step: linear warm-up, then none/cosine/step decay.

    Attributes:
        base_lr: the peak rate (`optimizer.lr`).
        schedule: the spec's `lr_schedule`.
        steps_per_epoch: optimizer steps in one epoch (the same on every rank).
        epochs: length of the run.
    """

    base_lr: float
    schedule: LrScheduleSpec
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def warmup_steps(self) -> int:
        return round(self.schedule.warmup_epochs * self.steps_per_epoch)

    def at(self, step: int) -> float:
        """Rate for the 0-based global `step` (the step about to be taken)."""
        warmup = self.warmup_steps
        if step < warmup:
            return self.base_lr * (step + 1) / warmup
        if self.schedule.name == "cosine":
            span = max(1, self.total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            floor = self.schedule.min_lr
            return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule.name == "step":
            epoch = step // self.steps_per_epoch
            return self.base_lr * self.schedule.gamma ** (epoch // self.schedule.step_epochs)
        return self.base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
