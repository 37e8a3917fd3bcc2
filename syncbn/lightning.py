"""`SyncBatchNorm` as a Lightning ``LayerSync`` plugin: exact synchronized BatchNorm in a Lightning Trainer, on CPU too.

``Trainer(sync_batchnorm=True)`` swaps in ``torch.nn.SyncBatchNorm``, which refuses CPU tensors and reverts to a
BatchNorm that forgets each layer's class. This plugin swaps in :class:`syncbn.SyncBatchNorm` through the same
hook (Lightning calls ``apply`` when fitting starts and ``revert`` at teardown)::

    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, plugins=[syncbn.lightning.SyncBatchNorm()])

Importing this module needs Lightning (``pip install lightning``); importing :mod:`syncbn` never does. The plugin
is a ``lightning.pytorch`` ``LayerSync``, for ``lightning.Trainer``; the separate ``pytorch_lightning`` package
checks plugins against its own copy of that class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.distributed as dist
from torch import nn

try:
    from lightning.pytorch.plugins import LayerSync
except ImportError as error:  # the library itself needs torch alone
    raise ImportError(
        f"syncbn.lightning needs Lightning, which is not installed: pip install lightning (import failed with: {error})"
    ) from error

from syncbn.convert import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(LayerSync):
    """A Lightning ``LayerSync`` plugin that synchronizes every BatchNorm layer with :class:`syncbn.SyncBatchNorm`.

    - ``apply`` (Lightning calls it on the LightningModule when ``fit`` starts, before wrapping it in DDP):
      :func:`syncbn.convert_sync_batchnorm`.
    - ``revert`` (at the end of ``fit``): :func:`syncbn.revert_sync_batchnorm`, so the trained module holds the
      BatchNorm classes it started with (subclasses and their children included).

    Args:
        process_group: the ranks whose batches are pooled; ``None`` (default) means the whole world.
        norm_act: passed to :func:`syncbn.convert_sync_batchnorm` for BatchNorm subclasses whose forward is batch
            norm followed by child modules (timm's ``BatchNormAct2d`` needs nothing). Default: none.

    Example::

        >>> trainer = lightning.Trainer(strategy="ddp", accelerator="cpu", devices=2,
        ...                             plugins=[syncbn.lightning.SyncBatchNorm()])
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        norm_act: Mapping[type[nn.Module], Sequence[str]] | None = None,
    ) -> None:
        self.process_group = process_group
        self.norm_act = dict(norm_act or {})

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` with every BatchNorm layer replaced by :class:`syncbn.SyncBatchNorm` (in place)."""
        return convert_sync_batchnorm(model, self.process_group, norm_act=self.norm_act)

    def revert(self, model: nn.Module) -> nn.Module:
        """``model`` with every synchronized layer turned back into the BatchNorm it was converted from."""
        return revert_sync_batchnorm(model)
