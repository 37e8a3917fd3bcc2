"""Per-layer BatchNorm statistics: what each layer saw on a recording step, and how ranks differ.

Two halves, so that nothing needs an extra collective:

- on every rank, :class:`BatchStatsRecorder` reads the moments the layers compute anyway (for
  :class:`~syncbn.SyncBatchNorm`: local and global moments, plus the between-rank variance that rides in the same
  all-reduce on recording steps; for plain BatchNorm: local moments from a forward hook);
- outside the workers (e.g. in Ray Train's controller, which receives one report per rank),
  :func:`merge_rank_layer_stats` pools the ranks' local moments into global ones and measures the cross-worker
  skew: how far each rank's batch statistics sit from the global ones. Skew is what makes synchronisation matter.

Two forms of the same data: :meth:`BatchStatsRecorder.snapshot` / :func:`merge_rank_layer_stats` work on
JSON-ready dicts of lists (one layer at a time), while :meth:`BatchStatsRecorder.packed_snapshot` /
:func:`merge_packed_layer_stats` carry every layer of a rank in two float64 tensors and merge all layers of all
ranks in a handful of vectorised operations: what a training loop should send every recorded step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn._functions import RecordedPass, batch_moments, derive_moments, local_moments
from syncbn.batchnorm import SyncBatchNorm

# Relative tolerance within which ranks' global statistics count as equal (float64 pooling, float32 inputs).
_AGREE_RTOL = 1e-6


#: Rows of :attr:`PackedLayerStats.vectors`, each one value per channel (NaN where a layer has none).
PACKED_VECTORS = ("mean_local", "var_local", "mean_global", "var_global", "running_mean", "running_var")
#: Columns of :attr:`PackedLayerStats.scalars`, one row per layer (NaN where a layer has none, e.g. no weight).
PACKED_SCALARS = (
    "eps",
    "synchronized",
    "count_local",
    "weight_mean",
    "weight_min",
    "weight_max",
    "bias_mean",
    "bias_min",
    "bias_max",
    "weight_grad_norm",
    "bias_grad_norm",
)
#: Rows of :attr:`MergedLayerStats.vectors`: the merged per-channel statistics.
MERGED_VECTORS = ("mean", "var", "running_mean", "running_var")

_V = {name: i for i, name in enumerate(PACKED_VECTORS)}
_S = {name: i for i, name in enumerate(PACKED_SCALARS)}


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else t.detach().double().cpu().tolist()


def _short_repr(kind: str, layers: Sequence[str], channels: Sequence[int]) -> str:
    return f"{kind}({len(layers)} layers, {sum(channels)} channels)"


@dataclass(frozen=True, repr=False)
class PackedLayerStats:
    """One rank's statistics of every recorded layer in two float64 tensors (cheap to send and to merge).

    Its ``repr`` names the size only: Ray Train formats every report into a log line (whatever the log level),
    and printing the tensors took ~7 ms per report for 10,240 channels.

    Attributes:
        layers: module paths of the layers, in model order.
        channels: channels of each layer; layer ``i`` owns columns ``sum(channels[:i]) ..`` of ``vectors``.
        scalars: ``(len(layers), len(PACKED_SCALARS))`` float64 on CPU.
        vectors: ``(len(PACKED_VECTORS), sum(channels))`` float64 on CPU.
    """

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    scalars: torch.Tensor
    vectors: torch.Tensor

    def __repr__(self) -> str:
        return _short_repr("PackedLayerStats", self.layers, self.channels)


@dataclass(frozen=True, repr=False)
class MergedLayerStats:
    """Every layer's statistics merged over the ranks (see :func:`merge_packed_layer_stats`).

    Attributes:
        layers: module paths, in model order.
        channels: channels of each layer (column ranges of ``vectors`` as in :class:`PackedLayerStats`).
        summaries: per layer, a JSON-ready dict of scalars (the keys of :func:`merge_rank_layer_stats` except
            the per-channel lists); NaN never appears (None instead).
        vectors: ``(len(MERGED_VECTORS), sum(channels))`` float64: global batch mean and variance, rank 0's
            running mean and variance (NaN without running stats).
    """

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    summaries: tuple[dict[str, Any], ...]
    vectors: torch.Tensor

    def __repr__(self) -> str:
        return _short_repr("MergedLayerStats", self.layers, self.channels)

    def layer_vectors(self, index: int) -> torch.Tensor:
        """The ``(len(MERGED_VECTORS), channels[index])`` block of layer ``index``."""
        start = sum(self.channels[:index])
        return self.vectors[:, start : start + self.channels[index]]


def _summary(prefix: str, t: torch.Tensor | None) -> dict[str, float | None]:
    if t is None or t.numel() == 0:
        return {f"{prefix}_mean": None, f"{prefix}_min": None, f"{prefix}_max": None}
    d = t.detach().double()
    return {f"{prefix}_mean": float(d.mean()), f"{prefix}_min": float(d.min()), f"{prefix}_max": float(d.max())}


def _grad_norm(p: torch.Tensor | None) -> float | None:
    if p is None or p.grad is None:
        return None
    return float(p.grad.detach().double().norm())


def _per_layer(
    values: torch.Tensor, layer_of: torch.Tensor, channels: Sequence[int], reduce: str, empty: float = math.nan
) -> torch.Tensor:
    """One value per layer from the concatenated per-channel ``values`` (``reduce``: sum, mean, amin, amax);
    ``empty`` for a layer without channels.

    Layers of equal width (the usual case) reduce as rows of a ``(layers, channels)`` view, one op; otherwise
    one scatter-reduction over ``layer_of`` (the layer index of every channel).
    """
    width = channels[0] if channels else 0
    if width > 0 and all(c == width for c in channels):
        return getattr(values.reshape(len(channels), width), reduce)(1)
    out = torch.full((len(channels),), empty, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, layer_of, values, reduce, include_self=False)


def _parameter_summaries(
    scalars: torch.Tensor,
    kind: str,
    params: Sequence[torch.Tensor | None],
    channels: Sequence[int],
) -> None:
    """Fill ``{kind}_mean/min/max`` and ``{kind}_grad_norm`` of every layer in ``scalars`` (NaN where a layer has
    no such parameter or gradient): one concatenation and one reduction per statistic over all layers."""
    rows = [i for i, p in enumerate(params) if p is not None and p.numel() == channels[i]]
    if not rows:
        return
    widths = [channels[i] for i in rows]
    layer_of = _layer_index(widths, scalars.device)
    index = torch.tensor(rows, device=scalars.device)
    values = torch.cat([params[i].reshape(-1) for i in rows]).double()
    for suffix, reduce in (("mean", "mean"), ("min", "amin"), ("max", "amax")):
        scalars[index, _S[f"{kind}_{suffix}"]] = _per_layer(values, layer_of, widths, reduce, empty=0.0)
    with_grad = [i for i in rows if params[i].grad is not None]
    if not with_grad:
        return
    if len(with_grad) < len(rows):  # some layers without a gradient (frozen): the norms of the others alone
        widths = [channels[i] for i in with_grad]
        layer_of = _layer_index(widths, scalars.device)
        index = torch.tensor(with_grad, device=scalars.device)
    grads = torch.cat([params[i].grad.reshape(-1) for i in with_grad]).double()
    scalars[index, _S[f"{kind}_grad_norm"]] = _per_layer(grads * grads, layer_of, widths, "sum", empty=0.0).sqrt()


def _layer_index(channels: Sequence[int], device: torch.device) -> torch.Tensor:
    """The layer index of every channel of layers with ``channels`` channels each, concatenated."""
    return torch.repeat_interleave(torch.arange(len(channels)), torch.tensor(channels, dtype=torch.long)).to(device)


class BatchStatsRecorder:
    """Records the batch statistics of every BatchNorm layer of a model on the steps you choose.

    Responsibilities:
      - attach once to every ``_BatchNorm`` of ``model`` (SyncBatchNorm and plain BatchNorm alike);
      - inside :meth:`recording`, keep the moments of that forward pass (no extra collective: a synchronized layer
        sends one more per-channel sum in its usual all-reduce);
      - :meth:`snapshot` returns them with running stats, gamma/beta summaries and gradient norms, JSON-ready.

    Call :meth:`recording` on the same steps on every rank: the recording step's all-reduce is larger, and
    collectives must match. Pass the model itself, not its DDP wrapper, to get names without ``module.``.

    Example::

        >>> recorder = BatchStatsRecorder(model)
        >>> with recorder.recording():
        ...     loss = criterion(ddp_model(x), y)
        >>> loss.backward()
        >>> stats = recorder.snapshot()  # {"layer1.0.bn1": {...}, ...}
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers: dict[str, _BatchNorm] = {
            name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)
        }
        self._recording = False
        self._local: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._synced: dict[str, RecordedPass] = {}
        self._hooks = [m.register_forward_hook(self._make_hook(name)) for name, m in self._layers.items()]

    @property
    def layer_names(self) -> list[str]:
        """Module paths of the BatchNorm layers this recorder watches."""
        return list(self._layers)

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            if not self._recording:
                return
            sink = getattr(module, "_moments_sink", None)
            if sink:
                return  # the synchronized layer recorded its own local and global moments
            with torch.no_grad():
                self._local[name] = local_moments(inputs[0].detach())

        return hook

    @contextmanager
    def recording(self) -> Iterator[BatchStatsRecorder]:
        """Record the moments of the forward passes run inside this block (the last pass per layer wins)."""
        self._local.clear()
        self._synced.clear()
        for layer in self._layers.values():
            if isinstance(layer, SyncBatchNorm):
                layer._moments_sink = []
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False
            for name, layer in self._layers.items():
                if isinstance(layer, SyncBatchNorm):
                    sink, layer._moments_sink = layer._moments_sink, None
                    if sink:
                        self._synced[name] = sink[-1]

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """JSON-ready statistics of the last recording pass, per layer module path.

        Read it after backward (for gradient norms) and before ``optimizer.zero_grad``.
        """
        out: dict[str, dict[str, Any]] = {}
        for name, layer in self._layers.items():
            entry: dict[str, Any] = {"eps": float(layer.eps)}
            if name in self._synced:
                m = batch_moments(self._synced[name])
                entry.update(
                    synchronized=True,
                    count_local=float(m.count_local),
                    mean_local=_floats(m.mean_local),
                    var_local=_floats(m.var_local),
                    count_global=float(m.count_global),
                    mean_global=_floats(m.mean_global),
                    var_global=_floats(m.var_global),
                    between_var=_floats(m.between_var),
                )
            elif name in self._local:
                count, mean, var = self._local[name]
                entry.update(
                    synchronized=False,
                    count_local=float(count),
                    mean_local=_floats(mean),
                    var_local=_floats(var),
                    count_global=None,
                    mean_global=None,
                    var_global=None,
                    between_var=None,
                )
            else:
                continue  # not run in the recorded pass
            entry["running_mean"] = _floats(layer.running_mean) if layer.track_running_stats else None
            entry["running_var"] = _floats(layer.running_var) if layer.track_running_stats else None
            entry.update(_summary("weight", layer.weight))
            entry.update(_summary("bias", layer.bias))
            entry["weight_grad_norm"] = _grad_norm(layer.weight)
            entry["bias_grad_norm"] = _grad_norm(layer.bias)
            out[name] = entry
        return out

    def packed_snapshot(self) -> PackedLayerStats:
        """The statistics of the last recording pass as :class:`PackedLayerStats` (what a training loop sends).

        Same content as :meth:`snapshot` without ``count_global`` and ``between_var`` (the merge recomputes both
        from the ranks' local moments), in two float64 tensors built on the layers' device and copied to the
        host once. Each row of the vectors is one concatenation over the layers, and the per-layer parameter
        summaries and gradient norms are one reduction per statistic over all layers, so the cost barely grows
        with the number of layers (~1 ms for 40 layers on one CPU thread).
        """
        derived = dict(zip(self._synced, derive_moments(list(self._synced.values())), strict=True))
        entries = []
        for name, layer in self._layers.items():
            if name in self._synced:
                entries.append((name, layer, self._synced[name].count, *derived[name]))
            elif name in self._local:
                count, mean, var = self._local[name]
                entries.append((name, layer, count, mean, var, None, None))
        if not entries:
            no_scalars = torch.zeros(0, len(PACKED_SCALARS), dtype=torch.float64)
            return PackedLayerStats((), (), no_scalars, torch.zeros(len(PACKED_VECTORS), 0, dtype=torch.float64))
        device = entries[0][3].device
        channels = [e[3].numel() for e in entries]
        with torch.no_grad():
            missing = torch.full((max(channels),), math.nan, dtype=torch.float64, device=device)
            columns: list[list[torch.Tensor]] = [[] for _ in PACKED_VECTORS]
            for (_, layer, _, mean, var, mean_g, var_g), c in zip(entries, channels, strict=True):
                tracked = layer.track_running_stats and layer.running_mean is not None
                running = (layer.running_mean, layer.running_var) if tracked else (None, None)
                for row, values in enumerate((mean, var, mean_g, var_g, *running)):
                    columns[row].append(missing[:c] if values is None else values.to(torch.float64))
            vectors = torch.stack([torch.cat(pieces) for pieces in columns])

            scalars = torch.full((len(entries), len(PACKED_SCALARS)), math.nan, dtype=torch.float64, device=device)
            scalars[:, _S["eps"]] = torch.tensor([float(e[1].eps) for e in entries], dtype=torch.float64)
            synchronized = [float(e[5] is not None) for e in entries]
            scalars[:, _S["synchronized"]] = torch.tensor(synchronized, dtype=torch.float64)
            scalars[:, _S["count_local"]] = torch.tensor([float(e[2]) for e in entries], dtype=torch.float64)
            for kind in ("weight", "bias"):
                _parameter_summaries(scalars, kind, [getattr(e[1], kind) for e in entries], channels)
        return PackedLayerStats(tuple(e[0] for e in entries), tuple(channels), scalars.cpu(), vectors.cpu())

    def close(self) -> None:
        """Detach the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


_SUMMARY_KEYS = (
    "dead_channels",
    "drift_mean",
    "drift_max",
    "skew_between_share_mean",
    "skew_between_share_max",
    "skew_max_gap",
    "batch_mean_mean",
    "batch_mean_min",
    "batch_mean_max",
    "batch_var_mean",
    "batch_var_min",
    "batch_var_max",
    "running_mean_mean",
    "running_mean_min",
    "running_mean_max",
    "running_var_mean",
    "running_var_min",
    "running_var_max",
)
_PARAMETER_KEYS = (
    "weight_mean",
    "weight_min",
    "weight_max",
    "bias_mean",
    "bias_min",
    "bias_max",
    "weight_grad_norm",
    "bias_grad_norm",
)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def merge_packed_layer_stats(per_rank: Sequence[PackedLayerStats]) -> MergedLayerStats:
    """Merge every layer of every rank (index = rank) at once: global statistics and cross-worker skew.

    The same quantities as :func:`merge_rank_layer_stats`, computed for all layers together on
    ``(ranks, channels of all layers)`` tensors, with per-layer summaries taken by one scatter-reduce each.

    Raises:
        ValueError: no ranks, or ranks that report different layers or channel counts.
    """
    if not per_rank:
        raise ValueError("expected the packed snapshot of at least one rank (got an empty list)")
    first = per_rank[0]
    for rank, other in enumerate(per_rank[1:], start=1):
        if other.layers != first.layers or other.channels != first.channels:
            raise ValueError(
                f"expected every rank to report the layers and channels of rank 0 ({len(first.layers)} layers, "
                f"{sum(first.channels)} channels), got {len(other.layers)} layers, {sum(other.channels)} channels "
                f"from rank {rank}"
            )
    layer_of = _layer_index(first.channels, torch.device("cpu"))
    scalars = torch.stack([p.scalars for p in per_rank])  # (ranks, layers, scalars)
    vectors = torch.stack([p.vectors for p in per_rank])  # (ranks, rows, channels)

    counts = scalars[:, :, _S["count_local"]]  # (ranks, layers)
    total = counts.sum(0)  # (layers,)
    weights = (counts / total.clamp(min=1.0))[:, layer_of]  # (ranks, channels)
    means, variances = vectors[:, _V["mean_local"]], vectors[:, _V["var_local"]]
    present = weights > 0  # an empty rank's moments do not enter the pooled sums
    mean = torch.where(present, weights * means, 0.0).sum(0)
    deviation = means - mean
    between = torch.where(present, weights * deviation**2, 0.0).sum(0)
    var = torch.where(present, weights * variances, 0.0).sum(0) + between

    eps = first.scalars[:, _S["eps"]]
    eps_c = eps[layer_of]
    share = torch.where(var > 0, between / var.clamp(min=1e-300), torch.zeros_like(var))
    gaps = torch.where(present, deviation.abs() / torch.sqrt(var + eps_c), 0.0).amax(0)
    running_mean, running_var = vectors[0, _V["running_mean"]], vectors[0, _V["running_var"]]
    drift = (running_mean - mean).abs() / torch.sqrt(running_var + eps_c)  # NaN without running stats

    synchronized = (scalars[:, :, _S["synchronized"]] > 0).all(0)  # (layers,)
    agree_c = torch.ones(layer_of.numel(), dtype=torch.float64)
    for row in ("mean_global", "var_global"):
        ref = vectors[0, _V[row]]
        close = torch.isclose(vectors[:, _V[row]], ref.expand_as(vectors[:, _V[row]]), rtol=_AGREE_RTOL, atol=1e-9)
        agree_c = torch.minimum(agree_c, close.all(0).double())
    agree = _per_layer(agree_c, layer_of, first.channels, "amin")

    per_channel = {
        "dead_channels": ((var < eps_c).double(), "sum"),
        "drift_mean": (drift, "mean"),
        "drift_max": (drift, "amax"),
        "skew_between_share_mean": (share, "mean"),
        "skew_between_share_max": (share, "amax"),
        "skew_max_gap": (gaps, "amax"),
    }
    for prefix, values in (("batch_mean", mean), ("batch_var", var), ("running_mean", running_mean)):
        per_channel |= {f"{prefix}_mean": (values, "mean"), f"{prefix}_min": (values, "amin")}
        per_channel[f"{prefix}_max"] = (values, "amax")
    per_channel |= {
        "running_var_mean": (running_var, "mean"),
        "running_var_min": (running_var, "amin"),
        "running_var_max": (running_var, "amax"),
    }
    table = torch.stack(
        [_per_layer(v, layer_of, first.channels, r) for v, r in (per_channel[k] for k in _SUMMARY_KEYS)]
    )
    table_rows = table.T.tolist()  # (layers, keys)
    parameters = first.scalars[:, [_S[k] for k in _PARAMETER_KEYS]].tolist()
    totals, count_rows, agree_rows = total.tolist(), counts.T.tolist(), agree.tolist()
    synced = synchronized.tolist()

    summaries = []
    for i, channels in enumerate(first.channels):
        row = dict(zip(_SUMMARY_KEYS, table_rows[i], strict=True))
        summary: dict[str, Any] = {
            "synchronized": bool(synced[i]),
            "ranks": len(per_rank),
            "count": totals[i],
            "per_rank_count": count_rows[i],
            "channels": channels,
            "dead_channels": int(row.pop("dead_channels")) if totals[i] > 0 and channels else 0,
        }
        for key in ("skew_between_share_mean", "skew_between_share_max", "skew_max_gap"):
            value = row.pop(key)
            summary[key] = _finite_or_none(value) if channels else 0.0
        if totals[i] <= 0:
            row["drift_mean"] = row["drift_max"] = math.nan
        summary["drift_mean"] = _finite_or_none(row.pop("drift_mean"))
        summary["drift_max"] = _finite_or_none(row.pop("drift_max"))
        summary["ranks_agree"] = (agree_rows[i] >= 1.0 or not channels) if synced[i] else None
        summary |= {key: _finite_or_none(value) for key, value in row.items()}
        summary |= {key: _finite_or_none(value) for key, value in zip(_PARAMETER_KEYS, parameters[i], strict=True)}
        summaries.append(summary)
    merged_vectors = torch.stack([mean, var, running_mean, running_var])
    return MergedLayerStats(first.layers, first.channels, tuple(summaries), merged_vectors)


def _pack_layer_dict(snapshot: Mapping[str, Any]) -> PackedLayerStats:
    """One layer's :meth:`BatchStatsRecorder.snapshot` dict as a one-layer :class:`PackedLayerStats`."""
    mean = torch.as_tensor(snapshot["mean_local"], dtype=torch.float64)
    c = mean.numel()

    def row(key: str) -> torch.Tensor:
        values = snapshot.get(key)
        return (
            torch.full((c,), math.nan, dtype=torch.float64)
            if values is None
            else torch.as_tensor(values, dtype=torch.float64)
        )

    def scalar(key: str) -> float:
        value = snapshot.get(key)
        return math.nan if value is None else float(value)

    scalars = torch.tensor(
        [[scalar(k) if k != "synchronized" else float(bool(snapshot.get(k))) for k in PACKED_SCALARS]],
        dtype=torch.float64,
    )
    return PackedLayerStats(("layer",), (c,), scalars, torch.stack([row(k) for k in PACKED_VECTORS]))


