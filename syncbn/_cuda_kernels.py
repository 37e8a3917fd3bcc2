"""The single-pass CUDA path of the synchronized layer: torch's native batch-norm CUDA kernels, one all-reduce.

On CUDA tensors the CPU path's local statistics read the activation four times and write it twice (a centred
copy, two reductions, an in-place square). torch ships single-pass CUDA kernels for exactly this work, the ones
``torch.nn.SyncBatchNorm`` uses (``torch/nn/modules/_functions.py``):

- ``torch.batch_norm_stats(x, eps) -> (mean, invstd)``: one Welford pass (channels_last kernels included);
- ``torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps) -> y``;
- ``torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g)
  -> (sum_dy, sum_dy_xmu, grad_weight, grad_bias)``;
- ``torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count) -> dx``, where
  ``count`` is an int32 tensor whose *sum* is the global element count per channel.

Where torch all-gathers every rank's ``[mean, invstd, count]`` and masks empty ranks on the host (a device-to-host
copy), this path turns the local Welford moments into the same float64 packet as the CPU path,
``[n, n * mean, n * (var + mean^2)]``, and sums it in the one all-reduce: no host synchronisation, and pooling the
moments in float64 keeps the accuracy for inputs with large offsets. Backward all-reduces
``[sum(dy), sum(dy * (x - mean))]``.

These ops have no CPU kernels. The path is taken only for CUDA tensors and only when the environment variable
``SYNCBN_CUDA_KERNELS=1`` is set (read on every call), until it has passed the CUDA tests on a real GPU; set it
the same way on every rank, since the backward packet's contents differ from the default path's.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

CUDA_KERNELS_ENV = "SYNCBN_CUDA_KERNELS"
#: Half-precision dtypes: their statistics are computed in float32, and torch's CUDA kernels take them with
#: float32 parameters.
REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def use_cuda_kernels(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ``x`` takes the single-pass CUDA path: a CUDA tensor with ``SYNCBN_CUDA_KERNELS=1``, in a dtype
    pairing torch's kernels accept (:func:`kernel_dtypes_supported`); any other layer takes the generic path."""
    return (
        x.is_cuda
        and os.environ.get(CUDA_KERNELS_ENV) == "1"
        and kernel_dtypes_supported(x.dtype, None if weight is None else weight.dtype)
    )


def kernel_dtypes_supported(input_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> bool:
    """Whether torch's CUDA batch-norm kernels take this input/parameter pairing: the same dtype, or a half
    input (float16, bfloat16) with float32 parameters, as torch's own SyncBatchNorm uses them. A float32 input
    with float64 parameters (a model converted with ``.double()`` and fed float32) is not one of them."""
    if weight_dtype is None or weight_dtype == input_dtype:
        return True
    return input_dtype in REDUCED_PRECISION and weight_dtype == torch.float32


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous or channels_last (2D/3D), else a contiguous copy, as the CUDA kernels expect."""
    if t.is_contiguous():
        return t
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


def cuda_local_packet(x: torch.Tensor, count: int, eps: float, record: bool) -> torch.Tensor:
    """One rank's forward payload, float64: ``[n, sum(x), sum(x^2)]`` (+ ``[sum(x)^2 / n]`` when recording).

    Built from one Welford pass (``batch_norm_stats``): ``sum(x) = n * mean`` and
    ``sum(x^2) = n * (var + mean^2)`` with ``var = invstd^-2 - eps``, in float64. The layout is the CPU path's, so
    everything after the all-reduce is shared.
    """
    channels = x.shape[1]
    size = (4 if record else 3) * channels + 1 - channels
    if count == 0:
        # A rank with an empty batch still joins the collective (with zeros) to unblock its peers.
        return torch.zeros(size, dtype=torch.float64, device=x.device)
    mean, invstd = torch.batch_norm_stats(x, eps)
    mean = mean.double()
    var = invstd.double().pow(-2).sub_(eps).clamp_(min=0.0)
    n = float(count)
    sum_x = mean * n
    sum_sq = torch.addcmul(var, mean, mean).mul_(n)
    count_t = torch.full((1,), n, dtype=torch.float64, device=x.device)
    parts = (count_t, sum_x, sum_sq, sum_x * mean) if record else (count_t, sum_x, sum_sq)
    return torch.cat(parts)


def cuda_normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean_k: torch.Tensor,
    var_k: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``y = (x - mean) * invstd * weight + bias`` through ``torch.batch_norm_elemt`` (keeps x's memory format)."""
    invstd = torch.rsqrt(var_k + eps)
    return torch.batch_norm_elemt(x, weight, bias, mean_k, invstd, eps)


def cuda_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean_k: torch.Tensor,
    var_k: torch.Tensor,
    total: torch.Tensor,
    eps: float,
    process_group: dist.ProcessGroup | None,
    need_input_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Backward with the native reduce/elemt kernels and one all-reduce of ``[sum(dy), sum(dy * (x - mean))]``.

    Returns ``(grad_input, grad_weight, grad_bias)`` like the CPU path: grad_input None when not needed; weight
    and bias gradients are this rank's contributions (zeros for an empty rank or a layer without weight).
    """
    channels = x.shape[1]
    x = kernel_layout(x)
    dy = kernel_layout(grad_out)
    invstd = torch.rsqrt(var_k + eps)
    has_weight = weight is not None
    if x.numel() > 0:
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            dy, x, mean_k, invstd, weight, True, has_weight, has_weight
        )
        packed = torch.cat((sum_dy, sum_dy_xmu))
    else:
        packed = torch.zeros(2 * channels, dtype=mean_k.dtype, device=x.device)
    if not (has_weight and x.numel() > 0):
        grad_weight = torch.zeros_like(var_k)
        grad_bias = torch.zeros_like(var_k)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)

    grad_input = None
    if need_input_grad and x.numel() > 0:
        sums = packed.view(2, channels)
        weight_k = weight.to(mean_k.dtype) if weight is not None else None
        # count: an int32 tensor whose sum is the global count; one element, converted on the device.
        count = total.to(torch.int32)
        grad_input = torch.batch_norm_backward_elemt(dy, x, mean_k, invstd, weight_k, sums[0], sums[1], count)
    elif need_input_grad:
        grad_input = torch.empty_like(x)
    return grad_input, grad_weight, grad_bias
