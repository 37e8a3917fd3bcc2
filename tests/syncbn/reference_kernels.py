"""CPU stand-ins for torch's single-pass CUDA batch-norm kernels, so the suite runs syncbn's kernels path on CPU.

torch has no CPU kernels for ``batch_norm_stats``, ``batch_norm_elemt``, ``batch_norm_backward_reduce`` and
``batch_norm_backward_elemt`` (nor for ``batch_norm_gather_stats_with_counts``, which torch's own SyncBatchNorm
Function uses), and ``batch_norm_update_stats`` has a CPU kernel with other dtype rules. :class:`StandInKernels`
is a ``TorchDispatchMode`` that answers these ops on CPU tensors with reference implementations written from
torch's schemas (``native_functions.yaml``) and kernel rules (``aten/src/ATen/native/cuda/Normalization.cu`` and
``Normalization.cuh``):

- statistics (mean, invstd, var, sum_dy, sum_dy_xmu) are in the accumulation dtype: float32 for float16,
  bfloat16 and float32 inputs, float64 for float64, and are computed in that dtype;
- which dtype pairings each kernel takes depends on the layout it picks, as torch's dispatch picks it: the
  channels_last kernels (channels_last inputs, and contiguous inputs whose channel stride is 1, e.g. (N, C)) take
  parameters in the input's dtype or the accumulation dtype; the NCHW kernels read the parameters in the
  input's dtype unless they are "mixed" (then the accumulation dtype), and ``batch_norm_backward_elemt`` on NCHW
  reads float32 parameters whenever a half input comes with float32 statistics; ``mean`` and ``invstd`` must
  share a dtype; ``count`` is an int32 tensor whose sum is the element count per channel;
- outputs: ``batch_norm_elemt`` keeps the input's suggested memory format, ``batch_norm_backward_elemt`` returns
  channels_last only on the channels_last kernel (contiguous otherwise); ``batch_norm_backward_reduce`` returns
  undefined (None) outputs for the flags that are off on NCHW, and always all four on channels_last, with
  0-element weight gradients there when ``weight`` is None; asking NCHW for weight/bias gradients with
  ``weight=None`` fails (torch allocates them from the undefined weight's options, on the CPU).

Mismatches raise ``RuntimeError`` with torch's wording ("Expected weight to have type Float but got Half").
The stand-ins refuse an empty input to the statistics kernels (torch returns NaN there; syncbn never asks).

With ``cuda_rules=True`` the mode also applies CUDA's behaviour to ``native_batch_norm_backward`` asked for the
reductions only (``output_mask=[False, ...]``), which on CUDA goes through ``batch_norm_backward_reduce`` and so
refuses ``weight=None`` on NCHW: the default path's CUDA-only defects show on CPU.

The mode also records what the code under it issues: every op that launches work (:attr:`StandInKernels.ops`,
views and allocations left out: the CPU stand-in for counting CUDA launches), the collectives, and the ops that
would synchronise a CUDA device with the host (``.item()``, ``nonzero``, boolean-mask indexing).

This is a stand-in for torch's kernels only where no GPU exists; ``tests/syncbn/test_cuda.py`` runs the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from syncbn import _cuda_kernels

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Ops that only allocate or make views: no kernel launch on a GPU.
NO_LAUNCH = {
    "aten.view",
    "aten._unsafe_view",
    "aten.as_strided",
    "aten.slice",
    "aten.select",
    "aten.expand",
    "aten.t",
    "aten.transpose",
    "aten.permute",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.alias",
    "aten.detach",
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.new_empty_strided",
    "aten.split",
    "aten.split_with_sizes",
    "aten.unbind",
    "aten._reshape_alias",
    "aten.lift_fresh",
    "aten.is_same_size",
    "aten.sym_size",
    "aten.sym_stride",
    "aten.sym_numel",
    "aten.sym_storage_offset",
    "aten.is_contiguous",
    "aten.is_non_overlapping_and_dense",
}
HOST_SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item", "aten.equal"}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """``at::acc_type<T, /*is_cuda=*/true>``: float32 for the half types and float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


