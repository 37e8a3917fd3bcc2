"""syncbn: an exact synchronized BatchNorm for CPU (gloo) and GPU (NCCL), one all-reduce per pass.

Public surface (everything else is private):

- :class:`SyncBatchNorm`: drop-in for ``torch.nn.SyncBatchNorm``, exact against BatchNorm on the global batch.
- :func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm`: swap a model's BatchNorm layers and back;
  :class:`SyncBatchNormAct` is what norm + act subclasses (timm's ``BatchNormAct2d``) become, children kept.
- :class:`BatchStatsRecorder` / :func:`merge_rank_layer_stats`: per-layer batch statistics and cross-rank skew;
  :func:`merge_packed_layer_stats` merges :class:`PackedLayerStats` (all layers of a rank in two tensors) into
  :class:`MergedLayerStats` in one vectorised pass.
- :func:`recalibrate`: "precise BatchNorm": every layer's running statistics set to the exact population
  statistics of given batches, pooled over the ranks (one all-reduce per layer).

:mod:`syncbn.lightning` (a Lightning ``LayerSync`` plugin) is not imported here: it needs Lightning.
"""

from syncbn.batchnorm import SyncBatchNorm
from syncbn.convert import convert_sync_batchnorm, revert_sync_batchnorm
from syncbn.norm_act import SyncBatchNormAct
from syncbn.recalibrate import recalibrate
from syncbn.stats import (
    BatchStatsRecorder,
    MergedLayerStats,
    PackedLayerStats,
    merge_packed_layer_stats,
    merge_rank_layer_stats,
)

__all__ = [
    "BatchStatsRecorder",
    "MergedLayerStats",
    "PackedLayerStats",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "__version__",
    "convert_sync_batchnorm",
    "merge_packed_layer_stats",
    "merge_rank_layer_stats",
    "recalibrate",
    "revert_sync_batchnorm",
]

__version__ = "0.2.0"
