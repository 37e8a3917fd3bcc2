"""Benchmark: a DDP training step of a small ResNet (13 BatchNorm layers) on 2 gloo CPU ranks, four variants.

Variants, alternating round by round in one run so machine noise hits all of them alike:

- ``plain``: local BatchNorm, no synchronisation (the speed we start from);
- ``floor``: plain BatchNorm plus exactly syncbn's collectives (one all-reduce of 2C+1 float64 forward, one of
  2C backward, per layer) and no math: the unavoidable cost of synchronising;
- ``allgather``: torch.nn.SyncBatchNorm's algorithm ported to CPU with torch's public ops: local ``var_mean``
  (for the CUDA-only ``batch_norm_stats``), all_gather of every rank's [mean, invstd, count], combination as in
  ``batch_norm_gather_stats_with_counts``, ``F.batch_norm`` to normalise; backward aten's reductions, an
  all-reduce of [sum_dy, sum_dy_xmu] and the ``batch_norm_backward_elemt`` formula as tensor ops;
- ``syncbn``: ours;
- ``plain_compiled`` and ``syncbn_compiled`` (unless ``--no-compile``): the same two models compiled before the
  DDP wrap (``model.compile()``, torch's recommended order), inductor by default: what compiling buys with and
  without synchronisation (syncbn's collectives run as opaque custom ops inside the compiled graph).

Prints median step times, the ratios the README quotes (syncbn/floor, syncbn/allgather, floor/plain, compiled vs
eager), and the bytes each design moves per layer per step as a function of world size.

Run: ``.venv/bin/python bench/bench_syncbn.py [--rounds 8 --steps 5] [--compile-backend inductor | --no-compile]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncbn

VARIANTS = ("plain", "floor", "allgather", "syncbn")


class _CollectivesOnly(torch.autograd.Function):
    """Identity that issues syncbn's two collectives (same sizes, same dtype) and does no math."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, channels: int) -> torch.Tensor:  # type: ignore[override]
        dist.all_reduce(torch.zeros(2 * channels + 1, dtype=torch.float64))
        ctx.channels = channels
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        dist.all_reduce(torch.zeros(2 * ctx.channels, dtype=grad.dtype))
        return grad, None


class FloorBatchNorm(nn.BatchNorm2d):
    """Plain (local) BatchNorm followed by the collectives syncbn would issue: the communication floor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CollectivesOnly.apply(super().forward(x), self.num_features)


class _AllGatherFunction(torch.autograd.Function):
    """torch.nn.SyncBatchNorm's algorithm on CPU: gather per-rank statistics, combine them locally.

    Where torch calls CUDA-only kernels, this uses the public CPU op that computes the same thing.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        c = x.shape[1]
        # torch.batch_norm_stats (CUDA only) -> its CPU equivalent, torch.var_mean.
        var_l, mean_l = torch.var_mean(x, dim=[0, 2, 3], correction=0)
        invstd_l = torch.rsqrt(var_l.double() + eps)
        count = x.numel() // c
        mine = torch.cat([mean_l.double(), invstd_l, torch.full((1,), float(count), dtype=torch.float64)])
        gathered = torch.empty(dist.get_world_size() * mine.numel(), dtype=torch.float64)
        dist.all_gather_into_tensor(gathered, mine)
        per_rank = gathered.view(dist.get_world_size(), -1)
        means, invstds, counts = per_rank[:, :c], per_rank[:, c : 2 * c], per_rank[:, 2 * c :]
        total = counts.sum()
        mean = (means * counts).sum(0) / total
        var = ((1.0 / invstds**2 - eps + (means - mean) ** 2) * counts).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean.float(), invstd.float())
        ctx.total = total
        return F.batch_norm(x, mean.float(), var.float(), weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, 0.0, [False, True, True]
        )
        packed = torch.cat([gb, gw])
        dist.all_reduce(packed)
        # torch.batch_norm_backward_elemt (CUDA only) -> the same formula in tensor ops.
        shape = (1, c, 1, 1)
        mean_dy = (packed[:c] / ctx.total).float().view(shape)
        mean_dy_xhat = (packed[c:] / ctx.total).float().view(shape)
        inv = invstd.view(shape)
        dx = (dy - mean_dy - (x - mean.view(shape)) * inv * mean_dy_xhat) * inv * weight.view(shape)
        return dx, gw, gb, None


