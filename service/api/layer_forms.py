"""The two forms of the per-layer routes' answers: JSON written by orjson, and a binary safetensors form.

Per-channel vectors dominate these answers: one 2,048-channel layer (ResNet-50's widest) with 200 kept snapshots
is 1.6 M float32 values. Building pydantic models and Python floats for them, then encoding with the standard
JSON encoder, took about 0.3 s and 31 MB on the 2-core development machine; the store now hands the vectors over
as float32 numpy arrays, which orjson writes directly (`OPT_SERIALIZE_NUMPY`, float32 written at float32's
shortest precision: about half the bytes) and which the binary form copies as they are.

The binary form, chosen with `Accept: application/x-safetensors`, is a safetensors file (Hugging Face's format:
an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then the raw
little-endian data). It is read with `safetensors.numpy.load(body)` or `safetensors.torch.load(body)`, or by hand
in a few lines (the dashboard does, with a DataView). Its `__metadata__` holds what is not an array, as JSON text
(safetensors' metadata values are strings, so every one is JSON text, strings quoted): the format, the job, the
layer(s), the steps, the summaries. Not-a-number marks a channel
value that was not recorded (no running statistics), where JSON has null.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from fastapi import Request, Response

from service.store.layer_codec import VECTOR_ROWS
from service.store.repository import LayerHistory, LayersAtStep

__all__ = [
    "SAFETENSORS_MEDIA_TYPE",
    "history_json",
    "history_safetensors",
    "json_response",
    "layers_json",
    "layers_safetensors",
    "safetensors_bytes",
    "wants_safetensors",
]

SAFETENSORS_MEDIA_TYPE = "application/x-safetensors"

_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}


def wants_safetensors(request: Request) -> bool:
    """Whether the request's Accept header asks for the binary form (anything else gets JSON)."""
    return SAFETENSORS_MEDIA_TYPE in request.headers.get("accept", "")


def json_response(payload: Mapping[str, Any]) -> Response:
    """`payload` (numpy arrays allowed; NaN becomes null) as an application/json answer."""
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    return Response(content=body, media_type="application/json")


def _json_texts(values: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata: every value as JSON text (its values must be strings)."""
    return {key: orjson.dumps(value).decode() for key, value in values.items()}


def _summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in stats.items() if key not in VECTOR_ROWS}


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """`tensors` (float32 or int64 arrays) and string `metadata` as one safetensors file, in the given order.

    The header is padded with spaces to a multiple of 8 bytes, so every tensor starts 8-byte aligned (a reader can
    view the data without copying), as the safetensors library writes it.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    parts = []
    offset = 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array)
        if data.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: expected float32 or int64, got {data.dtype}")
        raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _DTYPES[data.dtype],
            "shape": list(data.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        parts.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(parts)


def _vectors_block(points: list[Mapping[str, Any]], channels: int) -> dict[str, np.ndarray]:
    """Each vector row of `points` stacked into a (points, channels) float32 array; NaN where one is missing."""
    out = {}
    for key in VECTOR_ROWS:
        block = np.full((len(points), channels), np.nan, dtype=np.float32)
        for index, stats in enumerate(points):
            row = stats.get(key)
            if row is not None and len(row) == channels:
                block[index] = row
        out[key] = block
    return out


def history_json(job_id: str, layer: str, history: LayerHistory) -> Response:
    """`GET /layers/{layer}` as JSON (the shape of `LayerHistoryPublic`)."""
    points = [{"step": p.step, "epoch": p.epoch, "stats": p.stats} for p in history.points]
    return json_response({"job_id": job_id, "layer": layer, "available": history.available, "points": points})


def history_safetensors(job_id: str, layer: str, history: LayerHistory, *, channels: bool) -> Response:
    """`GET /layers/{layer}` as safetensors: `step` and `epoch` (int64, points), with `channels` the vector rows
    `mean`, `var`, `running_mean`, `running_var` (float32, points x channels); the summaries in metadata."""
    stats = [p.stats for p in history.points]
    tensors: dict[str, np.ndarray] = {
        "step": np.array([p.step for p in history.points], dtype=np.int64),
        "epoch": np.array([p.epoch for p in history.points], dtype=np.int64),
    }
    width = int(stats[0].get("channels") or 0) if stats else 0
    if channels:
        tensors |= _vectors_block(stats, width)
    metadata = _json_texts(
        {
            "format": "syncbn.layer-history.v1",
            "job_id": job_id,
            "layer": layer,
            "available": history.available,
            "summaries": [_summary(s) for s in stats],
        }
    )
    return Response(content=safetensors_bytes(tensors, metadata), media_type=SAFETENSORS_MEDIA_TYPE)


def _layers_payload(job_id: str, result: LayersAtStep) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "step": result.step,
        "requested_step": result.requested_step,
        "epoch": result.epoch,
        "recorded_steps": result.recorded_steps,
        "kept_steps": result.kept_steps,
    }


def layers_json(job_id: str, result: LayersAtStep) -> Response:
    """`GET /layers` as JSON (the shape of `LayersPublic`)."""
    return json_response(_layers_payload(job_id, result) | {"layers": result.layers})


def layers_safetensors(job_id: str, result: LayersAtStep) -> Response:
    """`GET /layers` as safetensors: `<layer>.<row>` float32 vectors (channels) of every layer that keeps them at
    the step shown, named like a state dict's keys; the step, the steps lists and the summaries in metadata."""
    tensors: dict[str, np.ndarray] = {}
    for layer, stats in result.layers.items():
        width = int(stats.get("channels") or 0)
        if all(stats.get(key) is None for key in VECTOR_ROWS):
            continue
        for key, block in _vectors_block([stats], width).items():
            tensors[f"{layer}.{key}"] = block[0]
    summaries = {layer: _summary(stats) for layer, stats in result.layers.items()}
    metadata = _json_texts({"format": "syncbn.layers.v1", **_layers_payload(job_id, result), "summaries": summaries})
    return Response(content=safetensors_bytes(tensors, metadata), media_type=SAFETENSORS_MEDIA_TYPE)
