"""Benchmark on one GPU: forward+backward time per BatchNorm layer, syncbn vs torch.nn.SyncBatchNorm's Function.

Both sides are called as autograd Functions directly, so both take their synchronising path even at world size 1:

- ``torch``: ``torch.nn.modules._functions.SyncBatchNorm`` (batch_norm_stats, all_gather of [mean, invstd, count],
  a host-synchronising mask over empty ranks, batch_norm_gather_stats_with_counts, batch_norm_elemt; backward
  batch_norm_backward_reduce, one all_reduce, batch_norm_backward_elemt);
- ``kernels``: ours with ``SYNCBN_CUDA_KERNELS=1`` (the same single-pass kernels, one float64 all-reduce forward,
  no host synchronisation);
- ``default``: ours without the switch (the CPU path's shifted sums on CUDA), with ``--with-default``.

Settings: world size 1 on NCCL, and 2 ranks over gloo with CUDA tensors on the same GPU. Shapes: every distinct
BatchNorm layer of torchvision's ResNet-50 (N=32 per rank, C 64-2048, 112x112 down to 7x7), float32 and bfloat16
inputs (float32 parameters), NCHW and channels_last. For each row: ms per forward+backward, ours/torch, and the
achieved bandwidth as a fraction of the GPU's peak, counting the bytes a two-pass layer must move: forward reads
x twice and writes y, backward reads x and dy twice and writes dx (8 activation-sized transfers). The summary
weighs each shape by how often it occurs in ResNet-50 (53 layers): the BatchNorm time of one training step.

Targets (issue 9): ours/torch <= 1.0 on every shape; <= 0.9 on the ResNet-50 sum.

Run: ``python bench/bench_gpu.py [--iters 20] [--json out.json]`` (needs a CUDA GPU; exits 0 with a note otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (channels, height=width, occurrences in torchvision's ResNet-50), N = 32 per rank.
RESNET50_BN = (
    (64, 112, 1),
    (64, 56, 6),
    (256, 56, 4),
    (128, 56, 1),
    (128, 28, 7),
    (512, 28, 5),
    (256, 28, 1),
    (256, 14, 11),
    (1024, 14, 7),
    (512, 14, 1),
    (512, 7, 5),
    (2048, 7, 4),
)
BATCH = 32
DTYPES = ("float32", "bfloat16")
FORMATS = ("nchw", "channels_last")
# Peak memory bandwidth (GB/s) by device name, where the device properties do not expose clock and bus width.
KNOWN_PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L4": 300.0, "A10": 600.0, "T4": 320.0}


def peak_bandwidth_gbps(override: float | None) -> float | None:
    """The GPU's peak memory bandwidth in GB/s: the override, the device properties, or a known name."""
    if override:
        return override
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for name, gbps in KNOWN_PEAK_GBPS.items():
        if name in props.name:
            return gbps
    return None


