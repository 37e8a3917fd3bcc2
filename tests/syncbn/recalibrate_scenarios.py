"""Functions for `test_recalibrate.py` that run on every rank of a pool (top level, so spawned ranks import them).

Every process builds the same model from a seed and the same batches from `(round, rank)`; the test process builds
the reference from them: plain BatchNorm on each round's concatenated global batch, in float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn


def make_model() -> nn.Module:
    """Conv-BN-ReLU-dropout-conv-BN-pool-BN1d in float64, with a large offset into the first BatchNorm."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),  # must be off while recalibrating: the reference has none
        nn.Conv2d(4, 5, 1),
        nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(5),
    ).double()
    with torch.no_grad():
        model[0].bias.add_(1000.0)  # inputs around 1000 with unit spread: naive sums would cancel
    return model


def make_batch(round_index: int, rank: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * round_index + rank)
    return torch.randn(size, 3, 5, 5, generator=gen, dtype=torch.float64) * 2.0 + 0.5


def rank_batches(sizes: list[int], rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A rank's batches as a DataLoader yields them, `(input, label)`."""
    return [(make_batch(r, rank, n), torch.zeros(n, dtype=torch.long)) for r, n in enumerate(sizes)]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def recalibrate_on_rank(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Recalibrate (a synchronised copy of) the model on this rank's batches; return what changed and what not."""
    model = make_model()
    if cfg["sync"]:
        model = syncbn.convert_sync_batchnorm(model)
    if cfg.get("eval_before"):
        model.eval()
    before = _buffers(model)
    training_before = [m.training for m in model.modules()]
    counts = syncbn.recalibrate(model, rank_batches(cfg["sizes"][rank], rank), num_batches=cfg["num_batches"])
    after = _buffers(model)
    # A collective after the call proves every rank left it at the same point (none is still in a forward).
    probe = torch.tensor([float(rank)], dtype=torch.float64)
    dist.all_reduce(probe)
    return {
        "before": before,
        "after": after,
        "counts": counts,
        "training_restored": [m.training for m in model.modules()] == training_before,
        "probe": probe.item(),
    }
