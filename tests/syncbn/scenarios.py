"""Functions that run on every rank of a :class:`ProcessGroupPool` (top level, so spawned ranks can import them).

Every rank builds the same global batch from a seed and takes its slice; the test process builds the reference
(plain BatchNorm on the whole batch, float64) from the same seed and compares.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn

BN_CLASS_FOR_DIMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def make_global_batch(cfg: dict[str, Any], step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global input and upstream gradient (float64) of one step, identical on every process."""
    gen = torch.Generator().manual_seed(cfg.get("seed", 0) * 1000 + step)
    shape = (sum(cfg["sizes"]), cfg["channels"], *cfg.get("spatial", ()))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * cfg.get("scale", 1.0)
    # A per-channel spread of means makes mistakes in the pooling visible.
    x = x + torch.linspace(-2.0, 3.0, cfg["channels"], dtype=torch.float64).view(1, -1, *([1] * (x.dim() - 2)))
    x = x + cfg.get("offset", 0.0)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, dy


def make_affine(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(12345)
    c = cfg["channels"]
    return 1.0 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64), torch.randn(c, generator=gen)


def rank_slice(cfg: dict[str, Any], rank: int) -> slice:
    start = sum(cfg["sizes"][:rank])
    return slice(start, start + cfg["sizes"][rank])


def layer_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "eps": cfg.get("eps", 1e-5),
        "momentum": cfg.get("momentum", 0.1),
        "affine": cfg.get("affine", True),
        "track_running_stats": cfg.get("track_running_stats", True),
    }


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def run_layer(layer: nn.Module, cfg: dict[str, Any], rank: int | None, part: slice | None = None) -> dict[str, Any]:
    """Run ``cfg['steps']`` forward/backward passes of ``layer`` on rank ``rank``'s slice of the global batch.

    ``rank=None`` takes ``part`` of the batch instead (default: all of it).
    """
    in_dtype = _dtype(cfg.get("dtype", "float64"))
    out: dict[str, Any] = {}
    for step in range(cfg.get("steps", 1)):
        x_all, dy_all = make_global_batch(cfg, step)
        rows = (part or slice(None)) if rank is None else rank_slice(cfg, rank)
        x = x_all[rows].to(device=cfg.get("device", "cpu"), dtype=in_dtype)
        if cfg.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        if layer.weight is not None and layer.weight.grad is not None:
            layer.weight.grad = None
            layer.bias.grad = None
        if cfg.get("forbid_host_sync"):
            torch.cuda.set_sync_debug_mode("error")  # any .item()/.cpu() on the hot path raises
        y = layer(x)
        y.backward(dy_all[rows].to(device=y.device, dtype=y.dtype))
        if cfg.get("forbid_host_sync"):
            torch.cuda.set_sync_debug_mode("default")
        out = {
            "y": y.detach().cpu(),
            "dx": x.grad.cpu(),
            "dw": None if layer.weight is None else layer.weight.grad.cpu(),
            "db": None if layer.bias is None else layer.bias.grad.cpu(),
        }
    out["y_channels_last"] = out["y"].is_contiguous(memory_format=torch.channels_last) if out["y"].dim() == 4 else None
    out["dx_channels_last"] = (
        out["dx"].is_contiguous(memory_format=torch.channels_last) if out["dx"].dim() == 4 else None
    )
    out["running_mean"] = None if layer.running_mean is None else layer.running_mean.cpu()
    out["running_var"] = None if layer.running_var is None else layer.running_var.cpu()
    out["num_batches_tracked"] = None if layer.num_batches_tracked is None else int(layer.num_batches_tracked)
    return out


def build_sync_layer(cfg: dict[str, Any], process_group: Any = None) -> syncbn.SyncBatchNorm:
    layer = syncbn.SyncBatchNorm(
        cfg["channels"],
        **layer_kwargs(cfg),
        process_group=process_group,
        dtype=_dtype(cfg.get("param_dtype", "float64")),
    )
    if layer.affine:
        w, b = make_affine(cfg)
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.device))
            layer.bias.copy_(b.to(layer.bias.device))
    return layer


