"""Convergence verdicts and early stopping.

Fed only with values every rank agrees on (all-reduced losses, all-reduced validation accuracy), so every rank
reaches the same decision at the same step and nobody is left waiting in a collective.

Verdicts:
  - `converged`: the validation accuracy reached `early_stop.target_val_acc`;
  - `plateaued`: no improvement larger than `min_delta` for `patience` epochs;
  - `diverged`: the training loss became NaN or infinite (the run stops at once);
  - `completed`: every epoch ran and no early-stop rule fired.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from service.spec import EarlyStopSpec

__all__ = ["ConvergenceTracker", "divergence_reason"]


def divergence_reason(loss: float, step: int, epoch: int, lr: float) -> str | None:
    """A sentence explaining the divergence when `loss` (the global mean) is not finite, else None."""
    if math.isfinite(loss):
        return None
    return (
        f"diverged: the training loss became {loss} at step {step} (epoch {epoch}, learning rate {lr:.3g}); "
        "lower optimizer.lr, add lr_schedule.warmup_epochs, or check the data for extreme values."
    )


@dataclass
class ConvergenceTracker:
    """Tracks the best validation accuracy and decides when to stop early.

    Its state is a few numbers, saved in checkpoints so a resumed run keeps its patience count.
    """

    early_stop: EarlyStopSpec | None
    best_val_acc: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def update(self, epoch: int, val_acc: float) -> str | None:
        """Record one epoch's validation accuracy; return "converged"/"plateaued" to stop, None to go on."""
        min_delta = self.early_stop.min_delta if self.early_stop else 0.0
        if val_acc > self.best_val_acc + min_delta or self.best_epoch == 0:
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if val_acc > self.best_val_acc:
            self.best_val_acc, self.best_epoch = val_acc, epoch
        if self.early_stop is None:
            return None
        target = self.early_stop.target_val_acc
        if target is not None and val_acc >= target:
            return "converged"
        patience = self.early_stop.patience
        if patience is not None and self.epochs_without_improvement >= patience:
            return "plateaued"
        return None

    def state_dict(self) -> dict[str, Any]:
        """Counters to store in a checkpoint."""
        state = asdict(self)
        state.pop("early_stop")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters saved by `state_dict`."""
        self.best_val_acc = float(state["best_val_acc"])
        self.best_epoch = int(state["best_epoch"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
