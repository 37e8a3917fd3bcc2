"""`Client`: the synchronous client of the syncbn service (httpx.Client underneath)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from service.api.models import JobPublic, LayerHistoryPublic, LayersPublic, LogLine, MetricsPublic, StudyPublic
from service.client import _plans
from service.client._retry import RetryPolicy
from service.client._sse import Event
from service.client._steps import Emit, Plan, PlanRunner, ReadChunk, ReadLine, Send, Sleep, Step, build_request
from service.status import JobStatus

__all__ = ["Client", "default_headers"]

T = TypeVar("T")

#: Seconds each request may take by default (connect, read, write and pool), as in httpx.
DEFAULT_TIMEOUT_S = 30.0


def default_headers(token: str | None) -> dict[str, str]:
    """The headers every request carries: who is calling and, when given, the bearer token."""
    headers = {"User-Agent": "syncbn-client", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


class _Stream:
    """The one streamed response a plan may have open (an event stream or a model download)."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        self._lines: Iterator[str] | None = None
        self._chunks: Iterator[bytes] | None = None

    def open(self, response: httpx.Response) -> None:
        self.response, self._lines, self._chunks = response, None, None

    def next_line(self) -> str | None:
        if self._lines is None:
            self._lines = self._require().iter_lines()
        return next(self._lines, None)

    def next_chunk(self) -> bytes | None:
        if self._chunks is None:
            self._chunks = self._require().iter_bytes()
        return next(self._chunks, None)

    def _require(self) -> httpx.Response:
        if self.response is None:
            raise RuntimeError("a plan read from a stream without opening one")
        return self.response

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
        self.response = None


