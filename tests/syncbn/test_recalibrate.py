"""`syncbn.recalibrate` sets running statistics to the exact population statistics of the batches it is given.

Exactness is checked against the float64 reference: plain BatchNorm in training mode on each round's concatenated
global batch (what SyncBatchNorm normalises with), every input of every layer collected and its mean and unbiased
variance taken at once. Real 2- and 3-rank gloo groups, with uneven ranks and a rank with no batch at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncbn
from tests.syncbn.process_group_pool import ProcessGroupPool
from tests.syncbn.recalibrate_scenarios import make_batch, make_model, recalibrate_on_rank

BN_NAMES = ("1", "5", "8")
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _population_reference(sizes: list[list[int]], num_batches: int, ranks: list[int]) -> dict[str, torch.Tensor]:
    """Running stats the layers of `ranks` (pooled together) should end with; the rest of the state as before."""
    model = make_model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in BN_NAMES}
    for name in BN_NAMES:
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0]))
    model.eval()
    for name in BN_NAMES:
        model.get_submodule(name).train()
    rounds = max(len(sizes[r]) for r in ranks)
    with torch.no_grad():
        for r in range(min(rounds, num_batches)):
            parts = [make_batch(r, rank, sizes[rank][r]) for rank in ranks if r < len(sizes[rank])]
            model(torch.cat(parts))
    for name in BN_NAMES:
        x = torch.cat(seen[name])
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, all values)
        expected[f"{name}.running_mean"] = flat.mean(1)
        expected[f"{name}.running_var"] = flat.var(1, unbiased=True)
    return expected


def _check(result: dict, expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(result["after"][key], value, **TOL, msg=key)
    assert result["training_restored"]


@pytest.mark.parametrize(
    ("pool_name", "sizes"),
    [
        ("pool2", [[6, 5, 4], [3, 7]]),  # uneven: rank 1 runs an empty third round
        ("pool3", [[4, 1], [5, 3, 2], []]),  # rank 2 has no batch at all, rank 0 one sample in round 2
    ],
)
def test_sync_layers_get_the_population_statistics_of_every_rank(
    pool_name: str, sizes: list[list[int]], request: pytest.FixtureRequest
) -> None:
    pool: ProcessGroupPool = request.getfixturevalue(pool_name)
    results = pool.run(recalibrate_on_rank, {"sync": True, "sizes": sizes, "num_batches": 200})
    expected = _population_reference(sizes, 200, list(range(pool.world_size)))
    total = sum(sum(s) for s in sizes)
    for rank, result in enumerate(results):
        _check(result, expected)
        # Weights untouched, num_batches_tracked as before the call.
        for key, value in result["before"].items():
            if "running" not in key:
                torch.testing.assert_close(result["after"][key], value, rtol=0, atol=0, msg=key)
        assert result["counts"] == {"1": total * 25, "5": total * 25, "8": total}, rank
        assert result["probe"] == sum(range(pool.world_size))


def test_num_batches_caps_the_rounds_and_eval_mode_is_kept(pool2: ProcessGroupPool) -> None:
    sizes = [[6, 5, 4], [3, 7, 2]]
    results = pool2.run(recalibrate_on_rank, {"sync": True, "sizes": sizes, "num_batches": 2, "eval_before": True})
    expected = _population_reference(sizes, 2, [0, 1])
    for result in results:
        _check(result, expected)
        assert result["counts"]["8"] == 6 + 5 + 3 + 7


def test_plain_batchnorm_stays_local_on_each_rank(pool2: ProcessGroupPool) -> None:
    # Rank 1 has no batch: with plain BatchNorm nothing is exchanged, so it must neither block nor change.
    sizes = [[6, 5], []]
    results = pool2.run(recalibrate_on_rank, {"sync": False, "sizes": sizes, "num_batches": 200})
    _check(results[0], _population_reference(sizes, 200, [0]))
    assert all(torch.equal(results[1]["after"][k], v) for k, v in results[1]["before"].items())
    assert results[1]["counts"] == {"1": 0, "5": 0, "8": 0}


def test_without_a_process_group_it_is_local_and_leaves_weights_and_gradients_alone() -> None:
    model = syncbn.convert_sync_batchnorm(make_model())  # no process group in this process: local statistics
    model[4].weight.grad = torch.ones_like(model[4].weight)
    model.train()
    model[1].num_batches_tracked.fill_(17)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    batches = [make_batch(r, 0, n) for r, n in enumerate([4, 6])]  # bare tensors are batches too
    counts = syncbn.recalibrate(model, batches)
    expected = _population_reference([[4, 6]], 200, [0])
    for key, value in expected.items():
        if "running" in key:
            torch.testing.assert_close(model.state_dict()[key], value, **TOL, msg=key)
    assert int(model[1].num_batches_tracked) == 17
    for name, value in model.named_parameters():
        assert torch.equal(value, weights[name]), name
    assert torch.equal(model[4].weight.grad, torch.ones_like(model[4].weight))
    assert all(m.training for m in model.modules())
    assert counts == {"1": 250, "5": 250, "8": 10}


def test_layers_without_running_stats_are_skipped_and_bad_arguments_say_why() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3))
    before = copy.deepcopy(model.state_dict())
    assert syncbn.recalibrate(model, [torch.randn(4, 3)]) == {"1": 4}
    assert set(model.state_dict()) == set(before)
    with pytest.raises(ValueError, match="num_batches must be at least 1"):
        syncbn.recalibrate(model, [torch.randn(4, 3)], num_batches=0)
    with pytest.raises(TypeError, match=r"tensors or \(input, \.\.\.\) tuples"):
        syncbn.recalibrate(model, [{"x": torch.randn(4, 3)}])
