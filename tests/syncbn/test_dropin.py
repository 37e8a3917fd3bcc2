"""Drop-in parity with torch.nn.SyncBatchNorm beyond the numbers: the convert classmethod, copy.deepcopy of a model
converted with a process group (the copy shares the group and still synchronises in it), and torch.save of a whole
model (works on the default group; refuses, naming the remedy, when a live group would be lost)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import syncbn
from tests.syncbn import compile_scenarios as cs
from tests.syncbn.process_group_pool import ProcessGroupPool
from tests.syncbn.test_parity import TIGHT, reference


def test_convert_classmethod_matches_the_module_function() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    converted = syncbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in converted.modules()].count(syncbn.SyncBatchNorm) == 2
    assert type(syncbn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))) is syncbn.SyncBatchNorm


def test_deepcopy_shares_the_group_and_pickling_needs_no_live_group(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [3, 5], "channels": 3, "momentum": 0.1}
    results = pool2.run(cs.deepcopy_and_pickle, cfg)
    ref = reference(cfg)
    y_copy = torch.cat([r["y_copy"] for r in results])
    torch.testing.assert_close(y_copy, ref["y"], atol=TIGHT, rtol=0.0)  # the copy pooled both ranks' batches
    torch.testing.assert_close(torch.cat([r["y_original"] for r in results]), ref["y"], atol=TIGHT, rtol=0.0)
    for rank, r in enumerate(results):
        assert r["same_group"] and r["own_parameters"], f"rank {rank}"
        torch.testing.assert_close(r["running_mean_copy"], ref["running_mean"], atol=TIGHT, rtol=0.0)
        assert "save model.state_dict()" in r["save_with_group"], r["save_with_group"]
        assert r["loaded_group"] is None
        torch.testing.assert_close(r["loaded_running_mean"], r["default_running_mean"], atol=0.0, rtol=0.0)
    torch.testing.assert_close(torch.cat([r["loaded_y"] for r in results]), ref["y"], atol=TIGHT, rtol=0.0)


def test_cuda_kernels_switch_never_sends_cpu_tensors_to_cuda_only_kernels(monkeypatch) -> None:
    from syncbn._cuda_kernels import CUDA_KERNELS_ENV, use_cuda_kernels

    monkeypatch.setenv(CUDA_KERNELS_ENV, "1")
    assert not use_cuda_kernels(torch.zeros(2, 3), None)  # torch.batch_norm_stats & co. have no CPU kernels
    if torch.cuda.is_available():
        cuda = torch.zeros(2, 3, device="cuda")
        assert use_cuda_kernels(cuda, torch.ones(3, device="cuda"))
        assert not use_cuda_kernels(cuda, torch.ones(3, device="cuda", dtype=torch.float64))
    monkeypatch.setenv(CUDA_KERNELS_ENV, "0")
    if torch.cuda.is_available():
        assert not use_cuda_kernels(torch.zeros(2, 3, device="cuda"), None)


@pytest.mark.parametrize(
    ("input_dtype", "weight_dtype", "supported"),
    [
        (torch.float32, None, True),
        (torch.float32, torch.float32, True),
        (torch.float64, torch.float64, True),
        (torch.float16, torch.float32, True),
        (torch.bfloat16, torch.float32, True),
        (torch.float32, torch.float64, False),
        (torch.float16, torch.float64, False),
        (torch.float64, torch.float32, False),
    ],
)
def test_cuda_kernels_take_only_the_dtype_pairings_torch_supports(
    input_dtype: torch.dtype, weight_dtype: torch.dtype | None, supported: bool
) -> None:
    """Other pairings (a float64 model fed float32 input) take the generic path, which handles any."""
    from syncbn._cuda_kernels import kernel_dtypes_supported

    assert kernel_dtypes_supported(input_dtype, weight_dtype) is supported
