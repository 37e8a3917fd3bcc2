"""The error answers each route documents in OpenAPI (all share the `ErrorPublic` JSON body)."""

from __future__ import annotations

from typing import Any

from service.api.models import ErrorPublic

__all__ = ["errors"]

_DESCRIPTIONS = {
    401: "Missing or wrong bearer token (only when the service has api_tokens).",
    404: "No job with this id (or no such layer / recorded step).",
    409: "The job's state does not allow this request.",
    413: "The request body is larger than max_body_bytes.",
    422: "Invalid input: the detail names each field and how to fix it.",
    503: "The Ray cluster does not answer; retry after a few seconds.",
}


def errors(*codes: int, non_json_route: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these status codes, each with the `ErrorPublic` body.

    FastAPI documents a `model` under the route's own media type; routes that answer something else on
    success (an event stream, a file, Prometheus text) set `non_json_route` so errors stay `application/json`.
    """
    if not non_json_route:
        return {code: {"model": ErrorPublic, "description": _DESCRIPTIONS[code]} for code in codes}
    schema = {"$ref": "#/components/schemas/ErrorPublic"}
    return {
        code: {"description": _DESCRIPTIONS[code], "content": {"application/json": {"schema": schema}}}
        for code in codes
    }