class AllGatherBatchNorm(nn.BatchNorm2d):
    """Synchronized BatchNorm in torch's all_gather design (running stats omitted: they do not affect speed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AllGatherFunction.apply(x, self.weight, self.bias, self.eps)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(norm: type[nn.Module], num_classes: int = 10) -> nn.Module:
    """Stem + 3 stages x 2 basic blocks (16/32/64 channels): 13 BatchNorm layers."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def build(variant: str, compile_backend: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    if variant.endswith("_compiled"):
        model = build(variant.removesuffix("_compiled"))
        model.compile(backend=compile_backend)
        return model
    if variant == "plain":
        return small_resnet(nn.BatchNorm2d)
    if variant == "floor":
        return small_resnet(FloorBatchNorm)
    if variant == "allgather":
        return small_resnet(AllGatherBatchNorm)
    return syncbn.convert_sync_batchnorm(small_resnet(nn.BatchNorm2d))


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    # Compile-then-DDP compiles each BasicBlock's forward as its own frame, once per block instance (guards on the
    # block's shapes): 12 instances in the two compiled models, above dynamo's default limit of 8 recompiles, after
    # which the rest would silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    variants = variants_of(args)
    models = {v: DistributedDataParallel(build(v, args.compile_backend), broadcast_buffers=False) for v in variants}
    opts = {v: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for v, m in models.items()}
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step(v: str) -> None:
        opts[v].zero_grad(set_to_none=True)
        F.cross_entropy(models[v](x), y).backward()
        opts[v].step()

    # The two synchronized variants must compute the same thing: compare one forward/backward before timing.
    outputs = {}
    for v in ("allgather", "syncbn", *(("syncbn_compiled",) if "syncbn_compiled" in models else ())):
        out = models[v](x)
        F.cross_entropy(out, y).backward()
        outputs[v] = (out.detach(), next(models[v].parameters()).grad.clone())
        opts[v].zero_grad(set_to_none=True)
    agree = {
        other: max(
            ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outputs[other], outputs["syncbn"], strict=True)
        )
        for other in outputs
        if other != "syncbn"
    }

    for v in variants:  # warm-up (and, for the compiled variants, compilation)
        for _ in range(3):
            step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for v in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(v)
            times[v].append((time.perf_counter() - start) / args.steps)
    if rank == 0:
        results.put((times, agree))
    dist.destroy_process_group()


def variants_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The variants this run times: the four eager ones, plus the two compiled ones unless ``--no-compile``."""
    return VARIANTS if args.no_compile else (*VARIANTS, "plain_compiled", "syncbn_compiled")


def bytes_table(channels: int = 64) -> str:
    """Bytes per layer per training step each design moves, as the world size grows (float64 payloads)."""
    lines = [
        f"bytes per BatchNorm layer per step (C={channels}, float64); 'result' = tensor each rank receives,",
        "'sent' = bytes each rank sends with ring algorithms (all_reduce 2(W-1)/W x size, all_gather (W-1) x part)",
        f"{'world':>6} {'syncbn result':>14} {'syncbn sent':>12} {'allgather result':>17} {'allgather sent':>15}",
    ]
    fwd, bwd = (2 * channels + 1) * 8, 2 * channels * 8
    for w in (2, 4, 8, 16, 64, 256):
        ours_sent = 2 * (w - 1) / w * (fwd + bwd)
        gather_sent = (w - 1) * fwd + 2 * (w - 1) / w * bwd
        lines.append(f"{w:>6} {fwd + bwd:>14,} {ours_sent:>12,.0f} {w * fwd + bwd:>17,} {gather_sent:>15,.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled variants")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    args = parser.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), args, results)) for r in range(world)
        ]
        for p in procs:
            p.start()
        times = None
        while times is None:
            try:
                times, agree = results.get(timeout=5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit("a rank failed (see its traceback above)") from None
        for p in procs:
            p.join()
    # Minimum over rounds is the least noisy estimate on a shared machine; the median is printed beside it.
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    best = {v: min(t) * 1e3 for v, t in times.items()}
    print(f"DDP step, small ResNet (13 BN), {world} gloo CPU ranks x {args.batch} samples, 32x32, 1 thread/rank")
    print(f"{args.rounds} alternating rounds x {args.steps} steps; ms/step (min over rounds, median, max):")
    for v in variants_of(args):
        print(f"  {v:<16} {best[v]:8.1f} {med[v]:8.1f} {max(times[v]) * 1e3:8.1f}")
    print(f"{'ratio':<22} {'min':>7} {'median':>7}")
    for label, a, b, note in (
        ("floor / plain", "floor", "plain", "cost of synchronising at all"),
        ("syncbn / floor", "syncbn", "floor", "target <= 1.03"),
        ("syncbn / allgather", "syncbn", "allgather", "target <= 0.70"),
        ("syncbn / plain", "syncbn", "plain", ""),
    ):
        print(f"{label:<22} {best[a] / best[b]:7.3f} {med[a] / med[b]:7.3f}  {note}")
    if not args.no_compile:
        for label, a, b in (
            ("syncbn compiled/eager", "syncbn_compiled", "syncbn"),
            ("plain compiled/eager", "plain_compiled", "plain"),
            ("syncbn/plain compiled", "syncbn_compiled", "plain_compiled"),
        ):
            print(f"{label:<22} {best[a] / best[b]:7.3f} {med[a] / med[b]:7.3f}  ({args.compile_backend})")
    for other, diff in agree.items():
        print(f"{other} vs syncbn, relative difference of output and first gradient: {diff:.1e}")
    print()
    print(bytes_table())


if __name__ == "__main__":
    main()
