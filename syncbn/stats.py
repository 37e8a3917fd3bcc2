"""Per-layer BatchNorm statistics: what each layer saw on a recording step, and how ranks differ.

Two halves, so that nothing needs an extra collective:

- on every rank, :class:`BatchStatsRecorder` reads the moments the layers compute anyway (for
  :class:`~syncbn.SyncBatchNorm`: local and global moments, plus the between-rank variance that rides in the same
  all-reduce on recording steps; for plain BatchNorm: local moments from a forward hook);
- outside the workers (e.g. in Ray Train's controller, which receives one report per rank),
  :func:`merge_rank_layer_stats` pools the ranks' local moments into global ones and measures the cross-worker
  skew: how far each rank's batch statistics sit from the global ones. Skew is what makes synchronisation matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn._functions import BatchMoments, local_moments
from syncbn.batchnorm import SyncBatchNorm

# Relative tolerance within which ranks' global statistics count as equal (float64 pooling, float32 inputs).
_AGREE_RTOL = 1e-6


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(v) for v in t.detach().double().cpu()]


def _summary(prefix: str, t: torch.Tensor | None) -> dict[str, float | None]:
    if t is None or t.numel() == 0:
        return {f"{prefix}_mean": None, f"{prefix}_min": None, f"{prefix}_max": None}
    d = t.detach().double()
    return {f"{prefix}_mean": float(d.mean()), f"{prefix}_min": float(d.min()), f"{prefix}_max": float(d.max())}


def _grad_norm(p: torch.Tensor | None) -> float | None:
    if p is None or p.grad is None:
        return None
    return float(p.grad.detach().double().norm())


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
        self._synced: dict[str, BatchMoments] = {}
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
                m = self._synced[name]
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

    def close(self) -> None:
        """Detach the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _tensor(values: Sequence[float] | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float64)


def _ranks_agree(per_rank: Sequence[Mapping[str, Any]]) -> bool | None:
    """Whether every rank used the same global statistics (None where the layer is not synchronized)."""
    if not all(r.get("synchronized") for r in per_rank):
        return None
    first = per_rank[0]
    for key in ("mean_global", "var_global"):
        ref = _tensor(first[key])
        for other in per_rank[1:]:
            if not torch.allclose(_tensor(other[key]), ref, rtol=_AGREE_RTOL, atol=1e-9):
                return False
    return True


def merge_rank_layer_stats(per_rank: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool one layer's snapshots from every rank (index = rank) into global statistics and skew measures.

    Global count, mean and (biased) variance per channel are pooled from the ranks' local moments
    (``var = sum_i n_i (v_i + (m_i - m)^2) / N``), so this works for plain, unsynchronized BatchNorm too.

    Returns a JSON-ready dict: the per-channel ``mean``/``var`` and running stats, summaries over channels,
    ``dead_channels`` (global variance below eps), ``drift_mean``/``drift_max``
    (``|running_mean - batch_mean| / sqrt(running_var + eps)``, rank 0's running stats), ``skew_between_share_*``
    (between-rank share of the variance, per channel ``sum_i n_i (m_i - m)^2 / sum_i n_i (v_i + (m_i - m)^2)``),
    ``skew_max_gap`` (largest ``|m_i - m| / sqrt(var + eps)`` over non-empty ranks and channels),
    ``ranks_agree`` and ``per_rank_count``.
    """
    if not per_rank:
        raise ValueError("expected the layer's snapshot from at least one rank (got an empty list)")
    eps = float(per_rank[0]["eps"])
    counts = torch.tensor([float(r["count_local"]) for r in per_rank], dtype=torch.float64)
    means = torch.stack([_tensor(r["mean_local"]) for r in per_rank])  # (ranks, C)
    variances = torch.stack([_tensor(r["var_local"]) for r in per_rank])
    total = float(counts.sum())
    weights = counts[:, None] / max(total, 1.0)
    mean = (weights * means).sum(0)
    between = (weights * (means - mean) ** 2).sum(0)
    var = (weights * variances).sum(0) + between

    share = torch.where(var > 0, between / var.clamp(min=1e-300), torch.zeros_like(var))
    gaps = (means - mean).abs() / torch.sqrt(var + eps)
    nonempty = counts > 0
    max_gap = float(gaps[nonempty].max()) if bool(nonempty.any()) and gaps.numel() else 0.0

    rank0 = per_rank[0]
    running_mean = _tensor(rank0.get("running_mean"))
    running_var = _tensor(rank0.get("running_var"))
    drift = None
    if running_mean is not None and running_var is not None and total > 0:
        drift = (running_mean - mean).abs() / torch.sqrt(running_var + eps)

    merged: dict[str, Any] = {
        "synchronized": bool(all(r.get("synchronized") for r in per_rank)),
        "ranks": len(per_rank),
        "count": total,
        "per_rank_count": [float(c) for c in counts],
        "channels": int(mean.numel()),
        "mean": _floats(mean),
        "var": _floats(var),
        "running_mean": _floats(running_mean),
        "running_var": _floats(running_var),
        "dead_channels": int((var < eps).sum()) if total > 0 else 0,
        "drift_mean": None if drift is None else float(drift.mean()),
        "drift_max": None if drift is None else float(drift.max()),
        "skew_between_share_mean": float(share.mean()) if share.numel() else 0.0,
        "skew_between_share_max": float(share.max()) if share.numel() else 0.0,
        "skew_max_gap": max_gap if math.isfinite(max_gap) else None,
        "ranks_agree": _ranks_agree(per_rank),
    }
    merged.update(_summary("batch_mean", mean))
    merged.update(_summary("batch_var", var))
    merged.update(_summary("running_mean", running_mean))
    merged.update(_summary("running_var", running_var))
    for key in (
        "weight_mean",
        "weight_min",
        "weight_max",
        "bias_mean",
        "bias_min",
        "bias_max",
        "weight_grad_norm",
        "bias_grad_norm",
    ):
        merged[key] = rank0.get(key)
    return merged
