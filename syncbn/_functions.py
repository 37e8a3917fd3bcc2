"""The autograd Function behind :class:`syncbn.SyncBatchNorm`: the two collectives and the math around them.

Forward, per rank with ``n`` local elements per channel:

1. shifted local sums ``sum(x - K)`` and ``sum((x - K)^2)`` with ``K`` one value of the data per channel (stable
   for large offsets, and cheap: torch's cascade-summing reductions);
2. one ``all_reduce`` (SUM, float64) of the packed vector ``[n, sum(x), sum(x^2)]`` rebuilt from them (``2C + 1``
   values; ``3C + 1`` on recording steps, where ``n * mean_l^2`` rides along so the between-rank share of the
   variance is known without another collective);
3. global ``mean = S1 / N`` and ``var = S2 / N - mean^2`` in float64: the shift cancels exactly, so the variance
   keeps the accuracy of the local shifted sums where float32 ``E[x^2] - E[x]^2`` loses it (``x = 1e4 + N(0, 1)``);
4. the element-wise normalisation through aten's native inference kernel with the global statistics.

Backward:

1. local per-channel ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` from aten's native batch-norm backward
   (reduction outputs only); these are also this rank's weight/bias gradients;
2. one ``all_reduce`` (SUM, in the parameters' dtype) of those ``2C`` values;
3. ``dx = w * invstd * (dy - sum_dy / N - (x - mean) * invstd * sum_dy_xhat / N)``, as one native inference
   batch-norm pass over ``x`` plus one fused ``addcmul`` with ``dy``.

Neither pass gathers per-rank tensors: the volume per layer is independent of the number of ranks.

On CUDA tensors with ``SYNCBN_CUDA_KERNELS=1`` the local steps (forward 1 and 4, backward 1 and 3) use torch's
single-pass CUDA kernels instead (:mod:`syncbn._cuda_kernels`); the packet layout and everything between is shared.
:func:`sync_forward` and :func:`sync_backward` are the two passes; the eager autograd Function below and the
custom ops ``torch.compile`` traces (:mod:`syncbn._compile_ops`) both call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from syncbn._cuda_kernels import (
    REDUCED_PRECISION,
    cuda_backward,
    cuda_local_packet,
    cuda_normalize,
    kernel_layout,
    use_cuda_kernels,
)

#: Rows of the statistics tensor ``sync_forward`` returns: global mean, biased variance, unbiased variance and
#: ``1 / sqrt(var + eps)``, each per channel.
MEAN, VAR, UNBIASED_VAR, INVSTD = 0, 1, 2, 3


@dataclass
class BatchMoments:
    """Batch moments one forward pass of a synchronized layer computed (detached, float64, per channel).

    ``between_var`` is the between-rank part of the global variance: ``sum_i n_i (mean_i - mean)^2 / N``.
    """

    count_local: torch.Tensor
    mean_local: torch.Tensor
    var_local: torch.Tensor
    count_global: torch.Tensor
    mean_global: torch.Tensor
    var_global: torch.Tensor
    between_var: torch.Tensor | None


@dataclass(frozen=True)
class RecordedPass:
    """What a recording forward pass of a synchronized layer keeps: its local first and second moments (a copy
    taken before the all-reduce) and the all-reduced packet itself. No arithmetic happens in the forward pass:
    :func:`derive_moments` derives the moments of all recorded layers at once (``BatchStatsRecorder.packed_snapshot``),
    a dozen ops in all instead of a dozen per layer; :func:`batch_moments` gives one layer's :class:`BatchMoments`.

    Attributes:
        count: this rank's elements per channel.
        local: ``(2, C)`` float64, this rank's ``E[x]`` and ``E[x^2]`` per channel (zeros for an empty batch).
        packed: the all-reduced ``[N, sum(x), sum(x^2), sum_i n_i mean_i^2]`` (``3C + 1`` float64).
    """

    count: int
    local: torch.Tensor
    packed: torch.Tensor

    @property
    def channels(self) -> int:
        return self.local.shape[1]


def derive_moments(
    passes: list[RecordedPass],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(mean_local, var_local, mean_global, var_global)`` of each recorded pass (per-channel views), derived for
    all passes at once: one concatenation per input and each operation once over all their channels."""
    if not passes:
        return []
    channels = [p.channels for p in passes]
    local = torch.cat([p.local for p in passes], dim=1)  # (2, all channels): E[x], E[x^2]
    sums = torch.cat([p.packed[1 : 2 * c + 1].view(2, c) for p, c in zip(passes, channels, strict=True)], dim=1)
    totals = torch.cat([p.packed[0:1] for p in passes]).clamp_(min=1.0)
    moments = sums / torch.repeat_interleave(totals, torch.tensor(channels, device=totals.device))
    mean_l, mean_g = local[0], moments[0]
    var_l = torch.addcmul(local[1], mean_l, mean_l, value=-1.0).clamp_(min=0.0)
    var_g = torch.addcmul(moments[1], mean_g, mean_g, value=-1.0).clamp_(min=0.0)
    rows = [row.split(channels) for row in (mean_l, var_l, mean_g, var_g)]
    return list(zip(*rows, strict=True))


