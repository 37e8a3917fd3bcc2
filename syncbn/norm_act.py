"""`SyncBatchNormAct`: a synchronized BatchNorm followed by child modules, the converted form of norm + act layers.

Layers such as timm's ``BatchNormAct2d`` subclass ``BatchNorm2d`` and apply their own children (``drop``, then
``act``) after the normalisation in their ``forward``. Replacing them by a plain :class:`~syncbn.SyncBatchNorm`
would silently drop those children; :func:`~syncbn.convert_sync_batchnorm` builds this class instead, which keeps
them (same names, so the state_dict keys do not change) and applies them in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from syncbn.batchnorm import SyncBatchNorm


class SyncBatchNormAct(SyncBatchNorm):
    r""":class:`~syncbn.SyncBatchNorm` over the global batch, then each module of ``after`` in order.

    .. math::

        y = f_k(\dots f_1(\mathrm{SyncBatchNorm}(x)))

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype: as for
            :class:`~syncbn.SyncBatchNorm`.
        after: the child modules to apply after batch norm, by name, in application order (timm's
            ``BatchNormAct2d``: ``{"drop": ..., "act": ...}``). They become children of this layer under those
            names. Default: none (then this is :class:`~syncbn.SyncBatchNorm`).

    Notes:
        :func:`~syncbn.revert_sync_batchnorm` turns a converted layer back into its original class with these
        children; one built directly has no original class and refuses to revert.

    Example::

        >>> layer = syncbn.SyncBatchNormAct(16, after={"drop": nn.Identity(), "act": nn.SiLU()})
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
        *,
        after: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        after = dict(after or {})
        # Names, not modules: the children live in _modules (state_dict, .to(), hooks) and may be replaced there.
        self.after_names: tuple[str, ...] = tuple(after)
        for name, child in after.items():
            self.add_module(name, child)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = super().forward(input)
        for name in self.after_names:
            output = self._modules[name](output)
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, after={list(self.after_names)}"
