"""Swap every BatchNorm layer of a model for `SyncBatchNorm`, and back (for export and inference).

BatchNorm subclasses are kept, not flattened: a subclass whose ``forward`` is batch norm followed by child modules
(timm's ``BatchNormAct2d``: ``drop``, then ``act``) becomes a :class:`~syncbn.SyncBatchNormAct` that applies the same
children; a subclass whose ``forward`` does anything else is refused with the layer's path and the fix, since a
synchronized layer cannot know what that forward does. Revert rebuilds each layer as its original class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.batchnorm import SyncBatchNorm
from syncbn.norm_act import SyncBatchNormAct

# Input dims each plain BatchNorm class accepts, and the class revert picks for a given input dim.
_DIMS_OF_CLASS: dict[type[_BatchNorm], int] = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_CLASS_FOR_DIMS: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}

# Norm + act layers of other libraries, by (module, class name) of the class that defines their forward (no import
# of those libraries here): the children that forward applies after batch norm, in order.
_KNOWN_NORM_ACT: dict[tuple[str, str], tuple[str, ...]] = {
    ("timm.layers.norm_act", "BatchNormAct2d"): ("drop", "act"),
    ("timm.models.layers.norm_act", "BatchNormAct2d"): ("drop", "act"),  # timm < 0.9
}

# Attributes every nn.Module has (parameters, buffers, children, hooks): revert makes these afresh.
_MODULE_BOOKKEEPING = frozenset(nn.Module().__dict__)
_HYPERPARAMETERS = ("num_features", "eps", "momentum", "affine", "track_running_stats")


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


def _forward_owner(cls: type[nn.Module]) -> type[nn.Module]:
    """The class in ``cls``'s MRO that defines the ``forward`` its instances run."""
    return next(k for k in cls.__mro__ if "forward" in vars(k))


def _children_after_norm(
    module: _BatchNorm, path: str, norm_act: Mapping[type[nn.Module], Sequence[str]]
) -> tuple[str, ...] | None:
    """The children ``module``'s forward applies after batch norm; None where that forward is plain batch norm.

    Raises:
        ValueError: a subclass whose forward is neither batch norm nor a known norm + act layer.
    """
    mro = type(module).__mro__
    owner = _forward_owner(type(module))
    if owner in (_BatchNorm, nn.SyncBatchNorm):
        return None
    # The layer's class or any base up to the forward's owner: all of them run that same forward.
    declared = next((norm_act[k] for k in mro[: mro.index(owner) + 1] if k in norm_act), None)
    names = declared if declared is not None else _KNOWN_NORM_ACT.get((owner.__module__, owner.__qualname__))
    cls = type(module).__qualname__
    if names is None:
        children = ", ".join(repr(name) for name, _ in module.named_children()) or "none"
        raise ValueError(
            f"cannot synchronize layer '{path or '<root>'}' ({type(module).__module__}.{cls}): it subclasses "
            f"BatchNorm but {owner.__qualname__}.forward does more than batch norm, and a synchronized layer would "
            "silently skip the rest. If that forward is batch norm followed by child modules (this layer has: "
            f"{children}), pass convert_sync_batchnorm(model, norm_act={{{owner.__qualname__}: (names of those "
            f"children, in the order it applies them)}}), or norm_act={{{owner.__qualname__}: ()}} if it is batch "
            "norm alone; otherwise leave the layer out of the model you convert, or replace it with plain "
            "BatchNorm plus those modules"
        )
    missing = [name for name in names if name not in module._modules]
    if missing:
        raise ValueError(
            f"cannot synchronize layer '{path or '<root>'}' ({cls}): norm_act names children {list(names)} but it "
            f"has no child {missing} (it has {[name for name, _ in module.named_children()]})"
        )
    return tuple(names)


