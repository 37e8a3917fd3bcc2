"""Without peers (no process group, or a group of one rank) SyncBatchNorm is exactly torch's BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn
from tests.syncbn import scenarios as sc
from tests.syncbn.process_group_pool import ProcessGroupPool


@pytest.mark.parametrize(("spatial", "cls"), [((), nn.BatchNorm1d), ((7,), nn.BatchNorm1d), ((4, 4), nn.BatchNorm2d)])
def test_without_process_group_bit_identical_to_batchnorm(spatial: tuple[int, ...], cls: type[nn.Module]) -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(6, 5, *spatial) * 3 + 2
    dy = torch.randn_like(x)
    outs = []
    for layer in (syncbn.SyncBatchNorm(5, momentum=None), cls(5, momentum=None)):
        xi = x.clone().requires_grad_(True)
        for _ in range(2):
            y = layer(xi)
        y.backward(dy)
        layer.eval()
        stats = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        outs.append((y, xi.grad, layer.weight.grad, layer.bias.grad, *stats, layer(x)))
    for ours, theirs in zip(*outs, strict=True):
        assert torch.equal(ours, theirs)


def test_world_size_one_group_bit_identical_to_batchnorm(pool1: ProcessGroupPool) -> None:
    (result,) = pool1.run(sc.world_size_one_matches_batchnorm, {"sizes": [8], "channels": 4, "spatial": (3, 3)})
    for a, b in zip(result["sync"], result["plain"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((4,), "got 1D input"), ((2, 3, 1, 1, 1, 1), "got 6D input"), ((2, 7, 4), "expected input with 5 channels")],
)
def test_bad_input_shapes_say_expected_and_got(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        syncbn.SyncBatchNorm(5)(torch.randn(shape))


def test_single_sample_without_peers_behaves_like_batchnorm() -> None:
    # Without peers the global batch is the local one: torch's own error for a batch of one sample.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        syncbn.SyncBatchNorm(3)(torch.randn(1, 3))
