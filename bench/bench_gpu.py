"""Benchmark on one GPU: forward+backward time per BatchNorm layer, syncbn vs torch.nn.SyncBatchNorm's Function.

Both sides are called as autograd Functions directly, so both take their synchronising path even at world size 1:

- ``torch``: ``torch.nn.modules._functions.SyncBatchNorm`` (batch_norm_stats, all_gather of [mean, invstd, count],
  a host-synchronising mask over empty ranks, batch_norm_gather_stats_with_counts, batch_norm_elemt; backward
  batch_norm_backward_reduce, one all_reduce, batch_norm_backward_elemt);
- ``kernels``: ours with ``SYNCBN_CUDA_KERNELS=1`` (the same single-pass kernels, one float64 all-reduce forward,
  no host synchronisation);
- ``default``: ours without the switch (the generic path's shifted sums on CUDA), with ``--with-default``.

Settings: world size 1 on NCCL, and 2 ranks over gloo with CUDA tensors on the same GPU. Shapes: every distinct
BatchNorm layer of torchvision's ResNet-50 (N=32 per rank, C 64-2048, 112x112 down to 7x7), float32 and bfloat16
inputs (float32 parameters), NCHW and channels_last. For each cell:

- correctness: ours' output y and input gradient dx against torch's Function on the same x and dy (max absolute
  difference; FAIL beyond 1e-3 for float32, 6e-2 for bfloat16, i.e. a few roundings of the output);
- ms per forward+backward, ours/torch;
- the achieved bandwidth as a fraction of the GPU's peak, counting the bytes a two-pass layer must move (forward
  reads x twice and writes y, backward reads x and dy twice and writes dx: 8 activation-sized transfers); cells
  whose activations (x, y, dy, dx) fit in the L2 cache (60 MB on an H200) are marked "L2" instead, since their
  bytes need not reach memory;
- for the launch-bound shapes (14x14 and 7x7), the CUDA kernels and copies per layer that the torch profiler
  records, forward and backward, ours and torch's.

The summary weighs each shape by how often it occurs in ResNet-50 (53 layers): the BatchNorm time of one training
step. Verdicts (each PASS/FAIL; the exit status is 1 when any fails): outputs match torch's; ours/torch <= 1.0 on
every shape; <= 0.9 on the ResNet-50 sum; ours launches no more kernels per layer than torch's.

Run: ``python bench/bench_gpu.py [--iters 20] [--deadline 200] [--json out.json]`` (needs a CUDA GPU; exits 0 with
a note otherwise). A stuck collective cannot hold it past ``--deadline`` seconds: the ranks are killed, exit 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The repository root, for `import syncbn` here and in the spawned ranks (which re-run this module's top level).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
TOLERANCE = {"float32": 1e-3, "bfloat16": 6e-2}
LAUNCH_BOUND_HW = 14
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


def l2_bytes() -> int:
    """The GPU's L2 cache size (60 MB on an H200); 60 MB where the properties do not say."""
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 60 * 2**20)


