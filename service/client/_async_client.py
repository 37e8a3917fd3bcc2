"""`AsyncClient`: the asyncio twin of `Client` (httpx.AsyncClient underneath).

Same verbs, same results, same errors and retries: both clients take the steps of the same plans
(`_plans`); only the I/O differs here. Iterating verbs (`list`, `events`, `logs`) return async iterators;
break out of one with `contextlib.aclosing` to close its stream at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from service.api.models import JobPublic, LayerHistoryPublic, LayersPublic, LogLine, MetricsPublic, StudyPublic
from service.client import _plans
from service.client._client import DEFAULT_TIMEOUT_S, default_headers
from service.client._retry import RetryPolicy
from service.client._sse import Event
from service.client._steps import Emit, Plan, PlanRunner, ReadChunk, ReadLine, Send, Sleep, Step, build_request
from service.status import JobStatus

__all__ = ["AsyncClient"]

T = TypeVar("T")


class _AsyncStream:
    """The one streamed response a plan may have open."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._chunks: AsyncIterator[bytes] | None = None

    def open(self, response: httpx.Response) -> None:
        self.response, self._lines, self._chunks = response, None, None

    async def next_line(self) -> str | None:
        if self._lines is None:
            self._lines = self._require().aiter_lines()
        return await anext(self._lines, None)

    async def next_chunk(self) -> bytes | None:
        if self._chunks is None:
            self._chunks = self._require().aiter_bytes()
        return await anext(self._chunks, None)

    def _require(self) -> httpx.Response:
        if self.response is None:
            raise RuntimeError("a plan read from a stream without opening one")
        return self.response

    async def close(self) -> None:
        if self.response is not None:
            await self.response.aclose()
        self.response = None


class AsyncClient:
    """The asyncio twin of `Client`: the same arguments, verbs, results and errors, awaited.

    Example:
        async with AsyncClient("http://127.0.0.1:8000") as client:
            job = await client.submit({"model": "small_resnet", "dataset": {"kind": "digits"}})
            async for event in client.events(job.id):
                ...
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=base_url, headers=default_headers(token), timeout=timeout)

    @property
    def base_url(self) -> httpx.URL:
        """The service's base URL."""
        return self._http.base_url

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the verbs (see Client for each one's contract) ------------------------------------------------------

    async def submit(self, spec: _plans.SpecLike, idempotency_key: str | None = None) -> JobPublic:
        """`Client.submit`, awaited."""
        return await self._run(_plans.submit(spec, idempotency_key, self.retry))

    async def get(self, job_id: str) -> JobPublic:
        """`Client.get`, awaited."""
        return await self._run(_plans.get(job_id, self.retry))

    def list(
        self, status: JobStatus | str | None = None, *, page_size: int = _plans.LIST_PAGE
    ) -> AsyncIterator[JobPublic]:
        """`Client.list`, as an async iterator."""
        return self._drive(PlanRunner(_plans.list_jobs(status, page_size, self.retry)))

    async def wait(self, job_id: str, timeout: float | None = None, *, poll: float = 1.0) -> JobPublic:
        """`Client.wait`, awaited."""
        return await self._run(_plans.wait(job_id, timeout, poll, self.retry))

    async def cancel(self, job_id: str) -> JobPublic:
        """`Client.cancel`, awaited."""
        return await self._run(_plans.cancel(job_id, self.retry))

    async def delete(self, job_id: str) -> None:
        """`Client.delete`, awaited."""
        await self._run(_plans.delete(job_id, self.retry))

    async def metrics(self, job_id: str, since_step: int | None = None) -> MetricsPublic:
        """`Client.metrics`, awaited."""
        return await self._run(_plans.metrics(job_id, since_step, self.retry))

    async def layers(self, job_id: str, step: int | None = None, *, channels: bool = True) -> LayersPublic:
        """`Client.layers`, awaited."""
        return await self._run(_plans.layers(job_id, step, channels, self.retry))

    async def layer(
        self, job_id: str, name: str, *, channels: bool = True, max_points: int | None = None
    ) -> LayerHistoryPublic:
        """`Client.layer`, awaited."""
        return await self._run(_plans.layer(job_id, name, channels, self.retry, max_points))

    def events(self, job_id: str, last_event_id: int | None = None) -> AsyncIterator[Event]:
        """`Client.events`, as an async iterator."""
        return self._drive(PlanRunner(_plans.events(job_id, last_event_id, self.retry)))

    def logs(self, job_id: str, follow: bool = False) -> AsyncIterator[LogLine]:
        """`Client.logs`, as an async iterator."""
        return self._drive(PlanRunner(_plans.logs(job_id, follow, self.retry)))

    async def download_model(self, job_id: str, path: str | os.PathLike) -> Path:
        """`Client.download_model`, awaited."""
        return await self._run(_plans.download_model(job_id, path, self.retry))

    async def submit_study(self, spec: _plans.StudySpecLike) -> StudyPublic:
        """`Client.submit_study`, awaited."""
        return await self._run(_plans.submit_study(spec, self.retry))

    async def study(self, study_id: str) -> StudyPublic:
        """`Client.study`, awaited."""
        return await self._run(_plans.study(study_id, self.retry))

    def studies(self, *, page_size: int = 20) -> AsyncIterator[StudyPublic]:
        """`Client.studies`, as an async iterator."""
        return self._drive(PlanRunner(_plans.studies(page_size, self.retry)))

    def study_events(self, study_id: str, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """`Client.study_events`, as an async iterator."""
        return self._drive(PlanRunner(_plans.study_events(study_id, last_event_id, self.retry)))

    async def cancel_study(self, study_id: str) -> StudyPublic:
        """`Client.cancel_study`, awaited."""
        return await self._run(_plans.cancel_study(study_id, self.retry))

    # -- taking the plans' steps ---------------------------------------------------------------------------

    async def _run(self, plan: Plan[T]) -> T:
        runner = PlanRunner(plan)
        async for _ in self._drive(runner):
            raise RuntimeError("a verb that returns a value emitted one")
        return runner.value  # type: ignore[return-value]

    async def _drive(self, runner: PlanRunner[Any]) -> AsyncIterator[Any]:
        stream = _AsyncStream()
        try:
            step = runner.advance()
            while step is not None:
                if isinstance(step, Emit):
                    yield step.value
                    step = runner.advance()
                    continue
                try:
                    result = await self._take(step, stream)
                except httpx.RequestError as exc:
                    error: httpx.RequestError | None = exc
                else:
                    error = None
                step = runner.advance(error=error) if error is not None else runner.advance(result)
        finally:
            await stream.close()
            runner.close()

    async def _take(self, step: Step, stream: _AsyncStream) -> Any:
        if isinstance(step, Send):
            await stream.close()
            response = await self._http.send(build_request(self._http, step.call), stream=step.call.stream)
            if step.call.stream:
                if response.is_error:  # read the error body for the exception, then let the stream go
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                else:
                    stream.open(response)
            return response
        if isinstance(step, ReadLine):
            return await stream.next_line()
        if isinstance(step, ReadChunk):
            return await stream.next_chunk()
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        raise TypeError(f"unknown step {step!r}")
