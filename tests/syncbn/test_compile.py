"""torch.compile of converted models on real gloo groups: zero graph breaks, fullgraph=True, and the same numbers
as eager mode (float64, 1e-10) for outputs, input and parameter gradients and running statistics; compiled DDP
(compile-then-DDP and torch.compile(DDP(model))) trains to eager DDP's parameters.

Inductor compiles are slow on a small CPU machine, so every case compiles one small model (BatchNorm1d/2d/3d
mixed, uneven per-rank batches) once per rank and reuses the session's pool of spawned ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.syncbn import compile_scenarios as cs
from tests.syncbn.process_group_pool import ProcessGroupPool

TIGHT = 1e-10


def assert_compiled_equals_eager(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        for step, (eager, compiled) in enumerate(zip(result["eager"], result["compiled"], strict=True)):
            assert eager.keys() == compiled.keys()
            for key, expected in eager.items():
                torch.testing.assert_close(
                    compiled[key].double(),
                    expected.double(),
                    atol=TIGHT,
                    rtol=0.0,
                    msg=lambda m, k=key, r=rank, s=step: f"rank {r} step {s} {k}: {m}",
                )


def test_aot_eager_fullgraph_has_no_graph_breaks_and_matches_eager(pool2: ProcessGroupPool) -> None:
    cfg = {"backend": "aot_eager", "sizes": [3, 5], "steps": 2, "explain": True, "record": True}
    results = pool2.run(cs.compiled_matches_eager, cfg, timeout=240)
    for rank, result in enumerate(results):
        assert result["graph_breaks"] == 0, f"rank {rank}: {result['break_reasons']}"
    assert_compiled_equals_eager(results)
    # Both ranks' running statistics are the global ones, hence equal.
    last = [r["compiled"][-1] for r in results]
    torch.testing.assert_close(last[0]["buffer.1.running_var"], last[1]["buffer.1.running_var"], atol=TIGHT, rtol=0)
    for rank, result in enumerate(results):
        eager_snapshot, compiled_snapshot = result["snapshots"]
        assert eager_snapshot.keys() == compiled_snapshot.keys() == {"1", "3", "5"}, f"rank {rank}"
        for layer, stats in eager_snapshot.items():
            assert compiled_snapshot[layer]["synchronized"]
            torch.testing.assert_close(
                torch.tensor(compiled_snapshot[layer]["mean_global"]), torch.tensor(stats["mean_global"])
            )


def test_inductor_fullgraph_matches_eager(pool2: ProcessGroupPool) -> None:
    cfg = {"backend": "inductor", "sizes": [4, 1], "steps": 2}
    assert_compiled_equals_eager(pool2.run(cs.compiled_matches_eager, cfg, timeout=600))


def test_compiled_ddp_trains_to_eager_numbers(pool2: ProcessGroupPool) -> None:
    cfg = {"backend": "aot_eager", "sizes": [3, 5], "channels": 3, "spatial": (6, 6), "steps": 3}
    results = pool2.run(cs.compiled_ddp_training, cfg, timeout=300)
    for rank, states in enumerate(results):
        eager = states["eager"]
        for variant in ("compile_then_ddp", "compile_ddp"):
            assert states[variant].keys() == eager.keys()
            for key, expected in eager.items():
                torch.testing.assert_close(
                    states[variant][key].double(),
                    expected.double(),
                    atol=TIGHT,
                    rtol=0.0,
                    msg=lambda m, k=key, v=variant, r=rank: f"rank {r} {v} {k}: {m}",
                )