def _synchronized(
    module: _BatchNorm,
    path: str,
    process_group: dist.ProcessGroup | None,
    norm_act: Mapping[type[nn.Module], Sequence[str]],
) -> SyncBatchNorm:
    """The synchronized replacement of one BatchNorm layer, remembering what revert needs to rebuild it."""
    after = _children_after_norm(module, path, norm_act)
    reference = module.weight if module.affine else module.running_mean
    kwargs: dict[str, Any] = {
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
        "process_group": process_group,
        "device": reference.device if reference is not None else None,
        "dtype": reference.dtype if reference is not None else None,
    }
    if not after:  # plain batch norm (None), or declared as batch norm alone (())
        converted = SyncBatchNorm(module.num_features, **kwargs)
    else:
        converted = SyncBatchNormAct(
            module.num_features, **kwargs, after={name: module._modules[name] for name in after}
        )
    _copy_state(module, converted)
    converted.input_dims_hint = next((_DIMS_OF_CLASS[k] for k in type(module).__mro__ if k in _DIMS_OF_CLASS), None)
    if type(module) is not nn.SyncBatchNorm:  # torch's SyncBatchNorm reverts to plain BatchNorm (needs no group)
        # The subclass's constructor signature is unknown, so revert rebuilds the layer the way torch.load and
        # copy.deepcopy rebuild a module: its class, its own attributes, then parameters, buffers and children.
        converted._original_class = type(module)
        converted._original_attributes = {
            k: v for k, v in vars(module).items() if k not in _MODULE_BOOKKEEPING and k not in _HYPERPARAMETERS
        }
    return converted


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    *,
    norm_act: Mapping[type[nn.Module], Sequence[str]] | None = None,
) -> nn.Module:
    """Return ``module`` with every ``torch.nn.modules.batchnorm._BatchNorm`` replaced by :class:`SyncBatchNorm`.

    Parameters are shared and buffers, ``eps``, ``momentum``, ``affine``, ``track_running_stats`` and train/eval
    mode are preserved; the original class is remembered so :func:`revert_sync_batchnorm` can restore it.
    ``torch.nn.SyncBatchNorm`` layers are converted too. Existing :class:`SyncBatchNorm` layers get
    ``process_group``. The module is changed in place where possible; use the return value (a top-level
    BatchNorm is replaced).

    BatchNorm subclasses: one that keeps BatchNorm's forward becomes :class:`SyncBatchNorm`. One whose forward is
    batch norm followed by child modules becomes :class:`~syncbn.SyncBatchNormAct`, which applies those children
    in the same order: timm's ``BatchNormAct2d`` (``drop``, then ``act``) is known, others are named in
    ``norm_act``. Any other overridden forward raises, naming the layer.

    Args:
        module: any model.
        process_group: the group whose ranks pool their batches; ``None`` means the default group.
        norm_act: for BatchNorm subclasses whose forward is batch norm then child modules: the class that defines
            that forward → the names of those children in the order it applies them (``()`` for a forward that is
            batch norm alone). Default: none beyond timm's ``BatchNormAct2d``.

    Raises:
        ValueError: a BatchNorm subclass whose forward does more than batch norm and is not in ``norm_act``.

    Example::

        >>> model = syncbn.convert_sync_batchnorm(torchvision.models.resnet18())
        >>> model = syncbn.convert_sync_batchnorm(model, norm_act={MyBatchNormReLU: ("relu",)})
    """
    return _convert(module, "", process_group, dict(norm_act or {}))


def _convert(
    module: nn.Module,
    path: str,
    process_group: dist.ProcessGroup | None,
    norm_act: Mapping[type[nn.Module], Sequence[str]],
) -> nn.Module:
    if isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        converted: nn.Module = module
    elif isinstance(module, _BatchNorm):
        converted = _synchronized(module, path, process_group, norm_act)
    else:
        converted = module
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, f"{path}.{name}" if path else name, process_group, norm_act))
    return converted


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every :class:`SyncBatchNorm` replaced by the BatchNorm it was converted from.

    The class is the one :func:`convert_sync_batchnorm` replaced (subclasses included, with their own attributes
    and children, e.g. timm's ``BatchNormAct2d`` with its ``act``) or, for a layer converted from
    ``torch.nn.SyncBatchNorm`` or built directly, the ``BatchNorm1d/2d/3d`` that matches the inputs it last saw.
    The result has the same state_dict keys and values and needs no process group, which is what export
    (TorchScript, ONNX) and single-device inference want.

    Raises:
        ValueError: a layer built directly as SyncBatchNorm that has never seen an input, so its class is unknown
            (run one forward pass first, or set ``layer.input_dims_hint`` to 3, 4 or 5), or one built directly as
            SyncBatchNormAct (no BatchNorm class keeps its children).
    """
    return _revert(module, prefix="")


def _rebuilt_original(layer: SyncBatchNorm) -> _BatchNorm:
    """``layer`` as the class it was converted from, with that layer's own attributes and ``layer``'s state."""
    cls: type[_BatchNorm] = layer._original_class
    reverted = cls.__new__(cls)
    nn.Module.__init__(reverted)
    vars(reverted).update(layer._original_attributes)
    for name in _HYPERPARAMETERS:
        setattr(reverted, name, getattr(layer, name))
    for name in ("weight", "bias"):
        reverted.register_parameter(name, layer._parameters.get(name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        reverted.register_buffer(name, layer._buffers.get(name))
    reverted.training = layer.training
    if hasattr(layer, "qconfig"):
        reverted.qconfig = layer.qconfig
    return reverted


def _revert(module: nn.Module, prefix: str) -> nn.Module:
    reverted: nn.Module = module
    if isinstance(module, SyncBatchNorm) and hasattr(module, "_original_class"):
        reverted = _rebuilt_original(module)
    elif isinstance(module, SyncBatchNormAct) and module.after_names:
        raise ValueError(
            f"cannot revert layer '{prefix or '<root>'}': it was built directly as SyncBatchNormAct, so no BatchNorm "
            f"class is known that applies its children {list(module.after_names)}; convert from the original "
            "layer class instead, or revert it by hand"
        )
    elif isinstance(module, SyncBatchNorm):
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
