"""CUDA paths: parity on CUDA tensors (gloo with CUDA tensors for 2-3 ranks on one GPU) for the default path and the
single-pass CUDA kernels (``SYNCBN_CUDA_KERNELS=1``), half inputs and half parameters, affine=False, channels_last,
empty ranks, large offsets, torch.compile on CUDA; and at NCCL world size 1 (the Function called directly, so the
synchronising path runs): no host synchronisation on the hot path, CUDA-graph capture. Skipped with a reason on
machines without a GPU (CI has none: ``test_kernels_path.py`` runs the kernels path there through CPU stand-ins);
``make gpu-check`` runs them with bench/bench_gpu.py. Needs torch, pytest and pytest-timeout only."""

from __future__ import annotations

import datetime

import pytest
import torch

import syncbn
from tests.syncbn import compile_scenarios as cs
from tests.syncbn import scenarios as sc
from tests.syncbn.process_group_pool import ProcessGroupPool
from tests.syncbn.test_compile import assert_compiled_equals_eager
from tests.syncbn.test_parity import TIGHT, assert_parity, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]

KERNELS = pytest.mark.parametrize("cuda_kernels", [False, True], ids=["default-path", "cuda-kernels"])


@KERNELS
@pytest.mark.parametrize("spatial", [(), (3, 3), (2, 2, 2)], ids=["N,C", "N,C,H,W", "N,C,D,H,W"])
def test_cuda_tensors_over_gloo_match_global_batchnorm(
    pool2: ProcessGroupPool, spatial: tuple[int, ...], cuda_kernels: bool
) -> None:
    cfg = {"sizes": [3, 5], "channels": 4, "spatial": spatial, "steps": 2, "device": "cuda"}
    cfg["cuda_kernels"] = cuda_kernels
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


@KERNELS
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("param_dtype", ["float32", "same"], ids=["fp32-params", "half-params"])
def test_half_precision_on_cuda(pool2: ProcessGroupPool, dtype: str, param_dtype: str, cuda_kernels: bool) -> None:
    """Half inputs with float32 parameters (autocast-style) and with half parameters (``model.half()``)."""
    cfg = {"sizes": [4, 4], "channels": 3, "spatial": (4, 4), "device": "cuda", "dtype": dtype}
    cfg.update(param_dtype=dtype if param_dtype == "same" else param_dtype, cuda_kernels=cuda_kernels)
    results = pool2.run(sc.sync_layer_parity, cfg)
    assert all(r["y"].dtype == getattr(torch, dtype) for r in results)
    assert all(r["grad_dtype"] == getattr(torch, cfg["param_dtype"]) for r in results)
    tol = 1e-2 if dtype == "float16" else 5e-2
    assert_parity(results, reference(cfg), atol=tol, rtol=tol)


