"""Text the database cannot store (NUL characters, unpaired surrogates) is a 422 naming the field, never a 500.

PostgreSQL refuses such text wherever it goes, in a stored column or in a query's parameter (a job id or layer
name in a path), so the check is made for every /v1 request before any route reads the database: path and query
parameters here (`reject_unstorable_parameters`, a router dependency), the job spec body in `JobCreate`. The rule
itself lives with the store (`service.store.limits.unstorable_text_reason`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from service.store.limits import unstorable_text_reason

__all__ = ["reject_unstorable_parameters"]


def reject_unstorable_parameters(request: Request) -> None:
    """Refuse the request with 422 when a path or query parameter holds text the database cannot store."""
    errors: list[dict[str, Any]] = []
    parameters = [("path", name, value) for name, value in request.path_params.items()]
    parameters += [("query", name, value) for name, value in request.query_params.multi_items()]
    for place, name, value in parameters:
        reason = unstorable_text_reason(value) if isinstance(value, str) else None
        if reason is None and isinstance(name, str):
            reason = unstorable_text_reason(name)
        if reason is not None:
            errors.append({"type": "value_error", "loc": (place, name), "msg": f"{reason}: remove it.", "input": value})
    if errors:
        raise RequestValidationError(errors)
