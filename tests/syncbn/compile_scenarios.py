"""Rank functions for the torch.compile and drop-in parity tests (top level, so spawned ranks can import them).

Each compiles a converted model on a real gloo group and returns, for the test process to compare, what the
compiled and the eager copy of the same model produced from the same inputs.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from tests.syncbn.scenarios import make_affine, make_global_batch, rank_slice, small_cnn


def mixed_model() -> nn.Module:
    """BatchNorm1d on (N, C), BatchNorm2d and BatchNorm3d, converted; float64, deterministic weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Unflatten(1, (3, 2, 1)),
        nn.BatchNorm2d(3, momentum=None),
        nn.Unflatten(2, (1, 2)),
        nn.BatchNorm3d(3),
        nn.Flatten(),
        nn.Tanh(),
    )
    return syncbn.convert_sync_batchnorm(model).double()


def _step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.backward(dy)
    out = {"y": y.detach().cpu(), "dx": x.grad.cpu()}
    model = getattr(model, "_orig_mod", model)  # names without torch.compile's wrapper prefix
    out.update({f"grad.{n}": p.grad.cpu().clone() for n, p in model.named_parameters()})
    out.update({f"buffer.{n}": b.cpu().clone() for n, b in model.named_buffers()})
    return out


def compiled_matches_eager(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """``steps`` train steps of the eager model and of a ``torch.compile(fullgraph=True)`` copy, same inputs.

    Returns both steps' tensors and, when ``cfg['explain']``, dynamo's graph-break count for the model.
    """
    device = cfg.get("device", "cpu")
    eager = mixed_model().to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=cfg["backend"], fullgraph=True)
    out: dict[str, Any] = {"eager": [], "compiled": []}
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(cfg["steps"]):
        x = (torch.randn(cfg["sizes"][rank], 4, dtype=torch.float64, generator=gen) * 2.0 + 1.0).to(device)
        dy = torch.randn(x.shape[0], 6, dtype=torch.float64, generator=gen).to(device)
        out["eager"].append(_step(eager, x, dy))
        out["compiled"].append(_step(compiled, x, dy))
    if cfg.get("explain"):
        explained = torch._dynamo.explain(compiled_model)(x)
        out["graph_breaks"] = explained.graph_break_count
        out["break_reasons"] = [str(r.reason) for r in explained.break_reasons]
    if cfg.get("record"):
        # A recording step runs the layers eagerly (a graph break there, outside fullgraph); it must still work
        # on a compiled model and record the same statistics as the eager model.
        snapshots = []
        for model, runner in ((eager, eager), (compiled_model, torch.compile(compiled_model, backend=cfg["backend"]))):
            recorder = syncbn.BatchStatsRecorder(model)
            with recorder.recording():
                runner(x)
            recorder.close()
            snapshots.append(recorder.snapshot())
        out["snapshots"] = snapshots
    return out


def compiled_ddp_training(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """SGD steps of the same converted CNN under DDP: eager, compile-then-DDP, and torch.compile(DDP(model)).

    Returns each variant's final state dict (parameters and running statistics).
    """
    from torch.nn.parallel import DistributedDataParallel

    def build() -> nn.Module:
        torch.manual_seed(0)
        return syncbn.convert_sync_batchnorm(small_cnn().double())

    def ddp(model: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(model, broadcast_buffers=False)

    models: dict[str, nn.Module] = {}
    runners: dict[str, nn.Module] = {}
    for variant in ("eager", "compile_then_ddp", "compile_ddp"):
        model = build()
        models[variant] = model
        if variant == "eager":
            runners[variant] = ddp(model)
        elif variant == "compile_then_ddp":
            model.compile(backend=cfg["backend"])  # torch's recommendation: compile the module, then wrap it
            runners[variant] = ddp(model)
        else:
            runners[variant] = torch.compile(ddp(model), backend=cfg["backend"])
    optimizers = {v: torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9) for v, r in runners.items()}
    for step in range(cfg["steps"]):
        x_all, _ = make_global_batch(cfg, step)
        target = torch.arange(x_all.shape[0]) % 3
        part = rank_slice(cfg, rank)
        for variant, runner in runners.items():
            optimizers[variant].zero_grad()
            loss = nn.functional.cross_entropy(runner(x_all[part]), target[part], reduction="sum") / x_all.shape[0]
            (loss * world_size).backward()  # DDP averages over ranks: this makes the update the global batch's
            optimizers[variant].step()
    return {v: {k: t.detach().clone() for k, t in m.state_dict().items()} for v, m in models.items()}


def deepcopy_and_pickle(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """deepcopy of a model converted with an explicit group, and torch.save of whole models with/without one."""
    group = dist.new_group(list(range(world_size)))

    def plain() -> nn.Module:
        layer = nn.BatchNorm1d(cfg["channels"], dtype=torch.float64)
        weight, bias = make_affine(cfg)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        return nn.Sequential(layer)

    model = syncbn.SyncBatchNorm.convert_sync_batchnorm(plain(), group)
    copied = copy.deepcopy(model)
    x_all, _ = make_global_batch(cfg)
    x = x_all[rank_slice(cfg, rank)]
    out: dict[str, Any] = {
        "same_group": copied[0].process_group is group,
        "own_parameters": copied[0].weight is not model[0].weight,
        "y_copy": copied(x).detach(),
        "y_original": model(x).detach(),
        "running_mean_copy": copied[0].running_mean.clone(),
    }
    try:
        torch.save(model, io.BytesIO())
        out["save_with_group"] = "saved"
    except TypeError as error:
        out["save_with_group"] = str(error)
    buffer = io.BytesIO()
    default = syncbn.convert_sync_batchnorm(plain())
    default(x)
    torch.save(default, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    out["loaded_group"] = loaded[0].process_group
    out["loaded_running_mean"] = loaded[0].running_mean.clone()
    out["default_running_mean"] = default[0].running_mean.clone()
    out["loaded_y"] = loaded(x).detach()  # synchronises in the default group: both ranks call it
    return out
