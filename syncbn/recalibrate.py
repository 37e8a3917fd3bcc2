"""`recalibrate`: exact population statistics for every BatchNorm layer of a model ("precise BatchNorm").

Why: with momentum 0.1 the running mean and variance are an exponential average over the last few dozen steps,
taken while the weights were still moving; with a constant learning rate they trail the weights and the model
scores worse in eval mode than it is (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021). Recomputing them
over a few hundred batches with the final weights removes the lag. Other implementations (torch's
``swa_utils.update_bn``, fvcore's ``update_bn_stats``) average the per-batch variances, which misses the variance
of the batch means, and see one rank's batches only. Here each layer's statistics are those of every input the
layer saw, pooled over the ranks of its process group: one all-reduce per layer of a float64 packet
``[count, Σ(x - s), Σ(x - s)²]`` per channel. The shift ``s`` (each rank's first batch mean, moved to their
weighted mean over the group by one more all-reduce for all layers together) keeps large offsets from cancelling.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.batchnorm import SyncBatchNorm

logger = logging.getLogger(__name__)

__all__ = ["recalibrate"]

# Input dtypes a rank without a batch can rebuild from a code agreed over the group (for its empty batches).
_INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)
# Most input dimensions the agreement packet carries (N, C and up to 6 more).
_MAX_INPUT_DIMS = 8


class _PopulationSums:
    """Per-channel float64 sums of one layer's inputs on this rank, shifted by the mean of its first batch.

    The shift keeps the sums of squares small where the inputs sit far from zero (no cancellation in
    ``Σx² - (Σx)²/N``); :meth:`recentre` moves the sums to a shift shared by the group before they are added up.
    """

    def __init__(self, layer: _BatchNorm) -> None:
        assert layer.running_mean is not None and layer.running_var is not None  # only layers with running stats
        # The buffers before the call, put back for a layer that saw too little to replace them.
        self.mean_before = layer.running_mean.detach().clone()
        self.var_before = layer.running_var.detach().clone()
        self.count = 0
        self.shift = torch.zeros_like(self.mean_before, dtype=torch.float64)
        self.sum = torch.zeros_like(self.shift)
        self.sum_sq = torch.zeros_like(self.shift)

    def add(self, x: torch.Tensor) -> None:
        """Add one batch's input ``(N, C, ...)``; an empty batch adds nothing."""
        channels = x.shape[1]
        if x.numel() == 0:
            return
        dims = [0, *range(2, x.dim())]
        x = x.detach().to(torch.float64)
        if self.count == 0:
            self.shift = x.mean(dims)
        centred = x - self.shift.view(1, channels, *([1] * (x.dim() - 2)))
        self.count += x.numel() // channels
        self.sum += centred.sum(dims)
        self.sum_sq += centred.square().sum(dims)

    def weighted_shift(self) -> torch.Tensor:
        """``[count, count * shift]``: summed over the group, they give the shared shift (a weighted mean)."""
        return torch.cat([self.sum.new_tensor([float(self.count)]), self.count * self.shift])

    def recentre(self, shift: torch.Tensor) -> None:
        """Express the sums around ``shift`` instead of this rank's own (exact: the difference is small)."""
        delta = self.shift - shift
        self.sum_sq += 2.0 * delta * self.sum + self.count * delta.square()
        self.sum += self.count * delta
        self.shift = shift

    def packet(self) -> torch.Tensor:
        """``[count, Σ(x - shift), Σ(x - shift)²]``, what the group sums (one all-reduce)."""
        return torch.cat([self.sum.new_tensor([float(self.count)]), self.sum, self.sum_sq])


def _share_shifts(sums: list[_PopulationSums], group: dist.ProcessGroup | None) -> None:
    """Move every synchronising layer's sums to one shift per layer shared by the group (one all-reduce in all)."""
    packet = torch.cat([s.weighted_shift() for s in sums])
    dist.all_reduce(packet, group=group)
    offset = 0
    for s in sums:
        channels = s.shift.numel()
        count, weighted = packet[offset], packet[offset + 1 : offset + 1 + channels]
        offset += 1 + channels
        if count.item() > 0:
            s.recentre(weighted / count)