class Layer:
    """One layer's parameters and buffers, and a forward+backward step of one variant on given x and dy."""

    def __init__(self, variant: str, channels: int, group: Any, world: int) -> None:
        self.variant, self.group, self.world = variant, group, world
        self.weight = torch.ones(channels, device="cuda", requires_grad=True)
        self.bias = torch.zeros(channels, device="cuda", requires_grad=True)
        self.running_mean = torch.zeros(channels, device="cuda")
        self.running_var = torch.ones(channels, device="cuda")
        self.tracked = torch.zeros((), dtype=torch.long, device="cuda")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

        from syncbn._functions import SyncBatchNormFunction

        os.environ["SYNCBN_CUDA_KERNELS"] = "1" if self.variant == "kernels" else "0"
        if self.variant == "torch":
            return TorchSyncBatchNormFunction.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, 1e-5, 0.1, self.group, self.world
            )
        return SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.tracked, 0.1, 1e-5, self.group, None
        )

    def step(self, x0: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x0.detach().requires_grad_(True)
        y = self.forward(x)
        y.backward(dy)
        return y, x.grad


def _time_layer(layer: Layer, x0: torch.Tensor, dy: torch.Tensor, iters: int) -> float:
    """Mean ms of ``iters`` forward+backward passes (after warm-up), synchronised at the ends."""
    for _ in range(3):
        layer.step(x0, dy)
    torch.cuda.synchronize()
    dist.barrier(layer.group)
    start = time.perf_counter()
    for _ in range(iters):
        layer.step(x0, dy)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def _launches(layer: Layer, x0: torch.Tensor, dy: torch.Tensor) -> tuple[int, int]:
    """CUDA kernels and copies the profiler records in one forward and one backward of ``layer`` (warm)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    layer.step(x0, dy)
    torch.cuda.synchronize()
    counts = []
    x = x0.detach().requires_grad_(True)
    for phase in ("forward", "backward"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            if phase == "forward":
                y = layer.forward(x)
            else:
                y.backward(dy)
            torch.cuda.synchronize()
        counts.append(sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA))
    return counts[0], counts[1]


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
                dy = torch.randn(BATCH, c, hw, hw, device="cuda", generator=gen).to(dtype)
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                    dy = dy.contiguous(memory_format=torch.channels_last)
                row: dict[str, Any] = {"C": c, "HW": hw, "count": count, "dtype": dtype_name, "format": fmt}
                row["world"] = world
                layers = {v: Layer(v, c, group, world) for v in variants}
                y_ref, dx_ref = layers["torch"].step(x, dy)
                for variant in variants:
                    if variant != "torch":
                        y, dx = layers[variant].step(x, dy)
                        row[f"{variant}_y_err"] = (y.double() - y_ref.double()).abs().max().item()
                        row[f"{variant}_dx_err"] = (dx.double() - dx_ref.double()).abs().max().item()
                    row[f"{variant}_ms"] = _time_layer(layers[variant], x, dy, args.iters)
                    if hw <= LAUNCH_BOUND_HW:
                        row[f"{variant}_launches"] = list(_launches(layers[variant], x, dy))
                row["bytes"] = 8 * x.numel() * x.element_size()
                row["fits_l2"] = 4 * x.numel() * x.element_size() <= l2_bytes()
                rows.append(row)
    return rows


def _rank_main(rank: int, world: int, backend: str, store: str, args: argparse.Namespace, results: Any) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        rows = _measure(rank, world, args)
        if rank == 0:
            results.put(rows)
    finally:
        dist.destroy_process_group()


def run_setting(world: int, backend: str, args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """Rows of one setting (world size, backend), measured in ``world`` spawned processes on GPU 0; the ranks are
    killed and the run fails at ``deadline`` (time.monotonic())."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, world, backend, store, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        rows = None
        try:
            while rows is None:
                try:
                    rows = results.get(timeout=2)
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        failed = f"bench_gpu: a rank failed in the {backend} x{world} setting (above)"
                        raise SystemExit(failed) from None
                    if time.monotonic() > deadline:
                        raise SystemExit(
                            f"bench_gpu: FAIL: the {backend} x{world} setting passed the deadline ({args.deadline} s)"
                        ) from None
        finally:
            for p in procs:
                p.join(timeout=30 if rows is not None else 1)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    for row in rows:
        row["backend"] = backend
    return rows


def report(rows: list[dict[str, Any]], peak_gbps: float | None) -> tuple[str, bool]:
    """The results table (markdown), the ResNet-50 sums and the verdicts; and whether every verdict passed."""
    variants = [v for v in ("kernels", "default") if f"{v}_ms" in rows[0]]
    head = "| setting | C | HxW | dtype | format | torch ms | " + " | ".join(f"{v} ms" for v in variants)
    head += " | kernels/torch | y err | dx err | bw torch | bw kernels | launches torch fwd+bwd | launches ours |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def frac(row: dict[str, Any], variant: str) -> str:
        if row["fits_l2"]:
            return "L2"
        if not peak_gbps:
            return "n/a"
        return f"{row['bytes'] / (row[f'{variant}_ms'] * 1e-3) / 1e9 / peak_gbps:.0%}"

    def launches(row: dict[str, Any], variant: str) -> str:
        counts = row.get(f"{variant}_launches")
        return "-" if counts is None else f"{counts[0]}+{counts[1]}"

    worst, correct, fewer_launches = 0.0, True, True
    for row in rows:
        ratio = row["kernels_ms"] / row["torch_ms"]
        worst = max(worst, ratio)
        tol = TOLERANCE[row["dtype"]]
        for v in variants:
            correct &= row[f"{v}_y_err"] <= tol and row[f"{v}_dx_err"] <= tol
        if "kernels_launches" in row:
            fewer_launches &= sum(row["kernels_launches"]) <= sum(row["torch_launches"])
        setting = f"{row['backend']} x{row['world']}"
        cells = " | ".join(f"{row[f'{v}_ms']:.3f}" for v in variants)
        lines.append(
            f"| {setting} | {row['C']} | {row['HW']}x{row['HW']} | {row['dtype']} | {row['format']} | "
            f"{row['torch_ms']:.3f} | {cells} | {ratio:.2f} | {row['kernels_y_err']:.2g} | "
            f"{row['kernels_dx_err']:.2g} | {frac(row, 'torch')} | {frac(row, 'kernels')} | "
            f"{launches(row, 'torch')} | {launches(row, 'kernels')} |"
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
    verdicts = {
        "outputs and input gradients match torch's Function (y, dx within tolerance)": correct,
        f"never slower than torch (every shape <= 1.0x; worst {worst:.2f})": worst <= 1.0,
        "ResNet-50 sum <= 0.9x torch in every setting": sums_ok,
        f"launches per layer <= torch's (shapes up to {LAUNCH_BOUND_HW}x{LAUNCH_BOUND_HW})": fewer_launches,
    }
    for text, ok in verdicts.items():
        lines.append(f"{text}: {'PASS' if ok else 'FAIL'}")
    if not peak_gbps:
        lines.append("peak bandwidth unknown: pass --peak-gbps for the bandwidth fractions")
    else:
        lines.append(f"bandwidth fractions against a peak of {peak_gbps:.0f} GB/s; L2: the activations fit in L2")
    return "\n".join(lines), all(verdicts.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed passes per layer and variant")
    parser.add_argument("--with-default", action="store_true", help="also time ours without SYNCBN_CUDA_KERNELS")
    parser.add_argument("--peak-gbps", type=float, default=None, help="the GPU's peak memory bandwidth, GB/s")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run (then FAIL)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU; none here, nothing measured")
        return 0
    deadline = time.monotonic() + args.deadline
    rows = run_setting(1, "nccl", args, deadline) + run_setting(2, "gloo", args, deadline)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.iters} passes per cell")
    text, passed = report(rows, peak_bandwidth_gbps(args.peak_gbps))
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"passed": passed, "rows": rows}, f, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