def _expect(name: str, t: torch.Tensor | None, dtype: torch.dtype) -> None:
    """A packed-accessor / data_ptr<T> check: ``t`` (when defined) must have ``dtype``."""
    if t is not None:
        _check(t.dtype == dtype, f"Expected {name} to have type {dtype} but got {t.dtype}")


def _floating(x: torch.Tensor, op: str) -> None:
    _check(x.dtype in FLOATING, f"{op} not implemented for '{x.dtype}'")


def _channels_last_like(t: torch.Tensor) -> bool:
    """``batch_norm_use_channels_last_kernels``: channels_last, or contiguous with a channel stride of 1."""
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.is_contiguous() and t.stride(1) == 1
    )


def _per_channel_shapes(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Every per-channel operand has C elements (torch does not check; a wrong size reads out of bounds)."""
    for name, t in tensors.items():
        if t is not None:
            _check(t.dim() == 1 and t.numel() == x.shape[1], f"{name}: expected ({x.shape[1]},), got {tuple(t.shape)}")


def _planes(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def _suggested_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _mean_var(x: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, computed in the accumulation dtype (as the Welford kernels do)."""
    _floating(x, op)
    channels = x.shape[1]
    _check(x.numel() // max(channels, 1) > 0, f"{op}: stand-in refuses an empty input (torch returns NaN)")
    wide = x.to(accumulation_dtype(x.dtype))
    mean = wide.mean(_planes(x))
    var = (wide - _per_channel(mean, x)).square().mean(_planes(x))
    return mean.contiguous(), var.contiguous()


def batch_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, invstd)``; invstd is 0 where both the variance and eps are 0 (torch's ``InvStd``)."""
    mean, var = _mean_var(x, "batch_norm_stats")
    invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), torch.rsqrt(var + eps))
    return mean, invstd


def batch_norm_update_stats(
    x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased var)`` in the accumulation dtype; updates the running stats when given (unbiased var)."""
    mean, var = _mean_var(x, "batch_norm_update_stats")
    _check((running_mean is None) == (running_var is None), "running_mean and running_var: both or neither")
    if running_mean is not None and running_var is not None:
        n = x.numel() // x.shape[1]
        running_mean.copy_(mean * momentum + (1 - momentum) * running_mean.to(mean.dtype))
        running_var.copy_(var * (n / (n - 1)) * momentum + (1 - momentum) * running_var.to(var.dtype))
    return mean, var


def batch_norm_elemt(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``((x - mean) * invstd) * weight + bias`` in the accumulation dtype, in the input's dtype and format."""
    _floating(x, "batch_norm_elementwise_cuda")
    acc = accumulation_dtype(x.dtype)
    channels_last = _channels_last_like(x) and all(t is None or t.is_contiguous() for t in (weight, bias, mean, invstd))
    _per_channel_shapes(x, mean=mean, invstd=invstd, weight=weight, bias=bias)
    if x.is_contiguous() and x.stride(1) != 1:  # the NCHW template
        first = weight if weight is not None else bias
        stat = acc if first is not None and first.dtype != x.dtype else x.dtype
        _expect("weight", weight, stat)
        _expect("bias", bias, stat)
        _expect("mean", mean, acc)
        _expect("invstd", invstd, acc)
    elif channels_last:
        second = weight if weight is not None else bias
        if second is not None and second.dtype != x.dtype:
            for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)):
                _expect(name, t, acc)
        else:
            if weight is not None:
                _check(
                    weight.dtype == x.dtype,
                    f"batchnorm_forward: input.scalar_type() {x.dtype} is not supported with weight.scalar_type() "
                    f"{weight.dtype}",
                )
            _expect("bias", bias, x.dtype)
            _expect("mean", mean, acc)
            _expect("invstd", invstd, acc)
    # Otherwise torch's general TensorIterator kernel: any floating dtypes, cast on load.
    wide = (x.to(acc) - _per_channel(mean.to(acc), x)) * _per_channel(invstd.to(acc), x)
    if weight is not None:
        wide = wide * _per_channel(weight.to(acc), x)
    if bias is not None:
        wide = wide + _per_channel(bias.to(acc), x)
    return wide.to(x.dtype).contiguous(memory_format=_suggested_format(x))