def _syncing_group(layers: list[_BatchNorm]) -> tuple[bool, dist.ProcessGroup | None]:
    """Whether any layer synchronises (a SyncBatchNorm in a group of more than one rank), and in which group.

    Every rank of that group must run the same number of forward passes; agreeing on it needs one group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False, None
    groups: list[dist.ProcessGroup | None] = []
    for layer in layers:
        syncs = isinstance(layer, SyncBatchNorm) and dist.get_world_size(layer.process_group) > 1
        if syncs and not any(layer.process_group is g for g in groups):
            groups.append(layer.process_group)
    if len(groups) > 1:
        raise ValueError(
            "recalibrate expects every SyncBatchNorm layer of the model to share one process group "
            f"(got {len(groups)} different groups): the ranks must agree on one number of forward passes"
        )
    return bool(groups), groups[0] if groups else None


def _model_input(batch: Any) -> torch.Tensor:
    """The tensor to call the model with: the batch itself, or its first element (a DataLoader's ``(x, y)``)."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"recalibrate expects batches that are tensors or (input, ...) tuples (got {type(batch).__name__})"
        )
    return batch


def _agree(
    batch: torch.Tensor | None, group: dist.ProcessGroup | None, device: torch.device
) -> tuple[torch.Size, torch.dtype] | None:
    """One round's agreement over ``group``: None when no rank has a batch left, else a sample's shape and dtype.

    A rank without a batch gets the shape (and dtype, through the packet's code) of the others' batches, so it
    can run an empty batch through the model and take part in the layers' collectives.
    """
    packet = torch.zeros(3 + _MAX_INPUT_DIMS, dtype=torch.float64, device=device)
    if batch is not None:
        if batch.dim() > _MAX_INPUT_DIMS or batch.dtype not in _INPUT_DTYPES:
            raise ValueError(
                f"recalibrate takes inputs of at most {_MAX_INPUT_DIMS} dimensions in one of {_INPUT_DTYPES} "
                f"(got {batch.dim()} dimensions of {batch.dtype})"
            )
        packet[0] = 1.0
        packet[1] = batch.dim()
        packet[2] = _INPUT_DTYPES.index(batch.dtype)
        packet[3 : 3 + batch.dim() - 1] = torch.tensor(batch.shape[1:], dtype=torch.float64)
    dist.all_reduce(packet, op=dist.ReduceOp.MAX, group=group)
    if packet[0].item() == 0.0:
        return None
    ndim = int(packet[1].item())
    return torch.Size(int(v) for v in packet[3 : 3 + ndim - 1].tolist()), _INPUT_DTYPES[int(packet[2].item())]


