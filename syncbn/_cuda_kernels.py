"""The single-pass CUDA path of the synchronized layer: torch's native batch-norm CUDA kernels, one all-reduce.

On CUDA tensors the generic path's local statistics read the activation several times (a centred copy, two
reductions, an in-place square). torch ships single-pass CUDA kernels for exactly this work, the ones
``torch.nn.SyncBatchNorm`` uses (``torch/nn/modules/_functions.py``):

- ``torch.batch_norm_update_stats(x, None, None, 0.0) -> (mean, var)``: one Welford pass, the biased variance
  itself (``batch_norm_stats``, which torch's SyncBatchNorm calls, is the same pass returning ``1/sqrt(var+eps)``);
- ``torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps) -> y``;
- ``torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g)
  -> (sum_dy, sum_dy_xmu, grad_weight, grad_bias)``;
- ``torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count) -> dx``, where
  ``count`` is an int32 tensor whose *sum* is the global element count per channel.

Their dtype rules (torch's ``Normalization.cu``/``.cuh``): mean, invstd, sum_dy and sum_dy_xmu are float32 for
float16/bfloat16/float32 inputs (float64 for float64); the parameters have the input's dtype or, for a half
input, float32; ``batch_norm_backward_elemt`` on an NCHW input with float32 statistics needs float32 parameters.
This path follows them: statistics in float32 whenever the input is half, half parameters converted for the
backward element-wise kernel, as torch's own Function does.

Where torch all-gathers every rank's ``[mean, invstd, count]`` and masks empty ranks on the host (device-to-host
copies), this path turns the local Welford moments into the generic path's float64 packet,
``[n, n * mean, n * (var + mean^2)]``, and sums it in the one all-reduce: no host synchronisation, and pooling the
moments in float64 keeps the accuracy for inputs with large offsets. Backward all-reduces
``[sum(dy), sum(dy * (x - mean))]``. Per layer it issues 5 local ops before the forward all-reduce (the
kernel, one ``cat``, the float64 conversion, two in-place ops) and 4 around the backward one.

These ops have no CPU kernels. The path is taken for CUDA tensors only when the environment variable
``SYNCBN_CUDA_KERNELS=1`` is set (read on every call), until it has passed the CUDA tests on a real GPU; set it
the same way on every rank, since the backward packet's contents differ from the default path's. The test
suite runs it on CPU tensors through stand-ins for the kernels (``tests/syncbn/reference_kernels.py``), which
set :data:`_ON_CPU_FOR_STAND_INS`; nothing else should.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

CUDA_KERNELS_ENV = "SYNCBN_CUDA_KERNELS"
#: Half-precision dtypes: their statistics are computed in float32, and torch's CUDA kernels take them with
#: float32 (or same-dtype) parameters.
REDUCED_PRECISION = (torch.float16, torch.bfloat16)
#: True only while the test suite's stand-in kernels serve these ops on CPU tensors (never set it otherwise:
#: torch has no CPU kernels for them).
_ON_CPU_FOR_STAND_INS = False
# One constant ``[1.0]`` per (device, dtype): the count slot of the packet, multiplied by ``n`` with the rest.
_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def use_cuda_kernels(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ``x`` takes the single-pass CUDA path: a CUDA tensor with ``SYNCBN_CUDA_KERNELS=1``, in a dtype
    pairing torch's kernels accept (:func:`kernel_dtypes_supported`); any other layer takes the generic path."""
    return (
        (x.is_cuda or _ON_CPU_FOR_STAND_INS)
        and os.environ.get(CUDA_KERNELS_ENV) == "1"
        and kernel_dtypes_supported(x.dtype, None if weight is None else weight.dtype)
    )


def kernel_dtypes_supported(input_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> bool:
    """Whether this path takes this input/parameter pairing: the same dtype (half parameters included, as
    ``model.half()`` gives), or a half input (float16, bfloat16) with float32 parameters, as torch's own
    SyncBatchNorm uses its kernels. A float32 input with float64 parameters (a model converted with ``.double()``
    and fed float32) is not one of them."""
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


def _one(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached one-element tensor holding 1 (reused by every layer: no fill per step)."""
    key = (device, dtype)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones(1, device=device, dtype=dtype)
    return one


def cuda_local_packet(x: torch.Tensor, count: int, record: bool) -> torch.Tensor:
    """One rank's forward payload, float64: ``[n, sum(x), sum(x^2)]`` (+ ``[sum(x)^2 / n]`` when recording).

    Built from one Welford pass: ``[1, mean, var]`` joined by one ``cat`` and converted to float64, then
    ``var += mean^2`` and everything times ``n`` in place (5 ops). The layout is the generic path's, so
    everything after the all-reduce is shared.
    """
    channels = x.shape[1]
    size = (4 if record else 3) * channels + 1 - channels
    if count == 0:
        # A rank with an empty batch still joins the collective (with zeros) to unblock its peers.
        return torch.zeros(size, dtype=torch.float64, device=x.device)
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    packet = torch.cat((_one(x.device, mean.dtype), mean, var)).double()
    mean64 = packet[1 : channels + 1]
    if record:  # n * mean^2 once scaled below (recording steps only)
        packet = torch.cat((packet, mean64 * mean64))
        mean64 = packet[1 : channels + 1]
    packet[channels + 1 : 2 * channels + 1].addcmul_(mean64, mean64)
    packet.mul_(float(count))
    return packet


def cuda_normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean_k: torch.Tensor,
    invstd_k: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``y = (x - mean) * invstd * weight + bias`` through ``torch.batch_norm_elemt`` (keeps x's memory format)."""
    return torch.batch_norm_elemt(x, weight, bias, mean_k, invstd_k, eps)


def cuda_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean_k: torch.Tensor,
    invstd_k: torch.Tensor,
    total: torch.Tensor,
    process_group: dist.ProcessGroup | None,
    need_input_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Backward with the native reduce/elemt kernels and one all-reduce of ``[sum(dy), sum(dy * (x - mean))]``.

    Returns ``(grad_input, grad_weight, grad_bias)`` like the generic path: grad_input None when not needed;
    weight and bias gradients are this rank's contributions in the parameters' dtype (zeros for an empty rank
    or a layer without weight).
    """
    channels = x.shape[1]
    x = kernel_layout(x)
    dy = kernel_layout(grad_out)
    has_weight = weight is not None
    if x.numel() > 0:
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            dy, x, mean_k, invstd_k, weight, True, has_weight, has_weight
        )
        packed = torch.cat((sum_dy, sum_dy_xmu))
    else:
        packed = torch.zeros(2 * channels, dtype=mean_k.dtype, device=x.device)
    if not (has_weight and x.numel() > 0):
        like = mean_k if weight is None else weight
        grad_weight = torch.zeros_like(like)
        grad_bias = torch.zeros_like(like)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)

    grad_input = None
    if need_input_grad and x.numel() > 0:
        sums = packed.view(2, channels)
        # torch's NCHW backward_elemt kernel reads float32 parameters when the statistics are float32.
        weight_k = weight if weight is None or weight.dtype == mean_k.dtype else weight.to(mean_k.dtype)
        # count: an int32 tensor whose sum is the global count; one element, converted on the device.
        count = total.to(torch.int32)
        grad_input = torch.batch_norm_backward_elemt(dy, x, mean_k, invstd_k, weight_k, sums[0], sums[1], count)
    elif need_input_grad:
        grad_input = torch.empty_like(x)
    return grad_input, grad_weight, grad_bias