class Client:
    """A client of the syncbn REST service, shaped like `httpx.Client` (a context manager with explicit
    timeouts) with the verbs of Ray's `JobSubmissionClient`.

    - Results are the API's own pydantic models (`JobPublic`, `MetricsPublic`, ...).
    - Errors are `ClientError`s carrying `status_code`, the service's sentence (`detail`) and the response.
    - Connection errors and 503 answers are retried with backoff (`retry`); nothing else is. `submit` sends an
      Idempotency-Key (a fresh one per call when none is given), so a retried POST never creates two jobs.

    Args:
        base_url: the service, e.g. "http://127.0.0.1:8000".
        token: bearer token, when the service has api_tokens. Default: none.
        timeout: seconds per request (a number, or an `httpx.Timeout`). Default 30. The event stream and
            cancel use longer read timeouts (see `events` and `cancel`).
        retry: the retry policy. Default `RetryPolicy()`: 5 retries over 8-16 s.

    Example:
        with Client("http://127.0.0.1:8000") as client:
            job = client.submit("deploy/examples/digits-cpu.json")
            for event in client.events(job.id):
                print(event.type, event.data)
            client.download_model(job.id, "model.pt")
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
        self._http = httpx.Client(base_url=base_url, headers=default_headers(token), timeout=timeout)

    @property
    def base_url(self) -> httpx.URL:
        """The service's base URL."""
        return self._http.base_url

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # -- the verbs -------------------------------------------------------------------------------------------

    def submit(self, spec: _plans.SpecLike, idempotency_key: str | None = None) -> JobPublic:
        """Submit a job: `spec` is a JobSpec, a dict of its fields or the path of a .json/.yaml file.

        Submitting again with the same `idempotency_key` returns the job created the first time.
        Raises `SpecError` for a spec file that cannot be read or does not validate (nothing is sent),
        `InvalidRequestError` (422) when the service refuses the spec, with its sentence naming the field.
        """
        return self._run(_plans.submit(spec, idempotency_key, self.retry))

    def get(self, job_id: str) -> JobPublic:
        """The job: status, timestamps, error, summary. `NotFoundError` when there is none."""
        return self._run(_plans.get(job_id, self.retry))

    def list(self, status: JobStatus | str | None = None, *, page_size: int = _plans.LIST_PAGE) -> Iterator[JobPublic]:
        """Every job (only those in `status`, when given), newest first, reading page after page."""
        return self._iterate(_plans.list_jobs(status, page_size, self.retry))

    def wait(self, job_id: str, timeout: float | None = None, *, poll: float = 1.0) -> JobPublic:
        """Poll every `poll` seconds until the job succeeded, failed or was cancelled; return it.
        `WaitTimeoutError` (with the job as last seen) after `timeout` seconds, if given."""
        return self._run(_plans.wait(job_id, timeout, poll, self.retry))

    def cancel(self, job_id: str) -> JobPublic:
        """Cancel a queued or running job; returns it cancelled, or still stopping if its run did not stop
        within the service's `cancel_wait_s`. `ConflictError` when the job already ended."""
        return self._run(_plans.cancel(job_id, self.retry))

    def delete(self, job_id: str) -> None:
        """Delete a finished job and everything it recorded. `ConflictError` while it is queued or running."""
        self._run(_plans.delete(job_id, self.retry))

    def metrics(self, job_id: str, since_step: int | None = None) -> MetricsPublic:
        """Step and epoch points (those after `since_step`, when given: poll with the last step you have)."""
        return self._run(_plans.metrics(job_id, since_step, self.retry))

    def layers(self, job_id: str, step: int | None = None, *, channels: bool = True) -> LayersPublic:
        """Every BatchNorm layer's statistics at the kept snapshot nearest to `step` (default: the latest recorded
        one; the answer's `step` says which, `requested_step` what was asked); `channels=False` leaves out the
        per-channel lists."""
        return self._run(_plans.layers(job_id, step, channels, self.retry))

    def layer(
        self, job_id: str, name: str, *, channels: bool = True, max_points: int | None = None
    ) -> LayerHistoryPublic:
        """One layer's statistics over the run (`name` is its module path, e.g. 'layer1.0.bn1'), downsampled
        evenly to `max_points` (default: the service's, 500)."""
        return self._run(_plans.layer(job_id, name, channels, self.retry, max_points))

    def events(self, job_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """The job's events (`Event(id, type, data)`), live, until the job ends.

        Starts after `last_event_id` when given. A dropped connection is resumed by itself with
        `Last-Event-ID`, so no event is missed or repeated; `ConnectionFailedError` after `retry.retries`
        failed reconnections in a row.
        """
        return self._iterate(_plans.events(job_id, last_event_id, self.retry))

    def logs(self, job_id: str, follow: bool = False) -> Iterator[LogLine]:
        """The job's log lines, oldest first; with `follow`, then new lines live until the job ends."""
        return self._iterate(_plans.logs(job_id, follow, self.retry))

    def download_model(self, job_id: str, path: str | os.PathLike) -> Path:
        """Save the final model of a succeeded job (a plain-BatchNorm state dict for `torch.load(...,
        weights_only=True)`) to `path`; returns it. `ConflictError` when the job has not succeeded."""
        return self._run(_plans.download_model(job_id, path, self.retry))

    # -- studies ---------------------------------------------------------------------------------------------

    def submit_study(self, spec: _plans.StudySpecLike) -> StudyPublic:
        """Submit a study (a StudySpec, a dict, or a .json/.yaml path): its trials are queued as jobs at once.
        Not retried after the request was sent (that could queue a second study)."""
        return self._run(_plans.submit_study(spec, self.retry))

    def study(self, study_id: str) -> StudyPublic:
        """A study: its trials, derived status and verdict (null until two seeds of two arms succeeded)."""
        return self._run(_plans.study(study_id, self.retry))

    def studies(self, *, page_size: int = 20) -> Iterator[StudyPublic]:
        """Every study you can see, newest first (fetched page by page as you iterate)."""
        return self._iterate(_plans.studies(page_size, self.retry))

    def study_events(self, study_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The study's events, live, until every trial ended: `study` (the study with its verdict, when the stream
        opens and after each trial that ends) and `trial` (a trial's transition: job_id, arm, seed, status).

        Starts after `last_event_id` (a `trial` event's dotted id) when given; a dropped connection is resumed
        by itself, as for `events`.
        """
        return self._iterate(_plans.study_events(study_id, last_event_id, self.retry))

    def cancel_study(self, study_id: str) -> StudyPublic:
        """Cancel a study's queued and running trials (finished ones are kept); the study reads `cancelled`."""
        return self._run(_plans.cancel_study(study_id, self.retry))

    # -- taking the plans' steps ---------------------------------------------------------------------------

    def _run(self, plan: Plan[T]) -> T:
        runner = PlanRunner(plan)
        for _ in self._drive(runner):
            raise RuntimeError("a verb that returns a value emitted one")
        return runner.value  # type: ignore[return-value]

    def _iterate(self, plan: Plan[None]) -> Iterator[Any]:
        return self._drive(PlanRunner(plan))

    def _drive(self, runner: PlanRunner[Any]) -> Iterator[Any]:
        stream = _Stream()
        try:
            step = runner.advance()
            while step is not None:
                if isinstance(step, Emit):
                    yield step.value
                    step = runner.advance()
                    continue
                try:
                    result = self._take(step, stream)
                except httpx.RequestError as exc:
                    error: httpx.RequestError | None = exc
                else:
                    error = None
                step = runner.advance(error=error) if error is not None else runner.advance(result)
        finally:
            stream.close()
            runner.close()

    def _take(self, step: Step, stream: _Stream) -> Any:
        if isinstance(step, Send):
            stream.close()
            response = self._http.send(build_request(self._http, step.call), stream=step.call.stream)
            if step.call.stream:
                if response.is_error:  # read the error body for the exception, then let the stream go
                    try:
                        response.read()
                    finally:
                        response.close()
                else:
                    stream.open(response)
            return response
        if isinstance(step, ReadLine):
            return stream.next_line()
        if isinstance(step, ReadChunk):
            return stream.next_chunk()
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        raise TypeError(f"unknown step {step!r}")