def _rounds(
    batches: Iterable[Any], num_batches: int, syncing: bool, group: dist.ProcessGroup | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """This rank's model inputs, at most ``num_batches``; with synchronising layers, empty ones while others run."""
    iterator = iter(batches)
    for _ in range(num_batches):
        batch = next(iterator, None)
        x = None if batch is None else _model_input(batch).to(device, non_blocking=True)
        if not syncing:
            if x is None:
                return
            yield x
            continue
        agreed = _agree(x, group, device)
        if agreed is None:
            return
        if x is None:
            shape, dtype = agreed
            yield torch.empty((0, *shape), dtype=dtype, device=device)
        else:
            yield x


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any], num_batches: int = 200) -> dict[str, int]:
    r"""Set every BatchNorm layer's running mean and variance to the exact statistics of its inputs over ``batches``.

    Runs the model forward over at most ``num_batches`` of this rank's ``batches`` with every BatchNorm layer in
    training mode (normalising with batch statistics, as during training; a :class:`~syncbn.SyncBatchNorm`
    with the global batch of its group) and every other module in eval mode (dropout off), collecting per
    channel, in float64, the count, sum and sum of squares of each BatchNorm layer's input. Then, per layer:

    .. math::

        \mu = \frac{1}{N}\sum x, \qquad \sigma^2 = \frac{1}{N - 1}\sum (x - \mu)^2

    over all :math:`N` values the layer saw (all samples and positions), pooled over the ranks of a
    :class:`~syncbn.SyncBatchNorm`'s process group with one all-reduce per layer (plus one for all layers'
    shifts), and local for a plain ``nn.BatchNorm*d`` (or a SyncBatchNorm without peers). The variance is
    unbiased, like torch's ``running_var``; it is the population variance of the data, including the spread of
    the batch means, not an average of per-batch variances.

    Args:
        model: the model (not a DDP or compiled wrapper; pass the module they wrap). Layers without running
            statistics (``track_running_stats=False``) are left alone.
        batches: this rank's batches: input tensors, or tuples/lists whose first element is the input (what a
            ``DataLoader`` yields). Inputs are moved to the device of the BatchNorm buffers.
        num_batches: at most this many batches per rank are used. Default: 200.

    Returns:
        For each recalibrated layer (by module name), the number of values per channel its statistics pool.

    Notes:
        - With synchronising layers, every rank of their group must call this, as with any collective. The ranks
          agree on each round with one small all-reduce, so a rank with fewer batches (or none) runs empty batches
          while the others still have data, and no one waits forever. All synchronising layers must share one
          process group.
        - Weights, biases and their gradients are untouched (no autograd graph is built) and the optimizer is not
          involved. ``num_batches_tracked`` keeps its value from before the call (it counts training steps); the
          training flag of every module is restored afterwards.
        - A layer that saw no values on any rank keeps its running statistics; one that saw a single value gets
          its mean and keeps its variance (an unbiased variance needs two), with a warning.
        - Under autocast, call it inside the same ``torch.autocast`` as training, so the layers see the same
          inputs.

    Example::

        >>> syncbn.recalibrate(model, train_loader, num_batches=200)   # on every rank
        >>> model.eval(); accuracy = evaluate(model, val_loader)
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1 (got {num_batches})")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is not None}
    if not layers:
        return {}
    first = next(iter(layers.values()))
    assert first.running_mean is not None
    device = first.running_mean.device
    syncing, group = _syncing_group(list(layers.values()))

    sums = {name: _PopulationSums(layer) for name, layer in layers.items()}
    tracked = {name: layer.num_batches_tracked.clone() for name, layer in layers.items()}
    training = {m: m.training for m in model.modules()}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, s=sums[name]: s.add(args[0])) for name, layer in layers.items()
    ]
    try:
        model.eval()
        for layer in layers.values():
            layer.train()
        for x in _rounds(batches, num_batches, syncing, group, device):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, was_training in training.items():
            module.train(was_training)

    pooled = [name for name, layer in layers.items() if syncing and isinstance(layer, SyncBatchNorm)]
    if pooled:
        _share_shifts([sums[name] for name in pooled], group)
    counts: dict[str, int] = {}
    for name, layer in layers.items():
        packet = sums[name].packet()
        if name in pooled:
            dist.all_reduce(packet, group=group)
        _set_running_stats(name, layer, packet, sums[name], tracked[name])
        counts[name] = int(packet[0].item())
    return counts


def _set_running_stats(
    name: str, layer: _BatchNorm, packet: torch.Tensor, sums: _PopulationSums, tracked: torch.Tensor
) -> None:
    """Write the pooled mean and unbiased variance into the layer's buffers (in their dtype)."""
    assert layer.running_mean is not None and layer.running_var is not None
    channels = sums.shift.numel()
    count = packet[0].item()
    layer.num_batches_tracked.copy_(tracked)
    # The training-mode forward passes moved the buffers; start again from what the layer had.
    layer.running_mean.copy_(sums.mean_before)
    layer.running_var.copy_(sums.var_before)
    if count == 0:
        logger.warning("recalibrate: layer %r saw no values on any rank; its running statistics are kept", name)
        return
    sum_centred, sum_sq_centred = packet[1 : 1 + channels], packet[1 + channels :]
    mean_offset = sum_centred / count
    layer.running_mean.copy_(sums.shift + mean_offset)
    if count < 2:
        logger.warning("recalibrate: layer %r saw one value per channel; its running variance is kept", name)
        return
    layer.running_var.copy_((sum_sq_centred - count * mean_offset.square()) / (count - 1))