def _time_layer(variant: str, x0: torch.Tensor, group: Any, world: int, iters: int) -> float:
    """Mean ms of ``iters`` forward+backward passes (after warm-up), synchronised at the ends."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

    from syncbn._functions import SyncBatchNormFunction

    c = x0.shape[1]
    weight = torch.ones(c, device=x0.device, requires_grad=True)
    bias = torch.zeros(c, device=x0.device, requires_grad=True)
    running_mean = torch.zeros(c, device=x0.device)
    running_var = torch.ones(c, device=x0.device)
    tracked = torch.zeros((), dtype=torch.long, device=x0.device)
    x = x0.detach().requires_grad_(True)
    dy = torch.randn_like(x0)
    os.environ["SYNCBN_CUDA_KERNELS"] = "1" if variant == "kernels" else "0"

    def step() -> None:
        if variant == "torch":
            y = TorchSyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, 1e-5, 0.1, group, world)
        else:
            y = SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, tracked, 0.1, 1e-5, group, None)
        y.backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier(group)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def _measure(rank: int, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    variants = ("torch", "kernels", "default") if args.with_default else ("torch", "kernels")
    group = dist.group.WORLD
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(rank)
    for c, hw, count in RESNET50_BN:
        for dtype_name in DTYPES:
            for fmt in FORMATS:
                dtype = getattr(torch, dtype_name)
                x = torch.randn(BATCH, c, hw, hw, device="cuda", generator=gen).to(dtype)
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                row = {"C": c, "HW": hw, "count": count, "dtype": dtype_name, "format": fmt, "world": world}
                for variant in variants:
                    row[f"{variant}_ms"] = _time_layer(variant, x, group, world, args.iters)
                row["bytes"] = 8 * x.numel() * x.element_size()
                rows.append(row)
    return rows


def _rank_main(rank: int, world: int, backend: str, store: str, args: argparse.Namespace, results: Any) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        rows = _measure(rank, world, args)
        if rank == 0:
            results.put(rows)
    finally:
        dist.destroy_process_group()


def run_setting(world: int, backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of one setting (world size, backend), measured in ``world`` spawned processes on GPU 0."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, world, backend, store, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        rows = None
        while rows is None:
            try:
                rows = results.get(timeout=5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit(f"a rank failed in the {backend} x{world} setting (traceback above)") from None
        for p in procs:
            p.join()
    for row in rows:
        row["backend"] = backend
    return rows


def report(rows: list[dict[str, Any]], peak_gbps: float | None) -> str:
    """The results table (markdown) and the ResNet-50 sums, with the issue's targets checked."""
    variants = [v for v in ("kernels", "default") if f"{v}_ms" in rows[0]]
    head = "| setting | C | HxW | dtype | format | torch ms | " + " | ".join(f"{v} ms" for v in variants)
    head += " | kernels/torch | bw torch | bw kernels |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def frac(row: dict[str, Any], variant: str) -> str:
        if not peak_gbps:
            return "n/a"
        return f"{row['bytes'] / (row[f'{variant}_ms'] * 1e-3) / 1e9 / peak_gbps:.0%}"

    worst = 0.0
    for row in rows:
        ratio = row["kernels_ms"] / row["torch_ms"]
        worst = max(worst, ratio)
        setting = f"{row['backend']} x{row['world']}"
        cells = " | ".join(f"{row[f'{v}_ms']:.3f}" for v in variants)
        lines.append(
            f"| {setting} | {row['C']} | {row['HW']}x{row['HW']} | {row['dtype']} | {row['format']} | "
            f"{row['torch_ms']:.3f} | {cells} | {ratio:.2f} | {frac(row, 'torch')} | {frac(row, 'kernels')} |"
        )
    lines.append("")
    lines.append("ResNet-50 BatchNorm time of one training step (53 layers, N=32 per rank):")
    sums_ok = True
    keys = sorted({(r["backend"], r["world"], r["dtype"], r["format"]) for r in rows})
    for key in keys:
        sel = [r for r in rows if (r["backend"], r["world"], r["dtype"], r["format"]) == key]
        torch_ms = sum(r["torch_ms"] * r["count"] for r in sel)
        ours_ms = sum(r["kernels_ms"] * r["count"] for r in sel)
        sums_ok &= ours_ms / torch_ms <= 0.9
        lines.append(
            f"  {key[0]} x{key[1]} {key[2]:<8} {key[3]:<13} torch {torch_ms:8.2f} ms  kernels {ours_ms:8.2f} ms"
            f"  ratio {ours_ms / torch_ms:.2f}"
        )
    lines.append("")
    verdict = "PASS" if worst <= 1.0 else "FAIL"
    lines.append(f"never slower than torch (every shape <= 1.0x): {verdict} (worst {worst:.2f})")
    lines.append(f"ResNet-50 sum <= 0.9x torch in every setting: {'PASS' if sums_ok else 'FAIL'}")
    if not peak_gbps:
        lines.append("peak bandwidth unknown: pass --peak-gbps for the bandwidth fractions")
    else:
        lines.append(f"bandwidth fractions against a peak of {peak_gbps:.0f} GB/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed passes per layer and variant")
    parser.add_argument("--with-default", action="store_true", help="also time ours without SYNCBN_CUDA_KERNELS")
    parser.add_argument("--peak-gbps", type=float, default=None, help="the GPU's peak memory bandwidth, GB/s")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU; none here, nothing measured")
        return
    rows = run_setting(1, "nccl", args) + run_setting(2, "gloo", args)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.iters} passes per cell")
    print(report(rows, peak_bandwidth_gbps(args.peak_gbps)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
