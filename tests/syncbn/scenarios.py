"""Functions that run on every rank of a :class:`ProcessGroupPool` (top level, so spawned ranks can import them).

Every rank builds the same global batch from a seed and takes its slice; the test process builds the reference
(plain BatchNorm on the whole batch, float64) from the same seed and compares.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from tests.syncbn.reference_kernels import StandInKernels, stand_in_kernels

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


def run_layer(
    layer: nn.Module,
    cfg: dict[str, Any],
    rank: int | None,
    part: slice | None = None,
    mode: StandInKernels | None = None,
) -> dict[str, Any]:
    """Run ``cfg['steps']`` forward/backward passes of ``layer`` on rank ``rank``'s slice of the global batch.

    ``rank=None`` takes ``part`` of the batch instead (default: all of it). Inputs and upstream gradients are
    made on ``cfg['device']`` before each pass; with ``cfg['forbid_host_sync']`` (CUDA) every pass runs under
    ``torch.cuda.set_sync_debug_mode("error")``, reset whatever happens. With the stand-ins' ``mode``, the
    host syncs the passes themselves issued are returned in ``host_syncs``.
    """
    host_syncs: list[str] = []
    in_dtype = _dtype(cfg.get("dtype", "float64"))
    device = cfg.get("device", "cpu")
    out: dict[str, Any] = {}
    for step in range(cfg.get("steps", 1)):
        x_all, dy_all = make_global_batch(cfg, step)
        rows = (part or slice(None)) if rank is None else rank_slice(cfg, rank)
        x = x_all[rows].to(device=device, dtype=in_dtype)
        dy = dy_all[rows].to(device=device, dtype=in_dtype)
        if cfg.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        if layer.weight is not None and layer.weight.grad is not None:
            layer.weight.grad = None
            layer.bias.grad = None
        if cfg.get("forbid_host_sync"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any .item()/.cpu() on the hot path raises
        if mode is not None:
            mode.clear()
        try:
            y = layer(x)
            y.backward(dy)
            if mode is not None:
                host_syncs += mode.host_syncs
        finally:
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
    out["host_syncs"] = host_syncs
    out["param_dtype"] = None if layer.weight is None else layer.weight.dtype
    out["grad_dtype"] = None if layer.weight is None else layer.weight.grad.dtype
    return out


def build_sync_layer(cfg: dict[str, Any], process_group: Any = None) -> syncbn.SyncBatchNorm:
    """The layer of ``cfg`` on ``cfg['device']`` with ``cfg['param_dtype']`` parameters and buffers."""
    layer = syncbn.SyncBatchNorm(
        cfg["channels"],
        **layer_kwargs(cfg),
        process_group=process_group,
        device=cfg.get("device", "cpu"),
        dtype=_dtype(cfg.get("param_dtype", "float64")),
    )
    if layer.affine:
        w, b = make_affine(cfg)
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.device))
            layer.bias.copy_(b.to(layer.bias.device))
    return layer


@contextmanager
def kernels_switch(cfg: dict[str, Any]) -> Iterator[StandInKernels | None]:
    """``SYNCBN_CUDA_KERNELS`` as ``cfg['cuda_kernels']`` says, for this call only (the pool's processes are
    reused), and with ``cfg['stand_in']`` the CPU stand-ins for torch's CUDA kernels (yielded, else None)."""
    before = os.environ.get("SYNCBN_CUDA_KERNELS")
    if "cuda_kernels" in cfg:
        os.environ["SYNCBN_CUDA_KERNELS"] = "1" if cfg["cuda_kernels"] else "0"
    try:
        if cfg.get("stand_in"):
            with stand_in_kernels(cuda_rules=True) as mode:
                yield mode
        else:
            yield None
    finally:
        if before is None:
            os.environ.pop("SYNCBN_CUDA_KERNELS", None)
        else:
            os.environ["SYNCBN_CUDA_KERNELS"] = before