def merge_rank_layer_stats(per_rank: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool one layer's snapshots from every rank (index = rank) into global statistics and skew measures.

    Global count, mean and (biased) variance per channel are pooled from the ranks' local moments
    (``var = sum_i n_i (v_i + (m_i - m)^2) / N``), so this works for plain, unsynchronized BatchNorm too.

    Returns a JSON-ready dict: the per-channel ``mean``/``var`` and running stats, summaries over channels,
    ``dead_channels`` (global variance below eps), ``drift_mean``/``drift_max``
    (``|running_mean - batch_mean| / sqrt(running_var + eps)``, rank 0's running stats), ``skew_between_share_*``
    (between-rank share of the variance, per channel ``sum_i n_i (m_i - m)^2 / sum_i n_i (v_i + (m_i - m)^2)``),
    ``skew_max_gap`` (largest ``|m_i - m| / sqrt(var + eps)`` over non-empty ranks and channels),
    ``ranks_agree`` and ``per_rank_count``. :func:`merge_packed_layer_stats` does the same for every layer at once.
    """
    if not per_rank:
        raise ValueError("expected the layer's snapshot from at least one rank (got an empty list)")
    merged = merge_packed_layer_stats([_pack_layer_dict(r) for r in per_rank])
    out = dict(merged.summaries[0])
    vectors = merged.vectors
    has_running = per_rank[0].get("running_mean") is not None and per_rank[0].get("running_var") is not None
    out["mean"] = vectors[0].tolist()
    out["var"] = vectors[1].tolist()
    out["running_mean"] = vectors[2].tolist() if has_running else None
    out["running_var"] = vectors[3].tolist() if has_running else None
    return out