def batch_norm_backward_reduce(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    input_g: bool,
    weight_g: bool,
    bias_g: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``(sum_dy, sum_dy_xmu, grad_weight, grad_bias)`` of this input, sums in the accumulation dtype."""
    _floating(dy, "batch_norm_backward_reduce")
    _expect("input", x, dy.dtype)
    acc = accumulation_dtype(x.dtype)
    channels = x.shape[1]
    _per_channel_shapes(x, mean=mean, invstd=invstd, weight=weight)
    channels_last = (
        _channels_last_like(dy)
        and _channels_last_like(x)
        and (weight is None or weight.is_contiguous())
        and mean.is_contiguous()
        and invstd.is_contiguous()
    )
    if channels_last:
        _expect("mean", mean, acc)
        _expect("invstd", invstd, acc)
        if weight is not None and weight.dtype != x.dtype:
            _expect("weight", weight, acc)
    else:
        _check(mean.dtype == invstd.dtype, "mean and invstd need to have the same data types")
        stat = acc if weight is not None and weight.dtype != x.dtype else x.dtype
        _expect("mean", mean, acc)
        _expect("weight", weight, stat)
        _check(
            weight is not None or not (weight_g or bias_g),
            "batch_norm_backward_reduce (NCHW): weight_g/bias_g with weight=None allocates the gradients from an "
            "undefined weight's options (a CPU tensor) and fails on CUDA",
        )
    wide_dy = dy.to(acc)
    xmu = x.to(acc) - _per_channel(mean, x)
    sum_dy = wide_dy.sum(_planes(x))
    sum_dy_xmu = (wide_dy * xmu).sum(_planes(x))
    param_dtype = mean.dtype if weight is None else weight.dtype
    grad_weight = (sum_dy_xmu * invstd).to(param_dtype)
    grad_bias = sum_dy.to(param_dtype)
    if channels_last:
        if weight is None:
            grad_weight = grad_bias = torch.empty(0, dtype=mean.dtype)
        return sum_dy, sum_dy_xmu, grad_weight, grad_bias
    assert grad_weight.shape == (channels,)
    return (
        sum_dy if input_g else None,
        sum_dy_xmu if input_g else None,
        grad_weight if weight_g else None,
        grad_bias if bias_g else None,
    )


def batch_norm_backward_elemt(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xmu: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """``(dy - sum_dy/N - (x - mean) * invstd^2 * sum_dy_xmu/N) * weight * invstd``, N the sum of ``count``."""
    _floating(dy, "batch_norm_backward_elemt")
    _expect("input", x, dy.dtype)
    _expect("count", count, torch.int32)
    _per_channel_shapes(x, mean=mean, invstd=invstd, weight=weight, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    acc = accumulation_dtype(x.dtype)
    channels_last = _channels_last_like(dy) and _channels_last_like(x)
    if channels_last:
        for name, t in (("mean", mean), ("invstd", invstd), ("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu)):
            _expect(name, t, acc)
        if weight is not None and weight.dtype != x.dtype:
            _expect("weight", weight, acc)
    else:
        _check(mean.dtype == invstd.dtype, "mean and invstd need to have the same data types")
        stat = acc if x.dtype in HALF and mean.dtype == torch.float32 else x.dtype
        stat_acc = accumulation_dtype(stat)
        for name, t in (("mean", mean), ("invstd", invstd), ("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu)):
            _expect(name, t, stat_acc)
        _expect("weight", weight, stat)
    norm = 1.0 / count.to(torch.int64).sum().to(acc)
    inv = _per_channel(invstd.to(acc), x)
    scale = inv if weight is None else inv * _per_channel(weight.to(acc), x)
    proj = inv * inv * _per_channel(sum_dy_xmu.to(acc), x) * norm
    wide = (dy.to(acc) - _per_channel(sum_dy.to(acc), x) * norm - (x.to(acc) - _per_channel(mean, x)) * proj) * scale
    out_format = _suggested_format(x) if channels_last else torch.contiguous_format
    return wide.to(x.dtype).contiguous(memory_format=out_format)


def batch_norm_gather_stats_with_counts(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``(mean, invstd)`` from per-rank rows (W, C) and counts (W); updates the running stats."""
    scalar = running_mean.dtype if running_mean is not None else x.dtype
    acc = accumulation_dtype(scalar)
    _expect("mean", mean, acc)
    _expect("invstd", invstd, acc)
    _expect("counts", counts, scalar)
    n_j = counts.to(acc).view(-1, 1)
    n = n_j.sum(0)
    avg = (mean * n_j).sum(0) / n
    var_n = (((1.0 / invstd) ** 2 - eps) * n_j + n_j * (mean - avg) ** 2).sum(0)
    if running_mean is not None:
        running_mean.copy_((1 - momentum) * running_mean.to(acc) + momentum * avg)
    if running_var is not None:
        running_var.copy_((1 - momentum) * running_var.to(acc) + momentum * var_n / (n - 1))
    return avg, torch.rsqrt(var_n / n + eps)


def native_batch_norm_backward_on_cuda(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor | None,
    save_invstd: torch.Tensor | None,
    train: bool,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, ...] | None:
    """CUDA's ``native_batch_norm_backward`` for the reductions-only call (``output_mask[0]`` False): torch routes
    it through ``batch_norm_backward_reduce``. None for any other call (the CPU kernel answers it)."""
    if output_mask[0] or not (output_mask[1] or output_mask[2]) or save_mean is None or save_invstd is None:
        return None
    _, _, grad_weight, grad_bias = batch_norm_backward_reduce(
        dy, x, save_mean, save_invstd, weight, False, output_mask[1], output_mask[2]
    )
    return None, grad_weight, grad_bias


KERNELS = {
    aten.batch_norm_stats.default: batch_norm_stats,
    aten.batch_norm_update_stats.default: batch_norm_update_stats,
    aten.batch_norm_elemt.default: batch_norm_elemt,
    aten.batch_norm_backward_reduce.default: batch_norm_backward_reduce,
    aten.batch_norm_backward_elemt.default: batch_norm_backward_elemt,
    aten.batch_norm_gather_stats_with_counts.default: batch_norm_gather_stats_with_counts,
}


def _op_name(func: Any) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


class StandInKernels(TorchDispatchMode):
    """Answers torch's CUDA-only batch-norm ops on CPU tensors (see the module docstring) and records what runs.

    ``ops``: names of the ops that would launch work on a GPU, in order; ``collectives``: the c10d ops;
    ``host_syncs``: the ops that would synchronise a CUDA device with the host.
    """

    def __init__(self, cuda_rules: bool = True) -> None:
        super().__init__()
        self.cuda_rules = cuda_rules
        self.ops: list[str] = []
        self.collectives: list[str] = []
        self.host_syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _op_name(func)
        if name.startswith("c10d."):
            self.collectives.append(name)
        elif name not in NO_LAUNCH:
            self.ops.append(name)
        boolean_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        )
        if name in HOST_SYNCS or boolean_index:
            self.host_syncs.append(name)
        kernel = KERNELS.get(func)
        if kernel is not None:
            return kernel(*args, **kwargs)
        if self.cuda_rules and func is aten.native_batch_norm_backward.default:
            answer = native_batch_norm_backward_on_cuda(*args, **kwargs)
            if answer is not None:
                return answer
        return func(*args, **kwargs)

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self.ops.clear()
        self.collectives.clear()
        self.host_syncs.clear()


@contextmanager
def stand_in_kernels(cuda_rules: bool = True) -> Iterator[StandInKernels]:
    """The stand-ins active, and syncbn allowed to take its kernels path on CPU tensors (with
    ``SYNCBN_CUDA_KERNELS=1``, as on CUDA); yields the mode, whose records the caller may read."""
    mode = StandInKernels(cuda_rules)
    before = getattr(_cuda_kernels, "_ON_CPU_FOR_STAND_INS", False)
    _cuda_kernels._ON_CPU_FOR_STAND_INS = True
    try:
        with mode:
            yield mode
    finally:
        _cuda_kernels._ON_CPU_FOR_STAND_INS = before