def sync_layer_parity(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train-mode passes of one SyncBatchNorm on this rank's slice; returns outputs, grads and running stats.

    ``cfg['cuda_kernels']`` sets ``SYNCBN_CUDA_KERNELS`` for this call only; ``cfg['stand_in']`` runs the passes
    under the CPU stand-ins for torch's CUDA kernels and adds what they recorded (``host_syncs``, ``ops``).
    """
    layer = build_sync_layer(cfg)
    with kernels_switch(cfg) as mode:
        out = run_layer(layer, cfg, rank, mode=mode)
        if mode is not None:
            out["kernel_ops"] = sorted({op for op in mode.ops if "batch_norm" in op})
    return out


def launch_counts(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Ops (that would launch GPU work), collectives and host syncs of one layer's forward and backward, under
    the stand-ins, after a warm-up step: ours (``cfg['cuda_kernels']``) and torch.nn.SyncBatchNorm's Function."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

    from syncbn._functions import SyncBatchNormFunction

    layer = build_sync_layer(cfg)
    x_all, dy_all = make_global_batch(cfg)
    dtype = _dtype(cfg.get("dtype", "float64"))
    x0 = x_all[rank_slice(cfg, rank)].to(dtype)
    if cfg.get("channels_last"):
        x0 = x0.contiguous(memory_format=torch.channels_last)
    dy = dy_all[rank_slice(cfg, rank)].to(dtype)
    group = dist.group.WORLD
    counts: dict[str, Any] = {}
    with kernels_switch(dict(cfg, stand_in=True)) as mode:
        assert mode is not None
        for variant in ("ours", "torch"):
            for _ in range(2):  # the first pass warms caches (the packet's constant, torch's lazy state)
                x = x0.detach().clone().requires_grad_(True)
                mode.clear()
                if variant == "ours":
                    y = SyncBatchNormFunction.apply(
                        x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                        layer.num_batches_tracked, layer.momentum, layer.eps, group, None,
                    )  # fmt: skip
                else:
                    y = TorchSyncBatchNormFunction.apply(
                        x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                        layer.eps, layer.momentum, group, world_size,
                    )  # fmt: skip
                forward = (list(mode.ops), list(mode.collectives), list(mode.host_syncs))
                if layer.weight is not None:  # no gradient accumulation (add_) in the count
                    layer.weight.grad = layer.bias.grad = None
                mode.clear()
                y.backward(dy)
                backward = (list(mode.ops), list(mode.collectives), list(mode.host_syncs))
            counts[variant] = {"forward": forward, "backward": backward}
    return counts


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


def apex_uneven_batches(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """apex's ``two_gpu_test_different_batch_size`` on two ranks: a conv's output, rank 0's input scaled by 50 with
    16 samples, rank 1's 8; one train step of a float32 SyncBatchNorm(6) on it. Returns the layer's output,
    input, upstream gradient, weight/bias gradients and running stats (the test builds the truth from them)."""
    inputs = apex_inputs()
    x, dy = inputs[rank]
    layer = syncbn.SyncBatchNorm(6)
    with kernels_switch(cfg):
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(dy)
    return {
        "y": y.detach(),
        "dx": xr.grad,
        "dw": layer.weight.grad,
        "db": layer.bias.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
    }


def apex_inputs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two ranks' (BatchNorm input, upstream gradient) of apex's uneven-batch test, float32, seeded."""
    gen = torch.Generator().manual_seed(2809)
    conv = nn.Conv2d(3, 6, 3, 1, 1)
    with torch.no_grad():
        w = torch.empty_like(conv.weight)
        nn.init.kaiming_uniform_(w, a=5**0.5, generator=gen)
        conv.weight.copy_(w)
        conv.bias.uniform_(-((1 / 27) ** 0.5), (1 / 27) ** 0.5, generator=gen)
        out = []
        for batch, scale in ((16, 50.0), (8, 1.0)):
            data = torch.randn(batch, 3, 8, 8, generator=gen) * scale
            grad = torch.randint(0, 10, (batch, 6, 8, 8), generator=gen).float() / 10.0 * 2 / 24
            out.append((conv(data), grad))
    return out
