"""The autograd Function behind :class:`syncbn.SyncBatchNorm`: the two collectives and the math around them.

Forward, per rank with ``n`` local elements per channel:

1. local, numerically stable moments ``mean_l`` and ``M2_l = sum((x - mean_l)^2)`` (``torch.var_mean``);
2. one ``all_reduce`` (SUM, float64) of the packed vector ``[n, n*mean_l, M2_l + n*mean_l^2]`` (``2C + 1``
   values; ``3C + 1`` on recording steps, where ``n*mean_l^2`` rides along separately so the between-rank share of
   the variance is known without another collective);
3. global ``mean = S1 / N`` and ``M2 = S2 - N * mean^2`` in float64. Pooling the locally centred moments in float64
   keeps the variance exact where float32 ``E[x^2] - E[x]^2`` loses it (``x = 1e4 + N(0, 1)``);
4. the element-wise normalisation through aten's native inference kernel with the global statistics.

Backward:

1. local per-channel ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` from aten's native batch-norm backward
   (reduction outputs only); these are also this rank's weight/bias gradients;
2. one ``all_reduce`` (SUM, float64) of those ``2C`` values;
3. ``dx = w * invstd * (dy - sum_dy / N - (x - mean) * invstd * sum_dy_xhat / N)``, as one native inference
   batch-norm pass over ``x`` plus one fused ``addcmul`` with ``dy``.

Neither pass gathers per-rank tensors: the volume per layer is independent of the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


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


def channel_view_shape(ndim: int, channels: int) -> list[int]:
    """Shape that broadcasts a per-channel vector against an ``ndim``-D input laid out as (N, C, ...)."""
    return [1, channels] + [1] * (ndim - 2)


def reduction_dims(ndim: int) -> list[int]:
    """All dimensions but the channel dimension 1."""
    return [0, *range(2, ndim)]


def local_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel element count, mean and biased variance of one rank's batch, in float64.

    Reduced-precision inputs are upcast to float32 first so their statistics accumulate in float32 or wider.
    An empty batch gives zeros (not NaN): it contributes nothing to the pooled sums.
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return 0, zeros, zeros.clone()
    source = x.float() if x.dtype in _REDUCED_PRECISION else x
    var, mean = torch.var_mean(source, dim=reduction_dims(x.dim()), correction=0)
    return count, mean.double(), var.double()


def kernel_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """dtype of the statistics handed to aten's batch-norm kernels (the parameters' dtype, float32 for halves)."""
    if weight is not None:
        return weight.dtype
    return torch.float32 if x.dtype in _REDUCED_PRECISION else x.dtype


class SyncBatchNormFunction(torch.autograd.Function):
    """Synchronized batch normalisation: one all-reduce forward, one backward. Private; use the module."""

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
        record: list[BatchMoments] | None,
    ) -> torch.Tensor:
        channels = x.shape[1]
        count, mean_l, var_l = local_moments(x)
        n_local = torch.full((1,), float(count), dtype=torch.float64, device=x.device)
        n_mean = mean_l * count
        # Sum of squares rebuilt from locally centred moments: exact enough in float64 for any offset.
        parts = [n_local, n_mean, var_l * count + n_mean * mean_l]
        if record is not None:
            parts.append(n_mean * mean_l)
        packed = torch.cat(parts)
        # A rank with an empty batch still joins the collective (with zeros) to unblock its peers.
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)

        total = packed[0:1]
        safe_total = total.clamp(min=1.0)
        mean = packed[1 : channels + 1] / safe_total
        m2 = (packed[channels + 1 : 2 * channels + 1] - total * mean * mean).clamp(min=0.0)
        var = m2 / safe_total
        has_data = total > 0

        if running_mean is not None and running_var is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, m2, total, has_data)

        if record is not None:
            between = (packed[2 * channels + 1 :] - total * mean * mean).clamp(min=0.0) / safe_total
            record.append(
                BatchMoments(
                    count_local=n_local[0].clone(),
                    mean_local=mean_l,
                    var_local=var_l,
                    count_global=total[0].clone(),
                    mean_global=mean,
                    var_global=var,
                    between_var=between,
                )
            )

        stat_dtype = kernel_dtype(x, weight)
        mean_k = mean.to(stat_dtype)
        var_k = var.to(stat_dtype)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean_k, invstd.to(stat_dtype))
        ctx.inv_total = 1.0 / safe_total
        ctx.invstd64 = invstd
        ctx.eps = eps
        ctx.process_group = process_group
        if x.numel() == 0:
            return torch.empty_like(x)
        return F.batch_norm(x, mean_k, var_k, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean_k, invstd_k = ctx.saved_tensors
        channels = x.shape[1]
        upcast = x.dtype in _REDUCED_PRECISION
        x_c = x.float() if upcast else x
        dy = grad_out.float() if upcast else grad_out

        if x.numel() == 0:
            grad_weight_local = torch.zeros(channels, dtype=invstd_k.dtype, device=x.device)
            grad_bias_local = torch.zeros_like(grad_weight_local)
        else:
            # Reduction outputs only: sum(dy * (x - mean)) * invstd and sum(dy) with the *global* mean/invstd.
            _, grad_weight_local, grad_bias_local = torch.ops.aten.native_batch_norm_backward(
                dy, x_c, weight, None, None, mean_k, invstd_k, True, ctx.eps, [False, True, True]
            )

        packed = torch.cat([grad_bias_local.double(), grad_weight_local.double()])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.process_group)

        grad_input = None
        if ctx.needs_input_grad[0]:
            sum_dy = packed[:channels]
            sum_dy_xhat = packed[channels:]
            invstd = ctx.invstd64
            scale = invstd if weight is None else invstd * weight.double()
            # dx = scale*dy + (x - mean) * k_x + k_0, the second part as one native inference batch-norm pass.
            k_x = -scale * invstd * sum_dy_xhat * ctx.inv_total
            k_0 = -scale * sum_dy * ctx.inv_total
            stat_dtype = invstd_k.dtype
            ones = torch.ones(channels, dtype=stat_dtype, device=x.device)
            if x.numel() == 0:
                grad_input = torch.empty_like(x)
            else:
                affine_part = F.batch_norm(x_c, mean_k, ones, k_x.to(stat_dtype), k_0.to(stat_dtype), False, 0.0, 0.0)
                scale_view = scale.to(stat_dtype).view(channel_view_shape(x.dim(), channels))
                grad_input = affine_part.addcmul_(dy, scale_view)
                if upcast:
                    grad_input = grad_input.to(x.dtype)

        grad_weight = grad_weight_local.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_bias_local.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    mean: torch.Tensor,
    m2: torch.Tensor,
    total: torch.Tensor,
    has_data: torch.Tensor,
) -> None:
    """Exponential (or, with ``momentum=None``, cumulative) running averages of the global statistics.

    Everything stays on the device: a batch that is empty on every rank leaves the stats (and the batch counter)
    unchanged through ``torch.where`` instead of a host-side check.
    """
    step = has_data.to(torch.long)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(step[0])
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked (got None)")
        factor = has_data.double() / num_batches_tracked.clamp(min=1).double()
    else:
        factor = has_data.double() * momentum
    unbiased = m2 / (total - 1.0).clamp(min=1.0)
    new_mean = running_mean.double() * (1.0 - factor) + mean * factor
    new_var = running_var.double() * (1.0 - factor) + unbiased * factor
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
