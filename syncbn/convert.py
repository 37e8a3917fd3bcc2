"""Swap every BatchNorm layer of a model for `SyncBatchNorm`, and back (for export and inference)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.batchnorm import SyncBatchNorm

# Input dims each plain BatchNorm class accepts, and the class revert picks for a given input dim.
_DIMS_OF_CLASS: dict[type[_BatchNorm], int] = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_CLASS_FOR_DIMS: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _copy_state(source: _BatchNorm, target: _BatchNorm) -> None:
    """Share parameters (so an optimizer built before the swap keeps working) and copy buffers and mode."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    if source.track_running_stats:
        with torch.no_grad():
            target.running_mean = source.running_mean
            target.running_var = source.running_var
            target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Return ``module`` with every ``torch.nn.modules.batchnorm._BatchNorm`` replaced by :class:`SyncBatchNorm`.

    Parameters are shared and buffers, ``eps``, ``momentum``, ``affine``, ``track_running_stats`` and train/eval
    mode are preserved; the original class is remembered so :func:`revert_sync_batchnorm` can restore it.
    ``torch.nn.SyncBatchNorm`` layers are converted too. Existing :class:`SyncBatchNorm` layers get
    ``process_group``. The module is changed in place where possible; use the return value (a top-level
    BatchNorm is replaced).

    Args:
        module: any model.
        process_group: the group whose ranks pool their batches; ``None`` means the default group.

    Example::

        >>> model = syncbn.convert_sync_batchnorm(torchvision.models.resnet18())
    """
    if isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        converted: nn.Module = module
    elif isinstance(module, _BatchNorm):
        reference = module.weight if module.affine else module.running_mean
        converted = SyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None else None,
        )
        _copy_state(module, converted)
        converted.input_dims_hint = _DIMS_OF_CLASS.get(type(module))
    else:
        converted = module
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every :class:`SyncBatchNorm` replaced by plain ``BatchNorm1d/2d/3d``.

    The class is the one :func:`convert_sync_batchnorm` replaced or, for a layer built directly, the one that
    matches the inputs it last saw. The result has the same state_dict keys and values and needs no process group,
    which is what export (TorchScript, ONNX) and single-device inference want.

    Raises:
        ValueError: a layer built directly as SyncBatchNorm that has never seen an input, so its class is unknown
            (run one forward pass first, or set ``layer.input_dims_hint`` to 3, 4 or 5).
    """
    return _revert(module, prefix="")


def _revert(module: nn.Module, prefix: str) -> nn.Module:
    reverted: nn.Module = module
    if isinstance(module, SyncBatchNorm):
        dims = module.input_dims_hint
        if dims not in _CLASS_FOR_DIMS:
            raise ValueError(
                f"cannot tell which BatchNorm class layer '{prefix or '<root>'}' should become: it was not "
                f"converted from BatchNorm1d/2d/3d and has not seen an input (input_dims_hint={dims}); run one "
                "forward pass or set layer.input_dims_hint to 3 (BatchNorm1d), 4 (BatchNorm2d) or 5 (BatchNorm3d)"
            )
        reference = module.weight if module.affine else module.running_mean
        reverted = _CLASS_FOR_DIMS[dims](
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None else None,
        )
        _copy_state(module, reverted)
    for name, child in module.named_children():
        reverted.add_module(name, _revert(child, f"{prefix}.{name}" if prefix else name))
    return reverted