@KERNELS
@pytest.mark.parametrize("spatial", [(), (3, 3)], ids=["N,C", "N,C,H,W"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_affine_false_on_cuda(
    pool2: ProcessGroupPool, spatial: tuple[int, ...], channels_last: bool, cuda_kernels: bool
) -> None:
    """torch's CUDA backward refuses weight=None for reductions only (NCHW) or returns empty gradients."""
    if channels_last and not spatial:
        pytest.skip("channels_last needs a 4D input")
    cfg = {"sizes": [3, 5], "channels": 4, "spatial": spatial, "steps": 2, "device": "cuda", "affine": False}
    cfg.update(channels_last=channels_last, cuda_kernels=cuda_kernels)
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


@KERNELS
def test_channels_last_on_cuda(pool2: ProcessGroupPool, cuda_kernels: bool) -> None:
    cfg = {"sizes": [3, 2], "channels": 5, "spatial": (3, 4), "steps": 2, "device": "cuda", "channels_last": True}
    cfg["cuda_kernels"] = cuda_kernels
    results = pool2.run(sc.sync_layer_parity, cfg)
    assert all(r["y_channels_last"] and r["dx_channels_last"] for r in results)
    assert_parity(results, reference(cfg), TIGHT)


@KERNELS
@pytest.mark.parametrize("sizes", [[0, 4, 3], [1, 1, 1]], ids=["rank0-empty", "one-sample-per-rank"])
def test_empty_and_single_sample_ranks_on_cuda(pool3: ProcessGroupPool, sizes: list[int], cuda_kernels: bool) -> None:
    cfg = {"sizes": sizes, "channels": 3, "spatial": (2, 2), "steps": 2, "device": "cuda", "cuda_kernels": cuda_kernels}
    assert_parity(pool3.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


@KERNELS
def test_large_offset_float32_on_cuda(pool2: ProcessGroupPool, cuda_kernels: bool) -> None:
    cfg = {"sizes": [16, 16], "channels": 4, "spatial": (8, 8), "device": "cuda", "offset": 1e4, "dtype": "float32"}
    cfg.update(param_dtype="float32", cuda_kernels=cuda_kernels)
    results = pool2.run(sc.sync_layer_parity, cfg)
    ref = reference(cfg)
    err_ours = (torch.cat([r["y"].double() for r in results]) - ref["y"]).abs().max().item()
    # Single-process float32 BatchNorm on the same global batch: the accuracy to match.
    x, _ = sc.make_global_batch(cfg)
    single = torch.nn.BatchNorm2d(4)
    w, b = sc.make_affine(cfg)
    with torch.no_grad():
        single.weight.copy_(w.float())
        single.bias.copy_(b.float())
    err_single = (single(x.float()).double() - ref["y"]).abs().max().item()
    assert err_ours <= 2 * err_single + 1e-5, f"ours {err_ours:.3g} vs single-process float32 {err_single:.3g}"


def test_compile_on_cuda_matches_eager(pool2: ProcessGroupPool) -> None:
    cfg = {"backend": "aot_eager", "sizes": [3, 5], "steps": 2, "device": "cuda"}
    assert_compiled_equals_eager(pool2.run(cs.compiled_matches_eager, cfg, timeout=240))


def test_nccl_world_size_one_is_plain_batchnorm(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        x = torch.randn(8, 4, 5, 5, device="cuda")
        ours, plain = syncbn.SyncBatchNorm(4).cuda(), torch.nn.BatchNorm2d(4).cuda()
        assert torch.equal(ours(x), plain(x))
        assert torch.equal(ours.running_var, plain.running_var)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def nccl_world_of_one(tmp_path):
    """An NCCL process group of one rank in this process (NCCL, not gloo: gloo's all-reduce of CUDA tensors
    synchronises a stream in its own worker thread, which the process-wide sync debug mode would report)."""
    import torch.distributed as dist

    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _function_step(layer: syncbn.SyncBatchNorm, x: torch.Tensor, dy: torch.Tensor, group) -> torch.Tensor:
    """One forward+backward of the synchronising Function (at world size 1 the module would skip it)."""
    from syncbn._functions import SyncBatchNormFunction

    y = SyncBatchNormFunction.apply(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.num_batches_tracked,
        0.1, layer.eps, group, None,
    )  # fmt: skip
    y.backward(dy)
    return y


@KERNELS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_no_host_synchronisation_on_the_hot_path(
    nccl_world_of_one, monkeypatch, cuda_kernels: bool, channels_last: bool
) -> None:
    monkeypatch.setenv("SYNCBN_CUDA_KERNELS", "1" if cuda_kernels else "0")
    layer = syncbn.SyncBatchNorm(4).cuda()
    x = torch.randn(8, 4, 5, 5, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)  # made on the device, before the window
    _function_step(layer, x, dy, nccl_world_of_one)  # warm-up (caches, lazy initialisation) outside the window
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any .item()/.cpu()/host-waiting copy now raises
    try:
        for _ in range(2):
            y = _function_step(layer, x, dy, nccl_world_of_one)
    finally:
        torch.cuda.set_sync_debug_mode("default")  # process-wide: never leak into later tests
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@KERNELS
def test_a_training_step_captures_in_a_cuda_graph(nccl_world_of_one, monkeypatch, cuda_kernels: bool) -> None:
    """No host synchronisation means the synchronising path (NCCL, forced at world size 1) can be graph-captured."""
    monkeypatch.setenv("SYNCBN_CUDA_KERNELS", "1" if cuda_kernels else "0")
    layer = syncbn.SyncBatchNorm(4).cuda()
    x = torch.randn(8, 4, 5, 5, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)

    def step() -> torch.Tensor:
        return _function_step(layer, x, dy, nccl_world_of_one)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()  # the warm-up's work done before capture starts
    x.grad = layer.weight.grad = layer.bias.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    graph.replay()
    torch.cuda.synchronize()

    x_ref = x.detach().clone().requires_grad_(True)
    plain = torch.nn.BatchNorm2d(4).cuda()
    y_ref = plain(x_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
