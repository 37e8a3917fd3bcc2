"""Numerical parity of SyncBatchNorm on real gloo groups against BatchNorm on the concatenated global batch.

Every case compares, in float64 unless the case is about dtypes: the forward output and the input gradient
(rank slices concatenated), the sum over ranks of the weight/bias gradients, and every rank's running statistics.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.syncbn import scenarios as sc
from tests.syncbn.process_group_pool import ProcessGroupPool

TIGHT = 1e-10


def reference(cfg: dict[str, Any], part: slice | None = None) -> dict[str, Any]:
    """Plain BatchNorm (float64) on the whole global batch of ``cfg`` (or on rows ``part`` of it)."""
    dims = 2 + len(cfg.get("spatial", ()))
    ref_cfg = dict(cfg, dtype="float64", param_dtype="float64", channels_last=False, device="cpu")
    ref_cfg.pop("forbid_host_sync", None)
    layer = sc.BN_CLASS_FOR_DIMS[dims](cfg["channels"], dtype=torch.float64, **sc.layer_kwargs(cfg))
    if layer.affine:
        w, b = sc.make_affine(cfg)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return sc.run_layer(layer, ref_cfg, None, part)


def assert_parity(results: list[dict[str, Any]], ref: dict[str, Any], atol: float, rtol: float = 0.0) -> None:
    y = torch.cat([r["y"].double() for r in results])
    dx = torch.cat([r["dx"].double() for r in results])
    torch.testing.assert_close(y, ref["y"], atol=atol, rtol=rtol, msg=lambda m: f"forward output: {m}")
    torch.testing.assert_close(dx, ref["dx"], atol=atol, rtol=rtol, msg=lambda m: f"input gradient: {m}")
    if ref["dw"] is not None:
        dw = sum(r["dw"].double() for r in results)
        db = sum(r["db"].double() for r in results)
        torch.testing.assert_close(dw, ref["dw"], atol=atol * 10, rtol=rtol, msg=lambda m: f"summed dweight: {m}")
        torch.testing.assert_close(db, ref["db"], atol=atol * 10, rtol=rtol, msg=lambda m: f"summed dbias: {m}")
    for rank, r in enumerate(results):
        if ref["running_mean"] is None:
            assert r["running_mean"] is None and r["running_var"] is None
            continue
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(
                r[key].double(), ref[key], atol=atol, rtol=rtol, msg=lambda m, k=key, i=rank: f"rank {i} {k}: {m}"
            )
        assert r["num_batches_tracked"] == ref["num_batches_tracked"]


@pytest.mark.parametrize(
    "spatial",
    [(), (5,), (3, 3), (2, 2, 2)],
    ids=["N,C", "N,C,L", "N,C,H,W", "N,C,D,H,W"],
)
def test_every_input_rank_matches_global_batchnorm(pool2: ProcessGroupPool, spatial: tuple[int, ...]) -> None:
    cfg = {"sizes": [3, 5], "channels": 4, "spatial": spatial, "steps": 2}
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


@pytest.mark.parametrize(
    ("sizes", "spatial"),
    [([1, 4, 2], (3, 3)), ([1, 1, 1], ()), ([7, 1, 3], (4,))],
    ids=["uneven", "one-sample-per-rank-NC", "uneven-NCL"],
)
def test_uneven_and_single_sample_batches(pool3: ProcessGroupPool, sizes: list[int], spatial: tuple[int, ...]) -> None:
    cfg = {"sizes": sizes, "channels": 3, "spatial": spatial, "steps": 2}
    assert_parity(pool3.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


def test_one_sample_per_rank_nc_with_two_ranks(pool2: ProcessGroupPool) -> None:
    # Plain BatchNorm1d refuses a batch of one sample; the global batch here has two.
    cfg = {"sizes": [1, 1], "channels": 5, "steps": 3}
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


@pytest.mark.parametrize("sizes", [[0, 4, 3], [4, 3, 0]], ids=["rank0-empty", "last-rank-empty"])
def test_rank_with_empty_batch_joins_and_others_stay_exact(pool3: ProcessGroupPool, sizes: list[int]) -> None:
    cfg = {"sizes": sizes, "channels": 3, "spatial": (2, 2), "steps": 2}
    results = pool3.run(sc.sync_layer_parity, cfg, timeout=60)
    assert_parity(results, reference(cfg), TIGHT)
    empty = results[sizes.index(0)]
    assert empty["y"].shape[0] == 0 and empty["dx"].shape[0] == 0
    assert torch.count_nonzero(empty["dw"]) == 0 and torch.count_nonzero(empty["db"]) == 0


def test_all_ranks_empty_leaves_running_stats_unchanged(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [0, 0], "channels": 3, "spatial": (2, 2), "steps": 2}
    for r in pool2.run(sc.sync_layer_parity, cfg, timeout=60):
        assert r["y"].numel() == 0
        assert torch.equal(r["running_mean"], torch.zeros(3, dtype=torch.float64))
        assert torch.equal(r["running_var"], torch.ones(3, dtype=torch.float64))
        assert r["num_batches_tracked"] == 0
        assert torch.isfinite(r["dw"]).all() and torch.isfinite(r["db"]).all()


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": None},
        {"momentum": 0.3, "eps": 1e-3},
        {"affine": False},
        {"track_running_stats": False},
    ],
    ids=["cumulative-average", "momentum-eps", "affine-false", "no-running-stats"],
)
def test_layer_options(pool2: ProcessGroupPool, options: dict[str, Any]) -> None:
    cfg = {"sizes": [2, 6], "channels": 3, "spatial": (2, 3), "steps": 3, **options}
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


def test_float32_matches_float64_reference(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [5, 3], "channels": 6, "spatial": (4, 4), "steps": 2, "dtype": "float32", "param_dtype": "float32"}
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_inputs_with_float32_parameters(pool2: ProcessGroupPool, dtype: str, tol: float) -> None:
    cfg = {"sizes": [4, 4], "channels": 3, "spatial": (4, 4), "dtype": dtype, "param_dtype": "float32", "offset": 5.0}
    results = pool2.run(sc.sync_layer_parity, cfg)
    for r in results:
        assert r["y"].dtype == getattr(torch, dtype) and r["dx"].dtype == getattr(torch, dtype)
        assert r["dw"].dtype == torch.float32
    # The statistics are of the rounded inputs, accumulated in float32 or wider: compare with float64 BatchNorm
    # on exactly those rounded values, so the only error left is the output's own rounding.
    rounded_ref = reference_on_rounded(cfg, getattr(torch, dtype))
    torch.testing.assert_close(results[0]["running_mean"].double(), rounded_ref["running_mean"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[1]["running_var"].double(), rounded_ref["running_var"], atol=1e-5, rtol=1e-5)
    y = torch.cat([r["y"].double() for r in results])
    torch.testing.assert_close(y, rounded_ref["y"], atol=tol * 4, rtol=tol)


def reference_on_rounded(cfg: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    x, _ = sc.make_global_batch(cfg)
    x64 = x.to(dtype).double()
    layer = torch.nn.BatchNorm2d(cfg["channels"], dtype=torch.float64)
    w, b = sc.make_affine(cfg)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    y = layer(x64)
    return {"y": y.detach(), "running_mean": layer.running_mean, "running_var": layer.running_var}


def test_channels_last_in_channels_last_out(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [3, 2], "channels": 8, "spatial": (3, 5), "channels_last": True, "steps": 2}
    results = pool2.run(sc.sync_layer_parity, cfg)
    assert all(r["y_channels_last"] and r["dx_channels_last"] for r in results)
    assert_parity(results, reference(cfg), TIGHT)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_offset_is_as_accurate_as_single_process_float32(pool2: ProcessGroupPool, offset: float) -> None:
    cfg = {
        "sizes": [16, 16],
        "channels": 4,
        "spatial": (8, 8),
        "offset": offset,
        "dtype": "float32",
        "param_dtype": "float32",
    }
    results = pool2.run(sc.sync_layer_parity, cfg)
    ref = reference(cfg)
    ours = torch.cat([r["y"].double() for r in results])
    err_ours = (ours - ref["y"]).abs().max().item()

    # Single-process float32 BatchNorm on the same global batch: the accuracy we must match.
    x, _ = sc.make_global_batch(cfg)
    single = torch.nn.BatchNorm2d(4)
    w, b = sc.make_affine(cfg)
    with torch.no_grad():
        single.weight.copy_(w.float())
        single.bias.copy_(b.float())
    err_single = (single(x.float()).double() - ref["y"]).abs().max().item()
    assert err_ours <= 2 * err_single + 1e-5, f"ours {err_ours:.3g} vs single-process float32 {err_single:.3g}"

    var_rel = ((results[0]["running_var"].double() - ref["running_var"]).abs() / ref["running_var"]).max().item()
    assert var_rel < 1e-3, f"running variance relative error {var_rel:.3g}"

    # The test can tell: the naive float32 E[x^2] - E[x]^2 is far off on this input.
    xf = x.float()
    naive_var = (xf * xf).mean(dim=(0, 2, 3)) - xf.mean(dim=(0, 2, 3)) ** 2
    true_var = x.var(dim=(0, 2, 3), correction=0)
    assert ((naive_var.double() - true_var).abs() / true_var).max() > 1e-2


def test_subgroups_synchronise_among_themselves_only(pool3: ProcessGroupPool) -> None:
    cfg = {"sizes": [2, 3, 4], "channels": 3, "spatial": (2, 2), "steps": 2}
    results = pool3.run(sc.subgroup_parity, cfg, [[0, 1], [2]])
    # Ranks 0 and 1 pool their five samples; rank 2 is alone (a group of one is plain BatchNorm).
    assert_parity(results[:2], reference(cfg, slice(0, 5)), TIGHT)
    assert_parity(results[2:], reference(cfg, slice(5, 9)), TIGHT)


def test_ddp_training_matches_single_process_on_global_batch(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [4, 4], "channels": 3, "spatial": (6, 6), "steps": 4}
    results = pool2.run(sc.ddp_training, cfg)

    torch.manual_seed(0)
    model = sc.small_cnn().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(cfg["steps"]):
        x, _ = sc.make_global_batch(cfg, step)
        target = torch.arange(x.shape[0]) % 3
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    expected = model.state_dict()
    for rank, state in enumerate(results):
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(
                state[key], value, atol=1e-10, rtol=1e-10, msg=lambda m, k=key, r=rank: f"rank {r} {k}: {m}"
            )
