"""Error answers: every failure becomes JSON `{"detail": "<sentence>"}` with the right status code.

```
RequestValidationError ─────────────────── 422  field-by-field sentences (+ `errors` list)
JobCannotFitError, IdempotencyKeyReusedError 422  the sentence of the exception
UnknownModelError ──────────────────────── 422  names the field `model`, with close matches (+ `errors` list)
ModelInputError ────────────────────────── 422  the model's input channels and the data set's (+ `errors` list)
JobNotFoundError ───────────────────────── 404
JobStateError ──────────────────────────── 409
ClusterUnavailableError ────────────────── 503  Ray does not answer; retry later
OperationalError, InterfaceError (SQLAlchemy) 503  the database does not answer (restart, failover); retry later
HTTPException (404 route, 405, 401, 413) ── its status, a sentence
anything else ──────────────────────────── 500  logged with its traceback; the client gets no internals
```
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.model_registry import ModelInputError, UnknownModelError
from service.jobs.manager import ClusterUnavailableError, JobCannotFitError, JobNotFoundError, JobStateError
from service.store import IdempotencyKeyReusedError

__all__ = ["describe_validation_error", "register_error_handlers"]

logger = logging.getLogger(__name__)

#: FastAPI's detail for a body it could not decode at all.
_UNPARSABLE_BODY = "There was an error parsing the body"

_PLACES = {"query": "query parameter", "path": "path parameter", "header": "header", "cookie": "cookie"}


def _field_name(loc: tuple[Any, ...]) -> str:
    """A readable name for an error location: `optimizer.lr`, `query parameter 'limit'`, `the body`."""
    if not loc:
        return "the request"
    place, rest = str(loc[0]), [str(part) for part in loc[1:]]
    if place == "body":
        return ".".join(rest) if rest else "the body"
    if place in _PLACES:
        return f"{_PLACES[place]} {'.'.join(rest)!r}"
    return ".".join([place, *rest])


def _shown_input(value: Any) -> str | None:
    """A short rendering of the offending value, for scalars only (bodies are not echoed back)."""
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return None


def describe_validation_error(error: dict[str, Any]) -> str:
    """One sentence for one pydantic error: which field, what is wrong, and how to fix it."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    message = str(error.get("msg", "is invalid"))
    field = _field_name(loc)
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "malformed JSON")
        return f"the request body is not valid JSON ({reason}): send the job spec as a JSON object."
    if kind == "missing":
        if loc == ("body",):
            return "the request body is missing: send the job spec as a JSON object (see /docs)."
        return f"{field} is required: add it."
    if kind == "extra_forbidden":
        return f"{field} is not a known field: remove it (the known fields are listed at /docs)."
    if kind in ("model_attributes_type", "dict_type", "model_type") and loc == ("body",):
        return (
            "the request body must be a JSON object with the job spec's fields, sent with "
            "Content-Type: application/json (see /docs)."
        )
    if kind == "value_error":
        # Our validators already write whole sentences that name the field.
        text = message.removeprefix("Value error, ")
        return text if loc in ((), ("body",)) or field in text else f"{field}: {text}"
    shown = _shown_input(error.get("input"))
    got = f" (got {shown})" if shown is not None and kind != "missing" else ""
    sentence = f"{field}: {message[:1].lower() + message[1:]}{got}"
    return sentence if sentence.endswith(".") else sentence + "."


def _error_list(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "field": "the body" if e.get("type") == "json_invalid" else _field_name(tuple(e.get("loc", ()))),
            "loc": [str(part) for part in e.get("loc", ())],
            "type": e.get("type"),
            "message": describe_validation_error(e),
        }
        for e in errors
    ]


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    sentences = [describe_validation_error(e) for e in errors]
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": " ".join(sentences) or "the request is invalid.", "errors": _error_list(errors)},
    )


async def _unprocessable(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": str(exc)})


async def _unknown_model(_: Request, exc: Exception) -> JSONResponse:
    return _model_error(str(exc), "unknown_model")


async def _model_input(_: Request, exc: Exception) -> JSONResponse:
    return _model_error(str(exc), "model_input")


def _model_error(sentence: str, error_type: str) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={
            "detail": sentence,
            "errors": [{"field": "model", "loc": ["body", "model"], "type": error_type, "message": sentence}],
        },
    )


async def _not_found(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_404_NOT_FOUND, content={"detail": str(exc)})


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE, content={"detail": str(exc)}, headers={"Retry-After": "5"}
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    outage = not isinstance(exc, DBAPIError) or isinstance(exc, OperationalError | InterfaceError)
    if not outage and not exc.connection_invalidated:
        return await _internal_error(request, exc)  # a real error of the query (a constraint, ...), not an outage
    logger.warning("%s %s: the database does not answer: %s", request.method, request.url.path, exc.__class__.__name__)
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={
            "detail": "the database does not answer right now (a restart or a failover): the request was not "
            "carried out; retry in a few seconds (see /readyz). A submission retried with the same "
            "Idempotency-Key never makes a second job."
        },
        headers={"Retry-After": "5"},
    )


async def _conflict(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": str(exc)})


def _http_detail(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == status.HTTP_404_NOT_FOUND and exc.detail == "Not Found":
        return f"there is no route {request.method} {request.url.path}: the API lives under /v1 (see /docs)."
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        allowed = exc.headers.get("Allow", "") if exc.headers else ""
        return f"{request.method} is not allowed on {request.url.path}" + (f": use {allowed}." if allowed else ".")
    if exc.status_code == status.HTTP_413_CONTENT_TOO_LARGE:
        limit = request.app.state.settings.max_body_bytes
        return f"the request body is larger than the limit of {limit} bytes: send a smaller body."
    return str(exc.detail)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == status.HTTP_400_BAD_REQUEST and exc.detail == _UNPARSABLE_BODY:
        # FastAPI's answer to a body that is not UTF-8 JSON at all: a malformed body, like bad JSON, is a 422.
        return JSONResponse(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            content={"detail": "the request body is not UTF-8 JSON: send the job spec as a JSON object."},
        )
    return JSONResponse(
        status_code=exc.status_code, content={"detail": _http_detail(request, exc)}, headers=exc.headers
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        content={"detail": "the service failed to handle this request; the error is in the service's log."},
    )


def register_error_handlers(app: FastAPI) -> None:
    """Install the handlers above on `app`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(JobCannotFitError, _unprocessable)
    app.add_exception_handler(IdempotencyKeyReusedError, _unprocessable)
    app.add_exception_handler(UnknownModelError, _unknown_model)
    app.add_exception_handler(ModelInputError, _model_input)
    app.add_exception_handler(JobNotFoundError, _not_found)
    app.add_exception_handler(JobStateError, _conflict)
    app.add_exception_handler(ClusterUnavailableError, _unavailable)
    app.add_exception_handler(DBAPIError, _database_unavailable)
    app.add_exception_handler(PoolTimeoutError, _database_unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
