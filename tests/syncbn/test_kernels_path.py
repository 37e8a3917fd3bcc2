"""The single-pass CUDA path (``SYNCBN_CUDA_KERNELS=1``) on CPU, through stand-ins for torch's CUDA kernels.

torch's ``batch_norm_stats``/``_update_stats``/``_elemt``/``_backward_reduce``/``_backward_elemt`` have no CPU
kernels; ``tests/syncbn/reference_kernels.py`` implements them from torch's schemas and kernel rules (dtypes,
layouts, int32 count), so the whole kernels path runs here on real gloo groups and is compared with float64
BatchNorm on the global batch. The same stand-ins apply CUDA's rule for ``native_batch_norm_backward`` with
``weight=None`` to the default path, record host synchronisations, and count the ops each path issues per layer
against torch.nn.SyncBatchNorm's own Function. A stand-in is only that: ``test_cuda.py`` runs the real kernels.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.syncbn import reference_kernels as rk
from tests.syncbn import scenarios as sc
from tests.syncbn.process_group_pool import ProcessGroupPool
from tests.syncbn.test_parity import TIGHT, assert_parity, reference

KERNEL_OPS = {
    "aten.batch_norm_update_stats",
    "aten.batch_norm_elemt",
    "aten.batch_norm_backward_reduce",
    "aten.batch_norm_backward_elemt",
}


def kernels(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(cfg, stand_in=True, cuda_kernels=True)


def assert_took_the_kernels_path(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        if r["y"].numel():
            assert set(r["kernel_ops"]) == KERNEL_OPS, f"rank {rank} ran {r['kernel_ops']}"
        assert r["host_syncs"] == [], f"rank {rank} synchronised with the host: {r['host_syncs']}"


def reference_on_rounded(cfg: dict[str, Any]) -> dict[str, Any]:
    """float64 BatchNorm on the global batch rounded to the input dtype (the statistics of what the ranks saw)."""
    dtype = getattr(torch, cfg["dtype"])
    x, dy = sc.make_global_batch(cfg)
    dims = 2 + len(cfg.get("spatial", ()))
    layer = sc.BN_CLASS_FOR_DIMS[dims](cfg["channels"], dtype=torch.float64, **sc.layer_kwargs(cfg))
    if layer.affine:
        w, b = sc.make_affine(cfg)
        pdtype = getattr(torch, cfg.get("param_dtype", "float64"))
        with torch.no_grad():
            layer.weight.copy_(w.to(pdtype).double())
            layer.bias.copy_(b.to(pdtype).double())
    x64 = x.to(dtype).double().requires_grad_(True)
    y = layer(x64)
    y.backward(dy.to(dtype).double())
    return {
        "y": y.detach(),
        "dx": x64.grad,
        "dw": None if layer.weight is None else layer.weight.grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    }


# --- the stand-ins themselves: torch's dtype and layout rules ---------------------------------------------


def test_stand_ins_compute_batch_norm_and_keep_torchs_output_dtypes_and_layouts() -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64) * 2 + 1).half()
    dy = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64).half()
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    with rk.stand_in_kernels():
        mean, invstd = torch.batch_norm_stats(x, 1e-5)
        mean_u, var_u = torch.batch_norm_update_stats(x, None, None, 0.0)
        y = torch.batch_norm_elemt(x, w, b, mean, invstd, 1e-5)
        sum_dy, sum_dy_xmu, gw, _ = torch.batch_norm_backward_reduce(dy, x, mean, invstd, w, True, True, True)
        count = torch.tensor([x.numel() // 3], dtype=torch.int32)
        dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
        y_cl = torch.batch_norm_elemt(x.contiguous(memory_format=torch.channels_last), w, b, mean, invstd, 1e-5)
    assert mean.dtype == invstd.dtype == var_u.dtype == sum_dy.dtype == torch.float32  # float32 for half inputs
    assert y.dtype == dx.dtype == torch.float16 and gw.dtype == torch.float32
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    # Against float64 autograd of plain batch norm on the same (rounded) values.
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    y64 = torch.nn.functional.batch_norm(x64, None, None, w64, b.double(), True, 0.0, 1e-5)
    y64.backward(dy.double())
    torch.testing.assert_close(mean_u.double(), x.double().mean((0, 2, 3)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var_u.double(), x.double().var((0, 2, 3), correction=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), y64.detach(), atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(dx.double(), x64.grad, atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(gw.double(), w64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        # half statistics where the kernels read float32
        (lambda x, w, m, i: torch.batch_norm_elemt(x, w, w, m.half(), i.half(), 1e-5), "Expected mean"),
        # NCHW backward_elemt with float32 statistics reads float32 parameters: half weight refused
        (
            lambda x, w, m, i: torch.batch_norm_backward_elemt(
                x, x, m, i, w.half(), m, m, torch.tensor([8], dtype=torch.int32)
            ),
            "Expected weight",
        ),
        # the count is an int32 tensor
        (lambda x, w, m, i: torch.batch_norm_backward_elemt(x, x, m, i, w, m, m, torch.tensor([8.0])), "count"),
        # NCHW backward_reduce asked for weight gradients without a weight
        (lambda x, w, m, i: torch.batch_norm_backward_reduce(x, x, m, i, None, False, True, True), "weight=None"),
        # float32 input with float64 parameters (a .double() model fed float32)
        (lambda x, w, m, i: torch.batch_norm_elemt(x.float(), w.double(), w.double(), m, i, 1e-5), "weight"),
    ],
    ids=["half-stats", "half-weight-nchw-elemt", "float-count", "no-weight-grads", "float64-params"],
)
def test_stand_ins_refuse_what_torchs_cuda_kernels_refuse(call: Any, message: str) -> None:
    x = torch.randn(2, 3, 2, 2).half()
    w, m, i = torch.ones(3), torch.zeros(3), torch.ones(3)
    with rk.stand_in_kernels(), pytest.raises(RuntimeError, match=message):
        call(x, w, m, i)


# --- the kernels path, every case, against float64 BatchNorm on the global batch ---------------------------


@pytest.mark.parametrize(
    ("spatial", "channels_last"),
    [((), False), ((5,), False), ((3, 3), False), ((3, 3), True), ((2, 2, 2), False)],
    ids=["N,C", "N,C,L", "N,C,H,W", "channels_last", "N,C,D,H,W"],
)
def test_kernels_path_every_input_rank_matches_global_batchnorm(
    pool2: ProcessGroupPool, spatial: tuple[int, ...], channels_last: bool
) -> None:
    cfg = {"sizes": [3, 5], "channels": 4, "spatial": spatial, "steps": 2, "channels_last": channels_last}
    results = pool2.run(sc.sync_layer_parity, kernels(cfg), timeout=180)
    assert_took_the_kernels_path(results)
    if channels_last:
        assert all(r["y_channels_last"] and r["dx_channels_last"] for r in results)
    assert_parity(results, reference(cfg), TIGHT)


@pytest.mark.parametrize(
    ("dtype", "param_dtype", "channels_last", "affine", "tol"),
    [
        ("float32", "float32", False, True, 2e-5),
        ("bfloat16", "float32", True, True, 3e-2),
        ("float16", "float32", False, False, 4e-3),
        ("float16", "float16", False, True, 4e-3),
        ("float16", "float16", True, False, 4e-3),
        ("bfloat16", "bfloat16", False, True, 3e-2),
    ],
    ids=[
        "fp32",
        "bf16-in-fp32-params-CL",
        "fp16-in-no-affine",
        "fp16-params",
        "fp16-params-CL-no-affine",
        "bf16-params",
    ],
)
def test_kernels_path_dtypes_match_float64_on_the_rounded_batch(
    pool2: ProcessGroupPool, dtype: str, param_dtype: str, channels_last: bool, affine: bool, tol: float
) -> None:
    cfg = {"sizes": [4, 3], "channels": 3, "spatial": (4, 4), "dtype": dtype, "param_dtype": param_dtype}
    cfg.update(channels_last=channels_last, affine=affine, offset=3.0)
    results = pool2.run(sc.sync_layer_parity, kernels(cfg), timeout=180)
    assert_took_the_kernels_path(results)
    ref = reference_on_rounded(cfg)
    for r in results:
        assert r["y"].dtype == r["dx"].dtype == getattr(torch, dtype)
        if affine:
            assert r["grad_dtype"] == getattr(torch, param_dtype)
        # statistics in float32 (or wider): the running stats are off by the buffers' own rounding only
        buffer_tol = 1e-3 if param_dtype in ("float16", "bfloat16") else 1e-5
        buffer_tol = 8e-3 if param_dtype == "bfloat16" else buffer_tol
        torch.testing.assert_close(r["running_mean"].double(), ref["running_mean"], atol=buffer_tol, rtol=buffer_tol)
        torch.testing.assert_close(r["running_var"].double(), ref["running_var"], atol=buffer_tol, rtol=buffer_tol)
    y = torch.cat([r["y"].double() for r in results])
    dx = torch.cat([r["dx"].double() for r in results])
    torch.testing.assert_close(y, ref["y"], atol=tol * 4, rtol=tol)
    torch.testing.assert_close(dx, ref["dx"], atol=tol * 4, rtol=tol)
    if affine:
        dw = sum(r["dw"].double() for r in results)
        torch.testing.assert_close(dw, ref["dw"], atol=tol * 20, rtol=tol * 4)


@pytest.mark.parametrize("sizes", [[0, 4, 3], [1, 1, 1], [7, 1, 0]], ids=["rank0-empty", "one-sample", "uneven"])
def test_kernels_path_empty_and_single_sample_ranks(pool3: ProcessGroupPool, sizes: list[int]) -> None:
    cfg = {"sizes": sizes, "channels": 3, "spatial": (2, 2), "steps": 2}
    results = pool3.run(sc.sync_layer_parity, kernels(cfg), timeout=180)
    assert_took_the_kernels_path(results)
    assert_parity(results, reference(cfg), TIGHT)


def test_kernels_path_affine_false_and_channels_last_without_affine(pool2: ProcessGroupPool) -> None:
    for channels_last in (False, True):
        cfg = {"sizes": [2, 4], "channels": 3, "spatial": (2, 3), "steps": 2, "affine": False}
        cfg["channels_last"] = channels_last
        results = pool2.run(sc.sync_layer_parity, kernels(cfg), timeout=180)
        assert_took_the_kernels_path(results)
        assert_parity(results, reference(cfg), TIGHT)


def test_kernels_path_large_offset_float32(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [16, 16], "channels": 4, "spatial": (8, 8), "offset": 1e4, "dtype": "float32"}
    cfg["param_dtype"] = "float32"
    results = pool2.run(sc.sync_layer_parity, kernels(cfg), timeout=180)
    assert_took_the_kernels_path(results)
    ref = reference(cfg)
    err_ours = (torch.cat([r["y"].double() for r in results]) - ref["y"]).abs().max().item()
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


# --- the default path under CUDA's rules, half parameters, accuracy -----------------------------------------


@pytest.mark.parametrize(
    ("spatial", "channels_last"), [((2, 3), False), ((2, 3), True), ((), False)], ids=["NCHW", "channels_last", "N,C"]
)
def test_default_path_affine_false_under_cudas_backward_rule(
    pool2: ProcessGroupPool, spatial: tuple[int, ...], channels_last: bool
) -> None:
    """torch's CUDA native_batch_norm_backward refuses weight=None for reductions-only calls (NCHW) or returns
    0-element gradients (channels_last, 2D); the default path must not depend on either."""
    cfg = {"sizes": [2, 4], "channels": 3, "spatial": spatial, "steps": 2, "affine": False}
    cfg.update(channels_last=channels_last, stand_in=True, cuda_kernels=False)
    results = pool2.run(sc.sync_layer_parity, cfg, timeout=180)
    assert all(r["host_syncs"] == [] for r in results)
    assert_parity(results, reference(cfg), TIGHT)


@pytest.mark.parametrize(
    ("dtype", "affine", "tol"),
    [("float16", True, 4e-3), ("float16", False, 4e-3), ("bfloat16", True, 3e-2)],
    ids=["fp16", "fp16-no-affine", "bf16"],
)
def test_default_path_half_parameters_train_like_model_half(
    pool2: ProcessGroupPool, dtype: str, affine: bool, tol: float
) -> None:
    """``model.half()``: half input, half parameters and buffers (torch's test_DistributedDataParallel_
    SyncBatchNorm_half, apex's --fp16): statistics in float32, gradients in the parameters' dtype."""
    cfg = {"sizes": [4, 3], "channels": 3, "spatial": (4, 4), "dtype": dtype, "param_dtype": dtype, "steps": 2}
    cfg.update(affine=affine, offset=3.0)
    results = pool2.run(sc.sync_layer_parity, cfg, timeout=180)
    ref = reference_on_rounded(dict(cfg, steps=1))
    for r in results:
        assert r["y"].dtype == getattr(torch, dtype)
        if affine:
            assert r["grad_dtype"] == getattr(torch, dtype)
        assert r["num_batches_tracked"] == 2
    step0 = pool2.run(sc.sync_layer_parity, dict(cfg, steps=1))
    y = torch.cat([r["y"].double() for r in step0])
    torch.testing.assert_close(y, ref["y"], atol=tol * 4, rtol=tol)
    buffer_tol = 1e-3 if dtype == "float16" else 8e-3
    torch.testing.assert_close(step0[0]["running_var"].double(), ref["running_var"], atol=buffer_tol, rtol=buffer_tol)


@pytest.mark.parametrize("path", ["default", "kernels"])
def test_apex_uneven_batches_as_accurate_as_torch_batchnorm(pool2: ProcessGroupPool, path: str) -> None:
    """apex's two_gpu_test_different_batch_size: rank 0's input x50 with 16 samples, rank 1's 8; apex checks the
    weight gradient to 1e-6. Ours must be within a few times torch's float32 BatchNorm's error (vs float64)."""
    cfg = {} if path == "default" else {"stand_in": True, "cuda_kernels": True}
    results = pool2.run(sc.apex_uneven_batches, cfg, timeout=180)
    inputs = sc.apex_inputs()
    x, dy = torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs])
    truth = torch.nn.BatchNorm2d(6, dtype=torch.float64)
    x64 = x.double().requires_grad_(True)
    y64 = truth(x64)
    y64.backward(dy.double())
    single = torch.nn.BatchNorm2d(6)
    y32 = single(x)
    y32.backward(dy)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b).abs().max().item()

    dw = sum(r["dw"].double() for r in results)
    err_dw, err_dw_torch = err(dw, truth.weight.grad), err(single.weight.grad, truth.weight.grad)
    assert err_dw < 1e-6, f"apex's check: weight gradient off by {err_dw:.3g}"
    assert err_dw <= 5 * err_dw_torch + 2e-8, f"dweight: ours {err_dw:.3g}, torch float32 {err_dw_torch:.3g}"
    err_mean = err(results[0]["running_mean"], truth.running_mean)
    err_mean_torch = err(single.running_mean, truth.running_mean)
    assert err_mean <= 5 * err_mean_torch + 1e-8, f"running mean: ours {err_mean:.3g}, torch {err_mean_torch:.3g}"
    err_y = err(torch.cat([r["y"] for r in results]), y64.detach())
    assert err_y <= 2 * err(y32.detach(), y64.detach()) + 1e-6


# --- launches and host syncs per layer ----------------------------------------------------------------------


def cuda_launches(ops: list[str], host_syncs: list[str]) -> int:
    """Kernel launches on CUDA of the ops a pass issued: one per op, and a boolean-mask index (torch's Function
    drops empty ranks with three) is at least a nonzero (a count kernel, a device-to-host copy, a select kernel)
    plus the index kernel: 3 more."""
    return len(ops) + 3 * host_syncs.count("aten.index")


@pytest.mark.parametrize(
    ("dtype", "param_dtype", "channels_last", "issued"),
    [
        ("float32", "float32", False, (19, 4)),
        ("float32", "float32", True, (19, 5)),
        ("bfloat16", "float32", False, (19, 4)),
        ("float16", "float16", False, (20, 5)),
    ],
    ids=["fp32", "fp32-channels_last", "bf16-in-fp32-params", "fp16-params"],
)
def test_kernels_path_launches_no_more_than_torchs_function_and_never_syncs(
    pool2: ProcessGroupPool, dtype: str, param_dtype: str, channels_last: bool, issued: tuple[int, int]
) -> None:
    cfg = {"sizes": [4, 4], "channels": 8, "spatial": (7, 7), "dtype": dtype, "param_dtype": param_dtype}
    cfg.update(channels_last=channels_last, cuda_kernels=True)
    counts = pool2.run(sc.launch_counts, cfg, timeout=180)[0]
    ours, theirs = counts["ours"], counts["torch"]
    for name, (_, collectives, syncs) in ours.items():
        assert syncs == [], f"our {name} synchronises with the host: {syncs}"
        assert collectives == ["c10d.allreduce_"], f"our {name} collectives: {collectives}"
    assert theirs["forward"][2], "torch's Function masks empty ranks on the host (the comparison is void otherwise)"
    ours_total = sum(cuda_launches(ops, syncs) for ops, _, syncs in ours.values())
    theirs_total = sum(cuda_launches(ops, syncs) for ops, _, syncs in theirs.values())
    detail = (
        f"ours {ours['forward'][0]} + {ours['backward'][0]}, torch {theirs['forward'][0]} + {theirs['backward'][0]}"
    )
    assert ours_total <= theirs_total, f"launches per layer: ours {ours_total} > torch {theirs_total} ({detail})"
    # What this path issues today (forward, backward): a regression guard.
    assert len(ours["forward"][0]) <= issued[0] and len(ours["backward"][0]) <= issued[1], detail


def test_harness_builds_the_layer_on_the_configured_device() -> None:
    """The CUDA tests' harness put the layer on the CPU and only the input on the GPU (every CUDA test failed
    with a device mismatch); the reference stays on the CPU."""
    layer = sc.build_sync_layer({"channels": 3, "device": "meta", "param_dtype": "float32"})
    assert layer.weight.device.type == "meta" and layer.running_mean.device.type == "meta"