def sync_layer_parity(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train-mode passes of one SyncBatchNorm on this rank's slice; returns outputs, grads and running stats.

    ``cfg['cuda_kernels']`` sets ``SYNCBN_CUDA_KERNELS`` for this call only (the pool's processes are reused).
    """
    layer = build_sync_layer(cfg)
    if "cuda_kernels" not in cfg:
        return run_layer(layer, cfg, rank)
    before = os.environ.get("SYNCBN_CUDA_KERNELS")
    os.environ["SYNCBN_CUDA_KERNELS"] = "1" if cfg["cuda_kernels"] else "0"
    try:
        return run_layer(layer, cfg, rank)
    finally:
        if before is None:
            del os.environ["SYNCBN_CUDA_KERNELS"]
        else:
            os.environ["SYNCBN_CUDA_KERNELS"] = before


def subgroup_parity(rank: int, world_size: int, cfg: dict[str, Any], groups: list[list[int]]) -> dict[str, Any]:
    """Like :func:`sync_layer_parity` but every layer synchronises only within its subgroup."""
    mine = None
    for ranks in groups:  # every rank must create every group, in the same order
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    layer = build_sync_layer(cfg, process_group=mine)
    return run_layer(layer, cfg, rank)


def count_collectives(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Profile one train step of a 3-layer model; return the collectives the profiler saw, with their shapes."""
    from torch.profiler import ProfilerActivity, profile

    c = cfg["channels"]
    model = nn.Sequential(
        syncbn.SyncBatchNorm(c, dtype=torch.float64),
        nn.ReLU(),
        syncbn.SyncBatchNorm(c, dtype=torch.float64),
        syncbn.SyncBatchNorm(c, dtype=torch.float64),
    )
    x_all, dy_all = make_global_batch(cfg)
    x = x_all[rank_slice(cfg, rank)].requires_grad_(True)
    record = cfg.get("record", False)
    recorder = syncbn.BatchStatsRecorder(model)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        if record:
            with recorder.recording():
                y = model(x)
        else:
            y = model(x)
        y.backward(dy_all[rank_slice(cfg, rank)])
    events = [
        {"name": e.name, "shapes": [list(s) for s in e.input_shapes if s]}
        for e in prof.events()
        if e.name.startswith("c10d::") or "gloo:" in e.name
    ]
    return {"events": events}


def eval_without_peers(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Only rank 0 runs eval-mode forwards; any collective would block until the gloo timeout."""
    layer = build_sync_layer(cfg)
    x_all, _ = make_global_batch(cfg)
    x = x_all[rank_slice(cfg, rank)]
    layer.train()
    layer(x)  # one synchronized training pass on every rank, so running stats are global
    if rank != 0:
        return None
    layer.eval()
    with torch.no_grad():
        outs = [layer(x) for _ in range(3)]
        reference = nn.functional.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
        )
    return {"outs": outs, "reference": reference}


def world_size_one_matches_batchnorm(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Inside a real group of one rank, SyncBatchNorm must be bit-identical to BatchNorm."""
    dtype = _dtype(cfg.get("dtype", "float32"))
    x_all, dy_all = make_global_batch(cfg)
    x_all, dy_all = x_all.to(dtype), dy_all.to(dtype)
    dims = x_all.dim()
    sync = syncbn.SyncBatchNorm(cfg["channels"], dtype=dtype)
    plain = BN_CLASS_FOR_DIMS[dims](cfg["channels"], dtype=dtype)
    results = {}
    for name, layer in (("sync", sync), ("plain", plain)):
        x = x_all.clone().requires_grad_(True)
        y = layer(x)
        y.backward(dy_all)
        results[name] = (y.detach(), x.grad, layer.weight.grad, layer.running_var.clone())
    return results


def ddp_training(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """A few DDP SGD steps of a small converted CNN on this rank's slice; returns the final state dict."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = small_cnn().double()
    model = syncbn.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for step in range(cfg["steps"]):
        x_all, _ = make_global_batch(cfg, step)
        target = torch.arange(x_all.shape[0]) % 3
        part = rank_slice(cfg, rank)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x_all[part]), target[part], reduction="sum") / x_all.shape[0]
        # Sum-then-divide by the global batch and multiply by world size: DDP averages over ranks.
        (loss * world_size).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def small_cnn() -> nn.Module:
    """Conv -> BN -> ReLU -> Conv -> BN -> pool -> Linear -> BN1d -> Linear, with plain BatchNorm layers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def record_stats(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One recorded train step of a two-layer model on this rank's slice; returns the recorder's snapshot."""
    c = cfg["channels"]
    model = nn.Sequential(syncbn.SyncBatchNorm(c, dtype=torch.float64), nn.BatchNorm2d(c, dtype=torch.float64))
    x_all, dy_all = make_global_batch(cfg)
    part = rank_slice(cfg, rank)
    recorder = syncbn.BatchStatsRecorder(model)
    with recorder.recording():
        y = model(x_all[part])
    y.backward(dy_all[part])
    snap = recorder.snapshot()
    y2 = model(x_all[part])  # not recorded: the next pass sends the usual packet and records nothing
    y2.sum().backward()
    recorder.close()
    return snap


def record_both_stats(rank: int, world_size: int, cfg: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """One recorded train step of a synchronized and a plain layer; returns `(snapshot(), packed_snapshot())`."""
    c = cfg["channels"]
    model = nn.Sequential(syncbn.SyncBatchNorm(c, dtype=torch.float64), nn.BatchNorm2d(c, dtype=torch.float64))
    x_all, dy_all = make_global_batch(cfg)
    recorder = syncbn.BatchStatsRecorder(model)
    with recorder.recording():
        y = model(x_all[rank_slice(cfg, rank)])
    y.backward(dy_all[rank_slice(cfg, rank)])
    both = recorder.snapshot(), recorder.packed_snapshot()
    recorder.close()
    return both
