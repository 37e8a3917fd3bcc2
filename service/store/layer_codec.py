"""The binary forms of per-layer BatchNorm statistics in the store: narrow summaries and float32 vectors.

A merged layer record (`syncbn.merge_packed_layer_stats`) has ~30 scalars and four per-channel vectors. As JSON
text that was ~90 bytes per channel per recorded step; here:

- a summary is `SUMMARY_FIELDS` as little-endian float32 (NaN for "none"; booleans as 0/1) followed by the ranks'
  element counts as float64 (counts can exceed float32's exact integers): 116 + 8 x ranks bytes, or 124 bytes
  whatever the number of ranks when they all saw the same count (the usual case: equal batches per rank), stored
  once and told apart by `ranks` > 1 with a single count (every version has written one count per rank);
- the vectors are one float32 block of `VECTOR_ROWS` x channels (16 bytes per channel), NaN where a layer has
  no running statistics.

Decoding gives back the dicts the API has always served (`channels` comes from the layer's series, `count` is
the sum of the ranks' counts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "SUMMARY_FIELDS",
    "VECTOR_ROWS",
    "decode_summary",
    "decode_vector_arrays",
    "decode_vectors",
    "encode_summary",
    "encode_vectors",
    "summary_columns",
    "vectors_from_lists",
]

#: Scalars of a layer summary, in their order in the binary form (float32 each).
SUMMARY_FIELDS = (
    "synchronized",
    "ranks",
    "ranks_agree",
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
    "weight_mean",
    "weight_min",
    "weight_max",
    "bias_mean",
    "bias_min",
    "bias_max",
    "weight_grad_norm",
    "bias_grad_norm",
)
#: Rows of the per-channel block, in order (the names the API uses for the lists).
VECTOR_ROWS = ("mean", "var", "running_mean", "running_var")

_FLAGS = {"synchronized", "ranks_agree"}
_INTEGERS = {"dead_channels", "ranks"}
_SUMMARY_BYTES = 4 * len(SUMMARY_FIELDS)
_F32 = np.dtype("<f4")
_F64 = np.dtype("<f8")


def _scalar(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return math.nan


def encode_summary(stats: Mapping[str, Any]) -> bytes:
    """The binary summary of one layer at one step (unknown keys and the per-channel lists are not kept)."""
    head = np.array([_scalar(stats.get(key)) for key in SUMMARY_FIELDS], dtype=_F32)
    counts = stats.get("per_rank_count")
    if not isinstance(counts, list | tuple):
        counts = [stats["count"]] if isinstance(stats.get("count"), int | float) else []
    if len(counts) > 1 and len(set(counts)) == 1 and head[SUMMARY_FIELDS.index("ranks")] == len(counts):
        counts = counts[:1]  # equal counts: one is enough, so 64 ranks cost what 1 does
    tail = np.array([_scalar(c) for c in counts], dtype=_F64)
    return head.tobytes() + tail.tobytes()


def decode_summary(blob: bytes, channels: int) -> dict[str, Any]:
    """The summary dict of `encode_summary`'s bytes (NaN -> None), with `channels`, `ranks` and `count`."""
    head = np.frombuffer(blob, dtype=_F32, count=len(SUMMARY_FIELDS)).tolist()
    counts = np.frombuffer(blob, dtype=_F64, offset=_SUMMARY_BYTES).tolist()
    out: dict[str, Any] = {}
    for key, value in zip(SUMMARY_FIELDS, head, strict=True):
        if not math.isfinite(value):
            out[key] = None
        elif key in _FLAGS:
            out[key] = value != 0.0
        elif key in _INTEGERS:
            out[key] = int(value)
        else:
            out[key] = value
    out["synchronized"] = bool(out["synchronized"])
    finite = [c if math.isfinite(c) else None for c in counts]
    if out["ranks"] is None:
        out["ranks"] = len(finite)
    elif len(finite) == 1 and out["ranks"] > 1:
        finite = finite * out["ranks"]  # the compact form of equal counts
    out["per_rank_count"] = finite
    out["count"] = float(sum(c for c in finite if c is not None))
    out["channels"] = channels
    return out


def summary_columns(blobs: list[bytes], keys: list[str]) -> np.ndarray:
    """`(len(blobs), len(keys))` float64 values of `keys` (names in SUMMARY_FIELDS) from many summaries at once
    (one numpy pass over their float32 parts; NaN for "none")."""
    columns = [SUMMARY_FIELDS.index(key) for key in keys]
    heads = b"".join(blob[:_SUMMARY_BYTES] for blob in blobs)
    table = np.frombuffer(heads, dtype=_F32).reshape(len(blobs), len(SUMMARY_FIELDS))
    return table[:, columns].astype(np.float64)


def encode_vectors(block: np.ndarray) -> bytes:
    """One layer's `(len(VECTOR_ROWS), channels)` block as float32 bytes."""
    array = np.asarray(block)
    if array.ndim != 2 or array.shape[0] != len(VECTOR_ROWS):
        raise ValueError(f"expected a ({len(VECTOR_ROWS)}, channels) block of vectors, got shape {array.shape}")
    return array.astype(_F32).tobytes()


def vectors_from_lists(stats: Mapping[str, Any]) -> bytes | None:
    """The float32 block built from a layer dict's per-channel lists (records of the JSON era), or None."""
    mean = stats.get("mean")
    if not isinstance(mean, list):
        return None
    channels = len(mean)
    rows = []
    for key in VECTOR_ROWS:
        values = stats.get(key)
        if isinstance(values, list) and len(values) == channels:
            rows.append([math.nan if v is None else float(v) for v in values])
        else:
            rows.append([math.nan] * channels)
    return encode_vectors(np.array(rows, dtype=np.float64).reshape(len(VECTOR_ROWS), channels))


def decode_vectors(blob: bytes) -> dict[str, list[float | None] | None]:
    """`{mean, var, running_mean, running_var}` lists from the float32 bytes (an all-NaN row -> None)."""
    block = np.frombuffer(blob, dtype=_F32).reshape(len(VECTOR_ROWS), -1)
    out: dict[str, list[float | None] | None] = {}
    for key, row in zip(VECTOR_ROWS, block, strict=True):
        finite = np.isfinite(row)
        if not finite.any() and row.size:
            out[key] = None
        elif finite.all():
            out[key] = row.tolist()
        else:
            out[key] = [v if math.isfinite(v) else None for v in row.tolist()]
    return out


def decode_vector_arrays(blob: bytes) -> dict[str, np.ndarray | None]:
    """`{mean, var, running_mean, running_var}` as float32 arrays (NaN kept; an all-NaN row -> None), read
    without building Python floats: what the API's orjson and binary forms serialise directly (2,048 channels x
    200 snapshots are 1.6 M values, whose Python lists alone took longer than the whole answer may)."""
    block = np.frombuffer(blob, dtype=_F32).reshape(len(VECTOR_ROWS), -1)
    out: dict[str, np.ndarray | None] = {}
    for key, row in zip(VECTOR_ROWS, block, strict=True):
        out[key] = None if row.size and not np.isfinite(row).any() else row
    return out
