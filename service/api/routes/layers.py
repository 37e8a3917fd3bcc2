"""Per-layer BatchNorm statistics of a job: the latest (or a given) recorded step, and one layer's history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status

from service.api.deps import JobDep, StoreDep
from service.api.layer_forms import (
    SAFETENSORS_MEDIA_TYPE,
    history_json,
    history_safetensors,
    layers_json,
    layers_safetensors,
    wants_safetensors,
)
from service.api.models import LayerHistoryPublic, LayerMatrixPublic, LayersPublic
from service.api.routes.responses import errors
from service.store.layer_codec import SUMMARY_FIELDS
from service.store.limits import integer_range
from service.store.models import LayerSummaryRow

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["layers"])

Channels = Annotated[
    bool,
    Query(description="Include the per-channel lists (mean, var, running_mean, running_var); false: summaries."),
]


#: The binary form in the OpenAPI document (the JSON form is the response model).
BINARY_FORM = {
    200: {
        "content": {SAFETENSORS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON, or with `Accept: application/x-safetensors` the per-channel vectors as float32 "
        "tensors in a safetensors file (see service/api/layer_forms.py).",
    }
}


def _some(values: list, limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


@router.get(
    "/jobs/{job_id}/layers",
    response_model=LayersPublic,
    summary="Read per-layer BatchNorm statistics",
    responses=errors(401, 404, 422) | BINARY_FORM,
)
def read_layers(
    request: Request,
    job: JobDep,
    store: StoreDep,
    step: Annotated[
        int | None,
        Query(
            ge=0,
            le=integer_range(LayerSummaryRow.step)[1],
            description="A step; the answer is for the nearest recorded step (with channels: the nearest kept "
            "snapshot), named in `step`. Default: the latest recorded step.",
        ),
    ] = None,
    channels: Channels = True,
) -> Response:
    """Every BatchNorm layer's statistics at one step: global batch mean/variance, running stats, gamma/beta,
    gradient norms, dead channels, drift and cross-worker skew. Empty (`step: null`) until the first record.
    With `Accept: application/x-safetensors`, the per-channel vectors come as float32 tensors."""
    result = store.layers_at(job.id, step, channels=channels, arrays=True)
    if step is not None and result.step is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"job {job.id} has no layer statistics at step {step}: none recorded yet; ask again once the run has "
            "recorded a step (every stats_every steps).",
        )
    return layers_safetensors(job.id, result) if wants_safetensors(request) else layers_json(job.id, result)


@router.get(
    "/jobs/{job_id}/layers/{layer}",
    response_model=LayerHistoryPublic,
    summary="Read one layer's history",
    responses=errors(401, 404, 422) | BINARY_FORM,
)
def read_layer_history(
    request: Request,
    job: JobDep,
    store: StoreDep,
    layer: Annotated[str, Path(description="Module path of the layer, e.g. 'layer1.0.bn1'.")],
    since_step: Annotated[
        int | None,
        Query(ge=-1, le=integer_range(LayerSummaryRow.step)[1], description="Only steps after this one."),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=1_000_000, description="Consider at most this many steps after since_step.")
    ] = 1_000_000,
    max_points: Annotated[
        int,
        Query(ge=1, le=10_000, description="Most points to return: the series is downsampled evenly to this."),
    ] = 500,
    channels: Channels = True,
) -> Response:
    """One layer's statistics over the run, ascending: every recorded step's summary (`channels=false`), or the
    kept snapshots with their per-channel lists (`channels=true`), downsampled to `max_points`. With
    `Accept: application/x-safetensors`, the steps and the per-channel vectors come as tensors (points x channels)."""
    history = store.layer_history(
        job.id, layer, since_step=since_step, limit=limit, max_points=max_points, channels=channels, arrays=True
    )
    if history is None:
        names = store.layer_names(job.id)
        known = _some(names) if names else "none recorded yet"
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"job {job.id} has no statistics for layer {layer!r}; its layers: {known}.",
        )
    if wants_safetensors(request):
        return history_safetensors(job.id, layer, history, channels=channels)
    return history_json(job.id, layer, history)


@router.get(
    "/jobs/{job_id}/layer-summaries",
    response_model=LayerMatrixPublic,
    summary="Read summary statistics of every layer over the run (the heatmap)",
    responses=errors(401, 404, 422),
)
def read_layer_matrix(
    job: JobDep,
    store: StoreDep,
    keys: Annotated[
        str,
        Query(
            max_length=2000,
            description="Comma-separated summary statistics, e.g. skew_max_gap,drift_mean; "
            f"any of: {', '.join(SUMMARY_FIELDS)}.",
        ),
    ],
    max_steps: Annotated[
        int, Query(ge=1, le=10_000, description="Most steps (columns) to return, evenly spaced.")
    ] = 2000,
) -> LayerMatrixPublic:
    """Chosen summary statistics of every layer at the recorded steps, as layers x steps lists: one small answer
    instead of replaying every `layers` event (pair it with `GET /events?layers_after_step=`)."""
    wanted = [key.strip() for key in keys.split(",") if key.strip()]
    unknown = [key for key in wanted if key not in SUMMARY_FIELDS]
    if not wanted or unknown:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"keys must name summary statistics (got {unknown or 'none'}): use some of {', '.join(SUMMARY_FIELDS)}.",
        )
    return LayerMatrixPublic.from_result(job.id, store.layer_matrix(job.id, wanted, max_steps=max_steps))