def batch_moments(recorded: RecordedPass) -> BatchMoments:
    """One layer's :class:`BatchMoments` from what its recording pass kept (:func:`derive_moments`, plus the
    counts and the between-rank variance)."""
    ((mean_l, var_l, mean, var),) = derive_moments([recorded])
    total = recorded.packed[0:1].clamp(min=1.0)
    return BatchMoments(
        count_local=torch.tensor(float(recorded.count), dtype=torch.float64),
        mean_local=mean_l,
        var_local=var_l,
        count_global=recorded.packed[0].clone(),
        mean_global=mean,
        var_global=var,
        between_var=(recorded.packed[2 * recorded.channels + 1 :] / total - mean * mean).clamp_(min=0.0),
    )


def channel_view_shape(ndim: int, channels: int) -> list[int]:
    """Shape that broadcasts a per-channel vector against an ``ndim``-D input laid out as (N, C, ...)."""
    return [1, channels] + [1] * (ndim - 2)


def reduction_dims(ndim: int) -> list[int]:
    """All dimensions but the channel dimension 1."""
    return [0, *range(2, ndim)]


def _shifted_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel shift ``K``, ``sum(x - K)`` and ``sum((x - K)^2)``; the sums in float64.

    Shifting keeps the sums small where raw sums of ``x = 1e4 + N(0, 1)`` would cancel catastrophically. ``K`` is
    the first sample's mean of each channel (its first element for (N, C) inputs): close to the batch mean, so
    the centred values are small even when the data is spread wide (apex's test scales one rank's input by 50,
    where the first *element* as shift left the float32 sums off by ~86 roundings of the mean). The sums run
    within each sample's plane in the input's precision (float32 for half inputs: torch's cascade-summing
    reductions), and across samples in float64, an (N, C) tensor: float64 accumulation where it costs little.
    ``x`` must not be empty.
    """
    source = x.float() if x.dtype in REDUCED_PRECISION else x
    channels = x.shape[1]
    if x.dim() == 2:
        # (N, C): no plane to sum within; float64 throughout (such inputs are small).
        wide = source.double()
        shift = wide[0]
        centred = wide - shift
        return shift, centred.sum(0), centred.mul_(centred).sum(0)
    planes = list(range(2, x.dim()))
    shift = source[0:1].mean(planes, keepdim=True)
    centred = source - shift
    sum_c = centred.sum(planes).sum(0, dtype=torch.float64)
    sum_sq_c = centred.mul_(centred).sum(planes).sum(0, dtype=torch.float64)
    return shift.reshape(channels), sum_c, sum_sq_c


def local_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel element count, mean and biased variance of one rank's batch, in float64.

    An empty batch gives zeros (not NaN): it contributes nothing to pooled sums.
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return 0, zeros, zeros.clone()
    shift, sum_c, sum_sq_c = _shifted_sums(x)
    mean_c = sum_c / count
    var = (sum_sq_c / count - mean_c * mean_c).clamp(min=0.0)
    return count, shift.double() + mean_c, var


def _local_packet(x: torch.Tensor, count: int, record: bool) -> torch.Tensor:
    """The forward all-reduce payload of one rank, float64: ``[n, sum(x), sum(x^2)]`` (+ ``[sum(x)^2 / n]``).

    ``sum(x)`` and ``sum(x^2)`` are rebuilt in float64 from the shifted sums; the shift cancels exactly in
    ``sum(x^2) - sum(x)^2 / n`` whatever rounding the shifted sums carry, so the pooled variance keeps the
    accuracy of the local, shifted computation. The optional last part (recording steps) is ``n * mean^2``.
    """
    channels = x.shape[1]
    if count == 0:
        # A rank with an empty batch still joins the collective (with zeros) to unblock its peers.
        return torch.zeros((4 if record else 3) * channels + 1 - channels, dtype=torch.float64, device=x.device)
    shift, sum_c, sum_sq_c = _shifted_sums(x)
    shift = shift.double()
    sum_x = torch.add(sum_c, shift, alpha=count)
    sum_sq = torch.addcmul(sum_sq_c, shift, sum_c + sum_x)  # sum((x-K)^2) + K * (2 sum(x-K) + n K)
    count_t = torch.full((1,), float(count), dtype=torch.float64, device=x.device)
    parts = (count_t, sum_x, sum_sq, sum_x * sum_x / count) if record else (count_t, sum_x, sum_sq)
    return torch.cat(parts)


def kernel_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """dtype of the statistics handed to aten's batch-norm kernels: float32 whenever the input is half (whatever
    the parameters' dtype: torch's kernels take half inputs with float32 statistics only), else the parameters'
    dtype (the input's for a layer without them)."""
    if x.dtype in REDUCED_PRECISION:
        return torch.float32
    return x.dtype if weight is None else weight.dtype


def _as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (itself when it already is, or None)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


# One constant ``[0, 1]`` per device: ``total - [0, 1]`` gives N and N - 1 in one op.
_ZERO_ONE: dict[torch.device, torch.Tensor] = {}


def _zero_one(device: torch.device) -> torch.Tensor:
    zero_one = _ZERO_ONE.get(device)
    if zero_one is None:
        zero_one = _ZERO_ONE[device] = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    return zero_one


def global_statistics(packed: torch.Tensor, channels: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The (4, C) rows :data:`MEAN`, :data:`VAR`, :data:`UNBIASED_VAR`, :data:`INVSTD` in ``dtype``, from the
    all-reduced packet ``[N, sum(x), sum(x^2), ...]`` (float64).

    Nine small ops: ``max(N, 1)`` and ``max(N - 1, 1)`` together, the float64 moments and biased variance (where
    ``E[x^2] - E[x]^2`` needs the width), then the rows written into the result (out= ops round once on store);
    a batch empty on every rank (N = 0) gives zeros, not NaN.
    """
    counts = torch.sub(packed[0:1], _zero_one(packed.device)).clamp_(min=1.0)  # [max(N, 1), max(N - 1, 1)]
    moments = packed[1 : 2 * channels + 1].view(2, channels) / counts[0:1]
    mean, var = moments[0], moments[1]
    var.addcmul_(mean, mean, value=-1.0).clamp_(min=0.0)  # E[x^2] - E[x]^2, the biased variance
    stats = torch.empty((4, channels), dtype=dtype, device=packed.device)
    stats[0:2].copy_(moments)
    torch.addcdiv(stats[VAR], stats[VAR], counts[1:2], out=stats[UNBIASED_VAR])  # var * N / (N - 1)
    torch.rsqrt(var + eps, out=stats[INVSTD])
    return stats


# The resolved overload: calling it skips torch.ops' per-call overload lookup on the hot path.
_BATCH_NORM_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def sync_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    process_group: dist.ProcessGroup | None,
    record: list[RecordedPass] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass on one rank: local packet, one all-reduce, global statistics, normalised output.

    Returns ``(y, stats_k, total)``: the output; ``stats_k`` (4, C), the rows :data:`MEAN`, :data:`VAR`,
    :data:`UNBIASED_VAR` (for the running average) and :data:`INVSTD` in :func:`kernel_dtype` (float32 for half
    inputs); and the global element count per channel (float64, shape ``(1,)``). Shared by the eager autograd
    Function and the custom op ``torch.compile`` sees, so both compute the same numbers; the caller updates the
    running statistics with :func:`update_running_stats`.
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    cuda_kernels = use_cuda_kernels(x, weight)
    if cuda_kernels:
        x = kernel_layout(x)
        packed = cuda_local_packet(x, count, record is not None)
    else:
        packed = _local_packet(x, count, record is not None)
    if record is not None:
        local = packed[1 : 2 * channels + 1].view(2, channels) / max(count, 1)  # a copy: the all-reduce is in place
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)

    total = packed[0:1]
    dtype = kernel_dtype(x, weight)
    stats_k = global_statistics(packed, channels, eps, dtype)

    if record is not None:
        record.append(RecordedPass(count, local, packed))

    if count == 0:
        y = torch.empty_like(x)
    elif cuda_kernels:
        y = cuda_normalize(x, weight, bias, stats_k[MEAN], stats_k[INVSTD], eps)
    else:
        # aten's kernels take a half input with float32 statistics only with float32 parameters.
        weight_k, bias_k = _as_dtype(weight, dtype), _as_dtype(bias, dtype)
        y = torch.batch_norm(
            x, weight_k, bias_k, stats_k[MEAN], stats_k[VAR], False, 0.0, eps, torch.backends.cudnn.enabled
        )
    return y, stats_k, total


def sync_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean_k: torch.Tensor,
    invstd_k: torch.Tensor,
    total: torch.Tensor,
    eps: float,
    process_group: dist.ProcessGroup | None,
    need_input_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The backward pass on one rank: local reductions, one all-reduce, input gradient.

    ``mean_k`` and ``invstd_k`` are rows of :func:`sync_forward`'s statistics. Returns ``(grad_input,
    grad_weight, grad_bias)``; ``grad_input`` is None when not needed, the weight and bias gradients are this
    rank's contributions in the parameters' dtype (zeros where the rank had no data). Every rank all-reduces,
    needed or not, so that the collectives match across ranks.
    """
    if use_cuda_kernels(x, weight):
        return cuda_backward(grad_out, x, weight, mean_k, invstd_k, total, process_group, need_input_grad)
    channels = x.shape[1]
    upcast = x.dtype in REDUCED_PRECISION
    x_c = x.float() if upcast else x
    dy = grad_out.float() if upcast else grad_out
    # The statistics' dtype for the parameters (half ones with float32 statistics are refused by aten), and a
    # weight of ones for a layer without one: torch's CUDA backward, asked for the reductions only, raises
    # (NCHW) or returns empty gradients (channels_last, 2D) when weight is None.
    weight_k = torch.ones_like(mean_k) if weight is None else _as_dtype(weight, mean_k.dtype)

    if x.numel() == 0:
        grad_weight = torch.zeros_like(mean_k)
        grad_bias = torch.zeros_like(mean_k)
    else:
        # Reduction outputs only, with the *global* mean and invstd: this rank's sum(dy * x_hat) (its weight
        # gradient) and sum(dy) (its bias gradient).
        _, grad_weight, grad_bias = _BATCH_NORM_BACKWARD(
            dy, x_c, weight_k, None, None, mean_k, invstd_k, True, eps, [False, True, True]
        )
    packed = torch.cat((grad_bias, grad_weight))
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)

    grad_input = None
    if need_input_grad and x.numel() > 0:
        means = packed.view(2, channels) / total.to(packed.dtype)
        mean_dy, mean_dy_xhat = means[0], means[1]
        scale = invstd_k if weight is None else invstd_k * weight_k
        # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)): the x part as one native inference
        # batch-norm pass ((x - mean) * k_x + k_0), then one fused multiply-add with dy.
        k_x = (scale * invstd_k).mul_(mean_dy_xhat).neg_()
        k_0 = (scale * mean_dy).neg_()
        affine_part = torch.batch_norm(
            x_c, k_x, k_0, mean_k, torch.ones_like(mean_k), False, 0.0, 0.0, torch.backends.cudnn.enabled
        )
        grad_input = affine_part.addcmul_(dy, scale.view(channel_view_shape(x.dim(), channels)))
        if upcast:
            grad_input = grad_input.to(x.dtype)
    elif need_input_grad:
        grad_input = torch.empty_like(x)
    if weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    return grad_input, grad_weight, grad_bias


class SyncBatchNormFunction(torch.autograd.Function):
    """Synchronized batch normalisation in eager mode: one all-reduce forward, one backward. Private.

    Under ``torch.compile`` the module calls the custom op in :mod:`syncbn._compile_ops` instead, which runs the
    same :func:`sync_forward` / :func:`sync_backward`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        num_batches_tracked: torch.Tensor | None,
        momentum: float | None,
        eps: float,
        process_group: dist.ProcessGroup | None,
        record: list[RecordedPass] | None,
    ) -> torch.Tensor:
        y, stats_k, total = sync_forward(x, weight, bias, eps, process_group, record)
        if running_mean is not None and running_var is not None:
            update_running_stats(running_mean, running_var, num_batches_tracked, momentum, stats_k, total)
        ctx.save_for_backward(x, weight, stats_k[MEAN], stats_k[INVSTD])
        ctx.eps = eps
        ctx.total = total
        ctx.process_group = process_group
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean_k, invstd_k = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = sync_backward(
            grad_out, x, weight, mean_k, invstd_k, ctx.total, ctx.eps, ctx.process_group, ctx.needs_input_grad[0]
        )
        if weight is None:
            return grad_input, None, None, None, None, None, None, None, None, None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    stats_k: torch.Tensor,
    total: torch.Tensor,
) -> None:
    """Exponential (or, with ``momentum=None``, cumulative) running averages of the global statistics.

    ``stats_k`` and ``total`` are :func:`sync_forward`'s. Everything stays on the device: a batch that is empty
    on every rank gets weight 0 (stats and batch counter unchanged) instead of a host-side check. The running
    variance is unbiased with the *global* count. Plain tensor ops, so ``torch.compile`` traces them.
    """
    # The statistics are float32 for half inputs; a half module's buffers take them rounded (both rows in one op:
    # MEAN and UNBIASED_VAR as one strided view).
    both = _as_dtype(stats_k[MEAN : UNBIASED_VAR + 1 : UNBIASED_VAR - MEAN], running_mean.dtype)
    mean, unbiased_var = both[0], _as_dtype(both[1], running_var.dtype)
    has_data = total > 0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(has_data[0])
    per_channel = has_data.expand(mean.shape[0])
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked (got None)")
        factor = per_channel.to(running_mean.dtype).div_(num_batches_tracked.clamp(min=1))
    elif running_mean.dtype == torch.float32:
        factor = torch.mul(per_channel, momentum)  # bool * float: float32, one op
    elif running_mean.dtype in REDUCED_PRECISION:  # float32 arithmetic stored as half: one op, same rounding
        factor = torch.mul(per_channel, momentum, out=torch.empty_like(running_mean))
    else:  # float64: momentum in the buffers' own precision
        factor = per_channel.to(running_mean.dtype).mul_(momentum)
    # Both buffers in one op (one launch on CUDA).
    torch._foreach_lerp_([running_mean, running_var], [mean, unbiased_var], [factor, factor])
