"""The synchronized layer as ``torch.library`` custom ops, so ``torch.compile`` traces it without graph breaks.

Dynamo cannot trace an ``autograd.Function`` that takes a ``ProcessGroup`` and issues in-place collectives
(pytorch#161302: the same is why ``torch.nn.SyncBatchNorm`` breaks the graph). Under ``torch.compile`` the module
calls :func:`sync_batch_norm` instead: two opaque custom ops (forward, backward) that the compiled graph calls as
single nodes, linked by ``register_autograd``, with ``register_fake`` giving dynamo and AOTAutograd their output
shapes. Inside, they run the eager code (:func:`syncbn._functions.sync_forward` / ``sync_backward``), so compiled
and eager steps compute the same numbers and issue the same two all-reduces. The process group crosses the op
boundary by name (a string; ``""`` for the default group) because an op schema has no ProcessGroup type.

The running statistics are updated outside the op, by the same tensor ops eager mode uses, traced into the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from syncbn._functions import INVSTD, MEAN, kernel_dtype, sync_backward, sync_forward, update_running_stats

DEFAULT_GROUP = ""


def resolve_group(group_name: str) -> dist.ProcessGroup | None:
    """The process group named ``group_name`` (``""``: None, which collectives read as the default group)."""
    if group_name == DEFAULT_GROUP:
        return None
    # A private torch function: the registry that functional collectives resolve group names with.
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


@torch.library.custom_op("syncbn::sync_batch_norm", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, stats, total)``: output, ``stats = [mean, biased var, unbiased var, invstd]`` (4, C), count."""
    y, stats, total = sync_forward(x, weight, bias, eps, resolve_group(group_name), None)
    if y.stride() != x.stride():
        # The fake below promises x's layout (empty_like); keep that promise whatever the kernel returned.
        y = torch.empty_like(x).copy_(y)
    return y, stats, total.clone()


@_forward_op.register_fake
def _forward_fake(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = x.new_empty((4, x.shape[1]), dtype=kernel_dtype(x, weight))
    return torch.empty_like(x), stats, x.new_empty((1,), dtype=torch.float64)


@torch.library.custom_op("syncbn::sync_batch_norm_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    total: torch.Tensor,
    eps: float,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(grad_input, grad_weight, grad_bias)``; the weight/bias ones (in the weight's dtype) are zeros for
    a layer without them."""
    # grad_out may come in any layout from the compiled graph: both paths accept mixed layouts (no copy here).
    grad_input, grad_weight, grad_bias = sync_backward(
        grad_out, x, weight, stats[MEAN], stats[INVSTD], total, eps, resolve_group(group_name), True
    )
    if grad_input is None:  # not reached: need_input_grad=True above; keeps the output a tensor for the schema
        grad_input = torch.zeros_like(x)
    if grad_input.stride() != x.stride():
        grad_input = torch.empty_like(x).copy_(grad_input)
    return grad_input, grad_weight.clone(), grad_bias.clone()


@_backward_op.register_fake
def _backward_fake(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    total: torch.Tensor,
    eps: float,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_param = torch.empty_like(stats[0]) if weight is None else torch.empty_like(weight)
    return torch.empty_like(x), grad_param, grad_param.clone()


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, _bias, eps, group_name = inputs
    _, stats, total = output
    ctx.mark_non_differentiable(stats, total)
    ctx.save_for_backward(x, weight, stats, total)
    ctx.eps = eps
    ctx.group_name = group_name


def _backward(ctx: Any, grad_y: torch.Tensor | None, _grad_stats: Any, _grad_total: Any) -> tuple[Any, ...]:
    x, weight, stats, total = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    # Every rank runs the backward op (and its all-reduce) even when x needs no gradient: collectives must match.
    grad_input, grad_weight, grad_bias = _backward_op(grad_y, x, weight, stats, total, ctx.eps, ctx.group_name)
    if weight is None:
        grad_weight = grad_bias = None
    return grad_input, grad_weight, grad_bias, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def sync_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    group_name: str,
) -> torch.Tensor:
    """The synchronized batch norm of ``x`` as a graph-break-free call (what the module uses under compile).

    The running statistics are updated here, outside the op, by plain tensor ops the compiled graph contains
    (an op that mutates its inputs cannot have an autograd formula).
    """
    y, stats, total = _forward_op(x, weight, bias, eps, group_name)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            update_running_stats(running_mean, running_var, num_batches_tracked, momentum, stats, total)
    return y
