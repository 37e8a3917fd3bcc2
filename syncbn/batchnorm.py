"""`SyncBatchNorm`: BatchNorm over the global batch of all ranks, on CPU (gloo) and GPU (NCCL)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn._compile_ops import DEFAULT_GROUP, sync_batch_norm
from syncbn._functions import RecordedPass, SyncBatchNormFunction

# `torch.compiler.disable` imports torch._dynamo when it decorates, which costs about 1.2 s of CPU in every process
# that imports syncbn (each Ray Train worker and controller of a job) whether it compiles or not. Torch's own
# `_disable_dynamo` does the same at the decorated function's first call instead (dynamo skips its wrapper and
# runs the function eagerly), and that call happens only under torch.compile; it is private, hence the fallback.
_eager_under_compile = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalisation whose statistics are those of the concatenation of every rank's batch.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with the mean and (biased) variance taken per channel over the *global* batch: all ranks of
    ``process_group``. A drop-in for :class:`torch.nn.SyncBatchNorm` that also runs on CPU tensors and sends a
    fixed-size message per layer: one ``all_reduce`` of ``[count, sums, sums of squares]`` forward, one of
    ``[sum(dy), sum(dy * x_hat)]`` backward (no ``all_gather``, so the volume does not grow with the world size).

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: weight of the new batch in the running averages; ``None`` gives a cumulative average.
            Default: 0.1.
        affine: learnable per-channel scale and shift. Default: True.
        track_running_stats: keep running mean and (unbiased) variance for eval mode; if False, eval mode also
            uses batch statistics. Default: True.
        process_group: the ranks whose batches are pooled; ``None`` means the default (world) group.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.

    Shape:
        - Input: :math:`(N, C)`, :math:`(N, C, L)`, :math:`(N, C, H, W)` or :math:`(N, C, D, H, W)`.
        - Output: same shape (and memory format, e.g. channels_last) as the input.

    Notes:
        - Synchronisation happens only in training mode with an initialised process group of more than one rank.
          Otherwise the layer is exactly :class:`torch.nn.BatchNorm*d` through torch's native kernels. Eval mode
          never communicates (as in torch): with running stats they are used, without them each rank normalises
          with its own batch, so evaluation on a single rank cannot hang.
        - Every rank of the group must call forward (and backward) the same number of times, as with any
          collective. A rank with an empty batch still takes part and the others stay exact.
        - Weight and bias gradients on each rank are that rank's contribution; their sum over ranks is the global
          gradient, so DDP's gradient averaging gives the same update as :class:`torch.nn.SyncBatchNorm`.
        - With DDP, turn off the per-forward buffer broadcast (``forward_sync_buffers=False``, or
          ``broadcast_buffers=False`` before torch 2.13): the running stats are already identical on every rank.
        - ``torch.compile`` traces the layer with no graph break (``fullgraph=True`` works): it becomes two custom
          ops (forward, backward) that run the eager code. Steps recorded by :class:`~syncbn.BatchStatsRecorder`
          run eagerly (a graph break on those steps only).
        - ``copy.deepcopy`` gives a layer that shares ``process_group``. Pickling (``torch.save(model)``) works
          when ``process_group`` is None and refuses with the remedy (save the state_dict) otherwise.
        - On CUDA tensors, ``SYNCBN_CUDA_KERNELS=1`` selects torch's single-pass CUDA kernels for the local work
          (off by default until they have passed the GPU tests; see :mod:`syncbn._cuda_kernels`).

    Example::

        >>> model = syncbn.convert_sync_batchnorm(model)
        >>> ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        # Number of input dims this layer is for (2-3: 1d, 4: 2d, 5: 3d); lets revert pick the BatchNorm class.
        self.input_dims_hint: int | None = None
        # Set by BatchStatsRecorder around a recording forward pass; the Function appends its moments here.
        self._moments_sink: list[RecordedPass] | None = None

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The ranks whose batches are pooled; ``None`` means the default (world) group."""
        return self._process_group

    @process_group.setter
    def process_group(self, group: dist.ProcessGroup | None) -> None:
        self._process_group = group
        # The name is what crosses into the compiled graph (custom ops take strings, not ProcessGroups).
        # None where the object has no name (not a ProcessGroup): compiling such a layer then raises.
        self._group_name: str | None = DEFAULT_GROUP if group is None else getattr(group, "group_name", None)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
        """Every BatchNorm layer of ``module`` replaced by :class:`SyncBatchNorm`, like torch's classmethod.

        Same as :func:`syncbn.convert_sync_batchnorm`, which documents the details.
        """
        from syncbn.convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchNorm:
        """A copy with its own parameters and buffers that synchronises in the *same* process group.

        A ProcessGroup is a live connection that cannot be copied; the copy shares it, as modules share a device.
        """
        if self._process_group is not None:
            memo[id(self._process_group)] = self._process_group
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save(model)``) keeps everything but a live process group, which it cannot store.

        A layer on the default group (``process_group=None``) pickles and, once loaded, synchronises in the
        default group of the loading process. A layer with an explicit group refuses with the remedy, instead of
        silently synchronising in a different group after loading.
        """
        if self._process_group is not None:
            raise TypeError(
                "cannot pickle a SyncBatchNorm whose process_group is set (a live connection): save "
                "model.state_dict() with torch.save and load it into a model built and converted in the new "
                "process, or convert with process_group=None to pickle the whole model"
            )
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_moments_sink"] = None  # a recording in progress is not part of the model
        return state

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2 or input.dim() > 5:
            raise ValueError(f"expected a 2D to 5D input (N, C, ...) for SyncBatchNorm (got {input.dim()}D input)")

    def _world_size(self) -> int:
        """Ranks in this layer's group, or 1 where there is no initialised process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self._process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels in dim 1 (got {input.shape[1]}, "
                f"input shape {tuple(input.shape)})"
            )
        if self.input_dims_hint != input.dim():  # write only on change: no side effect in a compiled steady state
            self.input_dims_hint = input.dim()

        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        need_sync = self.training and bn_training and self._world_size() > 1
        if not need_sync:
            # No peers to agree with: exactly torch's BatchNorm (its native fused kernels, its bookkeeping).
            return super().forward(input)

        if self._moments_sink is not None:
            if torch.compiler.is_compiling():
                return self._recording_forward_eager(input)
            return self._recording_forward(input)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        num_batches_tracked = self.num_batches_tracked if self.track_running_stats else None
        if torch.compiler.is_compiling():
            if self._group_name is None:
                raise TypeError(
                    "torch.compile needs SyncBatchNorm.process_group to be a torch.distributed.ProcessGroup or None "
                    f"(got {type(self._process_group).__name__})"
                )
            return sync_batch_norm(
                input,
                self.weight,
                self.bias,
                running_mean,
                running_var,
                num_batches_tracked,
                self.momentum,
                self.eps,
                self._group_name,
            )
        return SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            num_batches_tracked,
            self.momentum,
            self.eps,
            self._process_group,
            None,
        )

    def _recording_forward(self, input: torch.Tensor) -> torch.Tensor:
        """A recording step (BatchStatsRecorder) runs eagerly: it appends this pass's moments to a Python list.

        Under ``torch.compile`` it is called through `_recording_forward_eager`: a graph break on recording steps
        only (an error with ``fullgraph=True``: record with the uncompiled model there); ordinary steps stay
        break-free.
        """
        tracking = self.track_running_stats
        return SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.num_batches_tracked if tracking else None,
            self.momentum,
            self.eps,
            self._process_group,
            self._moments_sink,
        )

    _recording_forward_eager = _eager_under_compile(_recording_forward)
