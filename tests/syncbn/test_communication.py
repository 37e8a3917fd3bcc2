"""What crosses the wire: one all-reduce per layer per pass, of a size independent of the world size, and none in
eval mode. Observed with torch's profiler on real gloo ranks (the collectives it records, with their shapes)."""

from __future__ import annotations

import pytest

from tests.syncbn import scenarios as sc
from tests.syncbn.process_group_pool import ProcessGroupPool

CHANNELS = 4


def _collectives(pool: ProcessGroupPool, record: bool) -> list[dict]:
    cfg = {"sizes": [3] * pool.world_size, "channels": CHANNELS, "spatial": (2, 2), "record": record}
    per_rank = pool.run(sc.count_collectives, cfg)
    # Each rank saw the same collectives; keep gloo's own events, which carry the tensor shapes.
    events = [[e for e in r["events"] if e["name"].startswith("gloo:")] for r in per_rank]
    assert all(e == events[0] for e in events), "ranks issued different collectives"
    return events[0]


@pytest.mark.parametrize("world", [2, 3])
def test_one_all_reduce_forward_and_one_backward_per_layer(
    world: int, pool2: ProcessGroupPool, pool3: ProcessGroupPool
) -> None:
    events = _collectives(pool2 if world == 2 else pool3, record=False)
    names = [e["name"] for e in events]
    assert names == ["gloo:all_reduce"] * 6, f"expected 6 all_reduce (3 layers x 2 passes), got {names}"
    shapes = [e["shapes"] for e in events]
    # Forward: [count, C sums, C sums of squares]; backward: [C sum(dy), C sum(dy*x_hat)]. Same at any world size.
    assert shapes == [[[2 * CHANNELS + 1]]] * 3 + [[[2 * CHANNELS]]] * 3


def test_recording_step_adds_one_per_channel_sum_to_the_same_all_reduce(pool2: ProcessGroupPool) -> None:
    events = _collectives(pool2, record=True)
    assert [e["shapes"] for e in events] == [[[3 * CHANNELS + 1]]] * 3 + [[[2 * CHANNELS]]] * 3


def test_eval_with_running_stats_never_communicates(pool2: ProcessGroupPool) -> None:
    # Only rank 0 runs the eval passes; a collective there would wait for rank 1 until gloo's timeout.
    cfg = {"sizes": [4, 4], "channels": 3, "spatial": (2, 2)}
    results = pool2.run(sc.eval_without_peers, cfg, timeout=20)
    for out in results[0]["outs"]:
        assert (out - results[0]["reference"]).abs().max().item() == 0.0
    assert results[1] is None
