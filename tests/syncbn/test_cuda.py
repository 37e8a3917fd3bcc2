"""CUDA paths: parity on CUDA tensors (gloo with CUDA tensors for 2 ranks on one GPU), no host synchronisation on
the hot path, and NCCL at world size 1. Skipped with a reason on machines without a GPU (CI has none)."""

from __future__ import annotations

import datetime

import pytest
import torch

import syncbn
from tests.syncbn import scenarios as sc
from tests.syncbn.process_group_pool import ProcessGroupPool
from tests.syncbn.test_parity import TIGHT, assert_parity, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]


@pytest.mark.parametrize("spatial", [(), (3, 3)], ids=["N,C", "N,C,H,W"])
def test_cuda_tensors_over_gloo_match_global_batchnorm(pool2: ProcessGroupPool, spatial: tuple[int, ...]) -> None:
    cfg = {"sizes": [3, 5], "channels": 4, "spatial": spatial, "steps": 2, "device": "cuda"}
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


def test_no_host_synchronisation_on_the_hot_path(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [4, 4], "channels": 4, "spatial": (3, 3), "device": "cuda", "forbid_host_sync": True}
    assert_parity(pool2.run(sc.sync_layer_parity, cfg), reference(cfg), TIGHT)


def test_half_precision_on_cuda(pool2: ProcessGroupPool) -> None:
    cfg = {"sizes": [4, 4], "channels": 3, "spatial": (4, 4), "device": "cuda", "dtype": "float16"}
    cfg["param_dtype"] = "float32"
    results = pool2.run(sc.sync_layer_parity, cfg)
    assert all(r["y"].dtype == torch.float16 for r in results)
    assert_parity(results, reference(cfg), atol=1e-2, rtol=1e-2)


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
