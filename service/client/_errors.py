"""The exceptions of the client: one hierarchy, each instance carries the HTTP status code (None when the
service gave no answer), the service's sentence and, when there was one, the response.

```
ClientError                      anything the client raises about a request (status_code, detail, response)
├── SpecError (ValueError)       the spec handed to submit() cannot be read or is not a valid JobSpec; nothing sent
├── ConnectionFailedError        no answer: connection refused, dropped or timed out (after the retries)
├── UnexpectedResponseError      an answer that is not what the API sends (wrong URL, a proxy's page)
├── WaitTimeoutError (TimeoutError)  wait() ran out of time; carries the job as last seen
└── APIError                     the service answered 4xx/5xx with its sentence
    ├── InvalidRequestError      400, 413, 422: a field is wrong; the sentence names it and the fix
    ├── AuthenticationError      401: missing or wrong bearer token
    ├── NotFoundError            404: no such job, layer or recorded step
    ├── ConflictError            409: the job's state does not allow this (cancel a finished job, ...)
    ├── ServiceUnavailableError  503 after the retries: Ray does not answer
    └── ServerError              500 and other 5xx: the service failed; the error is in its log
```
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from service.api.models import JobPublic

__all__ = [
    "APIError",
    "AuthenticationError",
    "ClientError",
    "ConflictError",
    "ConnectionFailedError",
    "InvalidRequestError",
    "NotFoundError",
    "ServerError",
    "ServiceUnavailableError",
    "SpecError",
    "UnexpectedResponseError",
    "WaitTimeoutError",
    "error_from_response",
]

#: Characters of a non-JSON error body kept as the detail.
_MAX_TEXT = 500


class ClientError(Exception):
    """Base of every error the client raises about a request.

    Attributes:
        detail: the service's sentence (or the client's, when the service gave none).
        status_code: the HTTP status of the answer, or None when there was no answer.
        response: the `httpx.Response`, or None when there was no answer.
    """

    def __init__(self, detail: str, *, status_code: int | None = None, response: httpx.Response | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code
        self.response = response

    def __str__(self) -> str:
        if self.status_code is None:
            return self.detail
        reason = self.response.reason_phrase if self.response is not None else ""
        return f"{self.status_code}{' ' + reason if reason else ''}: {self.detail}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross processes (multiprocessing, Ray tasks): everything travels but the response, whose
        # connection and stream belong to this process.
        state = {key: value for key, value in self.__dict__.items() if key != "response"}
        return (_rebuild, (type(self), state))


def _rebuild(kind: type[ClientError], state: dict[str, Any]) -> ClientError:
    """An error unpickled from `ClientError.__reduce__`'s state (its response left behind)."""
    error = kind.__new__(kind)
    Exception.__init__(error, state["detail"])
    error.__dict__.update(state)
    error.response = None
    return error


class SpecError(ClientError, ValueError):
    """The spec given to `submit` could not be read or is not a valid JobSpec (nothing was sent)."""


class ConnectionFailedError(ClientError):
    """The request got no answer: the connection was refused, dropped or timed out, after the retries."""


class UnexpectedResponseError(ClientError):
    """The answer is not what the API sends (e.g. the base URL points at another server)."""


class WaitTimeoutError(ClientError, TimeoutError):
    """`wait()` ran out of time before the job ended; `job` is the job as last seen."""

    def __init__(self, detail: str, *, job: JobPublic) -> None:
        super().__init__(detail)
        self.job = job


class APIError(ClientError):
    """The service answered with an error status; `detail` is its sentence, `errors` its per-field list (422)."""

    def __init__(
        self,
        detail: str,
        *,
        status_code: int,
        response: httpx.Response | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail, status_code=status_code, response=response)
        self.errors = errors


class InvalidRequestError(APIError):
    """400, 413 or 422: the request is invalid; the sentence names the field and the fix."""


class AuthenticationError(APIError):
    """401: the service requires a bearer token and this one is missing or wrong."""


class NotFoundError(APIError):
    """404: no such job (or layer, or recorded step)."""


class ConflictError(APIError):
    """409: the job's state does not allow the request (e.g. cancelling or deleting at the wrong time)."""


class ServiceUnavailableError(APIError):
    """503, still after the retries: the service cannot reach its Ray cluster."""


class ServerError(APIError):
    """500 or another 5xx: the service failed to handle the request (its log has the traceback)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    503: ServiceUnavailableError,
}


def _detail_and_errors(response: httpx.Response) -> tuple[str, list[dict[str, Any]] | None]:
    """The `detail` sentence and `errors` list of an error body; a short text for bodies that are not ours."""
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        errors = body.get("errors")
        return body["detail"], errors if isinstance(errors, list) else None
    text = response.text.strip()
    if not text:
        return f"the service answered {response.status_code} {response.reason_phrase} without a body.", None
    return (text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."), None


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error answer (status >= 400); the response body must have been read."""
    detail, errors = _detail_and_errors(response)
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return kind(detail, status_code=status, response=response, errors=errors)
