"""The steps a verb of the client asks its driver to take, and the runner that hands the results back.

Every verb is written once, as a generator (a "plan", see `_plans`) that yields steps and receives their results:

- `Send(call)`: send this request; the result is the `httpx.Response` (its body read, unless `call.stream`);
- `ReadLine()` / `ReadChunk()`: the next line / chunk of bytes of the open streamed response, None at its end;
- `Sleep(seconds)`: wait;
- `Emit(value)`: hand `value` to the caller (verbs that return iterators).

An `httpx.RequestError` raised while taking a step is thrown into the plan at that step, so retries live in the
plan. `Client` takes the steps with `httpx.Client` and `time.sleep`, `AsyncClient` with `httpx.AsyncClient`
and `asyncio.sleep`: building requests, retrying, mapping errors, paging, polling and resuming the event stream
exist once; the two clients only do the I/O.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

__all__ = ["Call", "Emit", "Plan", "PlanRunner", "ReadChunk", "ReadLine", "Send", "Sleep", "Step", "build_request"]

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One HTTP request of a verb.

    Attributes:
        method, path: the request line; `path` is relative to the client's base URL.
        params: query parameters (None values are left out).
        json: the JSON body, if any.
        headers: headers beside the client's own (Authorization, User-Agent).
        stream: leave the body unread so the plan reads it line by line or chunk by chunk.
        read_timeout: seconds to wait for each read, when the client's default does not fit (None: default).
        repeatable: sending it twice does no harm (GET; a POST with an Idempotency-Key), so it is retried
            even when the connection was lost after it was sent.
    """

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    stream: bool = False
    read_timeout: float | None = None
    repeatable: bool = False


@dataclass(frozen=True)
class Send:
    """Send `call`; the result is its `httpx.Response`."""

    call: Call


@dataclass(frozen=True)
class ReadLine:
    """The next line of the open streamed response (without its line ending), or None at its end."""


@dataclass(frozen=True)
class ReadChunk:
    """The next chunk of bytes of the open streamed response, or None at its end."""


@dataclass(frozen=True)
class Sleep:
    """Wait `seconds`."""

    seconds: float


@dataclass(frozen=True)
class Emit:
    """Hand `value` to the caller of an iterating verb."""

    value: Any


Step = Send | ReadLine | ReadChunk | Sleep | Emit
#: A verb: yields steps, receives their results, returns the verb's result.
Plan = Generator[Step, Any, T]


class PlanRunner(Generic[T]):
    """Advances a plan with the result of each step, or throws the step's error into it; keeps its result."""

    def __init__(self, plan: Plan[T]) -> None:
        self._plan = plan
        self.value: T | None = None

    def advance(self, result: Any = None, error: BaseException | None = None) -> Step | None:
        """The plan's next step, given the last step's result (or error); None once the plan has returned."""
        try:
            if error is not None:
                return self._plan.throw(error)
            return self._plan.send(result)
        except StopIteration as stop:
            self.value = stop.value
            return None

    def close(self) -> None:
        """Stop the plan where it is (the caller stopped iterating)."""
        self._plan.close()


def build_request(http: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
    """The `httpx.Request` for `call` on `http` (its base URL, headers and timeout)."""
    timeout = http.timeout
    if call.read_timeout is not None:
        timeout = httpx.Timeout(connect=timeout.connect, read=call.read_timeout, write=timeout.write, pool=timeout.pool)
    params = {key: value for key, value in (call.params or {}).items() if value is not None}
    return http.build_request(
        call.method, call.path, params=params, json=call.json, headers=call.headers, timeout=timeout
    )
