"""The verbs of the client, each written once as a plan (see `_steps`): what to send, what to retry, how to read
the answer.

Results are the API's own response models (`service.api.models`), so a client and the service can never
disagree about a field.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from service.api.models import (
    JobPublic,
    JobsPublic,
    LayerHistoryPublic,
    LayersPublic,
    LogLine,
    LogsPublic,
    MetricsPublic,
    StudiesPublic,
    StudyPublic,
)
from service.client._errors import (
    ConnectionFailedError,
    SpecError,
    UnexpectedResponseError,
    WaitTimeoutError,
    error_from_response,
)
from service.client._retry import RetryPolicy, is_retryable_error
from service.client._sse import Event, EventDecoder
from service.client._steps import Call, Emit, Plan, ReadChunk, ReadLine, Send, Sleep
from service.spec import JobSpec, load_spec_file
from service.status import JobStatus
from service.study_spec import StudySpec, load_study_file

__all__ = [
    "SpecLike",
    "StudySpecLike",
    "cancel",
    "cancel_study",
    "delete",
    "download_model",
    "events",
    "get",
    "layer",
    "layers",
    "list_jobs",
    "logs",
    "metrics",
    "studies",
    "study",
    "submit",
    "submit_study",
    "wait",
]

logger = logging.getLogger("service.client")

M = TypeVar("M", bound=BaseModel)

#: What `submit` takes: a JobSpec, a mapping of its fields, or the path of a .json/.yaml/.yml file.
SpecLike = JobSpec | Mapping[str, Any] | str | os.PathLike

#: What `submit_study` takes: a StudySpec, a mapping of its fields, or the path of a .json/.yaml/.yml file.
StudySpecLike = StudySpec | Mapping[str, Any] | str | os.PathLike

#: Jobs per page when listing (the API allows up to 500).
LIST_PAGE = 100
#: Log lines per request (the API allows up to 10,000).
LOG_PAGE = 10_000
#: Points of each kind per metrics / layer-history request: the API's maximum.
POINTS_LIMIT = 100_000
#: Read timeout of the event stream: the service sends a keep-alive comment every 15 s while a job is quiet,
#: so this much silence means the connection is dead and the client reconnects.
STREAM_READ_TIMEOUT_S = 60.0
#: Read timeout of a cancel: the service waits up to its `cancel_wait_s` (at most 600 s) for the run to stop.
CANCEL_READ_TIMEOUT_S = 630.0


def _job_path(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job_id must be a non-empty string, the id returned by submit (got {job_id!r}).")
    return f"/v1/jobs/{quote(job_id, safe='')}"


def _describe(call: Call) -> str:
    return f"{call.method} {call.path}"


def request(call: Call, retry: RetryPolicy) -> Plan[httpx.Response]:
    """Send `call`, retrying connection errors and 503 answers; an error answer raises its `APIError`."""
    attempt = 0
    while True:
        attempt += 1
        try:
            response: httpx.Response = yield Send(call)
        except httpx.RequestError as exc:
            if attempt > retry.retries or not is_retryable_error(exc, repeatable=call.repeatable):
                tries = f" (tried {attempt} times)" if attempt > 1 else ""
                raise ConnectionFailedError(
                    f"{_describe(call)} got no answer from the service{tries}: {type(exc).__name__}: {exc}"
                ) from exc
            delay = retry.delay(attempt)
            logger.warning("%s: %s: %s; retrying in %.1f s", _describe(call), type(exc).__name__, exc, delay)
            yield Sleep(delay)
            continue
        if response.status_code == httpx.codes.SERVICE_UNAVAILABLE and attempt <= retry.retries:
            delay = retry.delay(attempt, response.headers.get("Retry-After"))
            detail = error_from_response(response).detail
            logger.warning("%s: 503 (%s); retrying in %.1f s", _describe(call), detail, delay)
            yield Sleep(delay)
            continue
        if response.is_error:
            raise error_from_response(response)
        return response


def parse(response: httpx.Response, model: type[M]) -> M:
    """The body of a successful answer as `model`; an answer the API would not send raises."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise UnexpectedResponseError(
            f"{response.request.method} {response.request.url.path} answered {response.status_code} with a body that "
            f"is not a {model.__name__} ({where}: {first['msg']}): is the base URL a syncbn service?",
            status_code=response.status_code,
            response=response,
        ) from exc


def request_model(call: Call, retry: RetryPolicy, model: type[M]) -> Plan[M]:
    """`request`, then the body parsed as `model`."""
    response = yield from request(call, retry)
    return parse(response, model)


def spec_body(spec: SpecLike) -> dict[str, Any]:
    """The JSON body for a spec: a JobSpec's fields, a mapping as given (the service validates it and names
    any bad field), or a spec file read and validated here (a bad file raises SpecError before anything is sent)."""
    if isinstance(spec, JobSpec):
        return spec.model_dump(mode="json")
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, str | os.PathLike):
        try:
            return load_spec_file(spec).model_dump(mode="json")
        except (OSError, ValueError) as exc:
            raise SpecError(f"{os.fspath(spec)}: {exc}") from exc
    raise TypeError(f"spec must be a JobSpec, a mapping or the path of a .json/.yaml file (got {type(spec).__name__}).")


def submit(spec: SpecLike, idempotency_key: str | None, retry: RetryPolicy) -> Plan[JobPublic]:
    """POST /v1/jobs with an Idempotency-Key (a fresh one when none is given): a retried POST returns the job
    the first attempt created, never a second job."""
    body = spec_body(spec)
    key = idempotency_key if idempotency_key is not None else uuid.uuid4().hex
    call = Call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, repeatable=True)
    return (yield from request_model(call, retry, JobPublic))


def get(job_id: str, retry: RetryPolicy) -> Plan[JobPublic]:
    """GET /v1/jobs/{id}."""
    return (yield from request_model(Call("GET", _job_path(job_id), repeatable=True), retry, JobPublic))


def list_jobs(status: JobStatus | str | None, page_size: int, retry: RetryPolicy) -> Plan[None]:
    """Emit every job (newest first), page after page; a job seen on an earlier page is not emitted twice
    (new submissions shift the pages while they are read)."""
    if status is not None:
        try:
            status = JobStatus(status)
        except ValueError:
            known = ", ".join(s.value for s in JobStatus)
            raise ValueError(f"status must be one of {known} (got {status!r}).") from None
    if not 1 <= page_size <= 500:
        raise ValueError(f"page_size must be between 1 and 500 (got {page_size}).")
    seen: set[str] = set()
    offset = 0
    while True:
        params = {"status": status.value if status else None, "offset": offset, "limit": page_size}
        page = yield from request_model(Call("GET", "/v1/jobs", params=params, repeatable=True), retry, JobsPublic)
        for job in page.data:
            if job.id not in seen:
                seen.add(job.id)
                yield Emit(job)
        offset += len(page.data)
        if not page.data or offset >= page.count:
            return None


def wait(job_id: str, timeout: float | None, poll: float, retry: RetryPolicy) -> Plan[JobPublic]:
    """Poll the job every `poll` seconds until it is succeeded, failed or cancelled."""
    if poll <= 0:
        raise ValueError(f"poll must be > 0 seconds (got {poll}).")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = yield from get(job_id, retry)
        if job.status.is_terminal:
            return job
        pause = poll
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(f"job {job_id} is still {job.status.value} after {timeout:g} s.", job=job)
            pause = min(poll, remaining)
        yield Sleep(pause)


def cancel(job_id: str, retry: RetryPolicy) -> Plan[JobPublic]:
    """POST /v1/jobs/{id}/cancel: the job once cancelled, or still stopping (202) after the service's wait."""
    call = Call("POST", f"{_job_path(job_id)}/cancel", read_timeout=CANCEL_READ_TIMEOUT_S)
    return (yield from request_model(call, retry, JobPublic))


def delete(job_id: str, retry: RetryPolicy) -> Plan[None]:
    """DELETE /v1/jobs/{id} (a finished job and everything it recorded)."""
    yield from request(Call("DELETE", _job_path(job_id)), retry)
    return None


def metrics(job_id: str, since_step: int | None, retry: RetryPolicy) -> Plan[MetricsPublic]:
    """GET /v1/jobs/{id}/metrics: step and epoch points after `since_step` (up to POINTS_LIMIT of each)."""
    params = {"since_step": since_step, "limit": POINTS_LIMIT}
    call = Call("GET", f"{_job_path(job_id)}/metrics", params=params, repeatable=True)
    return (yield from request_model(call, retry, MetricsPublic))


def layers(job_id: str, step: int | None, channels: bool, retry: RetryPolicy) -> Plan[LayersPublic]:
    """GET /v1/jobs/{id}/layers: every layer's statistics at `step` (default: the latest recorded step)."""
    params = {"step": step, "channels": str(channels).lower()}
    call = Call("GET", f"{_job_path(job_id)}/layers", params=params, repeatable=True)
    return (yield from request_model(call, retry, LayersPublic))


def layer(
    job_id: str, name: str, channels: bool, retry: RetryPolicy, max_points: int | None = None
) -> Plan[LayerHistoryPublic]:
    """GET /v1/jobs/{id}/layers/{name}: one layer's statistics over the run, downsampled to `max_points` (the
    service's default when None)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a layer's module path such as 'layer1.0.bn1' (got {name!r}).")
    params = {"limit": POINTS_LIMIT, "channels": str(channels).lower(), "max_points": max_points}
    call = Call("GET", f"{_job_path(job_id)}/layers/{quote(name, safe='')}", params=params, repeatable=True)
    return (yield from request_model(call, retry, LayerHistoryPublic))


def events(
    job_id: str,
    last_event_id: int | None,
    retry: RetryPolicy,
    select: Callable[[Event], Any] = lambda event: event,
) -> Plan[None]:
    """Emit `select(event)` for each event of the job's stream (None results are skipped) until the job ends.

    When the connection drops, or the service ends the stream while the job still runs (it is shutting
    down), reconnect with `Last-Event-ID` set to the last id received: the service replays from its database,
    so nothing is missed or repeated. Gives up after `retry.retries` attempts in a row without an event.
    """
    return (yield from _stream(f"{_job_path(job_id)}/events", last_event_id, retry, select, _job_ended(job_id, retry)))


def _job_ended(job_id: str, retry: RetryPolicy) -> Callable[[], Plan[str | None]]:
    """After a stream ended cleanly: None when the job ended (the stream is over), else why it must resume."""

    def check() -> Plan[str | None]:
        job = yield from get(job_id, retry)
        if job.status.is_terminal:
            return None
        return f"the service ended the stream of job {job_id} while the job is {job.status.value}"

    return check


def _stream(
    path: str,
    last_event_id: int | str | None,
    retry: RetryPolicy,
    select: Callable[[Event], Any],
    ended: Callable[[], Plan[str | None]],
) -> Plan[None]:
    """Emit `select(event)` for the events of the stream at `path`, reconnecting with `Last-Event-ID` after a cut
    or an early end (`ended()` says whether the stream's subject is over) until `retry.retries` failures in a row."""
    cursor = last_event_id
    failures = 0
    while True:
        headers = {"Last-Event-ID": str(cursor)} if cursor is not None else None
        call = Call("GET", path, headers=headers, stream=True, read_timeout=STREAM_READ_TIMEOUT_S, repeatable=True)
        yield from request(call, retry)
        decoder = EventDecoder()
        try:
            while True:
                line = yield ReadLine()
                if line is None:
                    break
                event = decoder.feed(line)
                if event is None:
                    continue
                failures = 0
                if event.id is not None:
                    cursor = event.id
                selected = select(event)
                if selected is not None:
                    yield Emit(selected)
        except httpx.RequestError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            early = yield from ended()
            if early is None:
                return None
            reason = early
        failures += 1
        if failures > retry.retries:
            raise ConnectionFailedError(
                f"the event stream {path} was cut {failures} times in a row without an event ({reason})."
            )
        delay = retry.delay(failures)
        logger.warning(
            "connection lost: %s; reconnecting after event %s in %.1f s", reason, cursor if cursor else 0, delay
        )
        yield Sleep(delay)


def _log_line(event: Event) -> LogLine | None:
    """The log line a `log` event announces (its event id is the line's seq); None for other events."""
    if event.type != "log" or event.id is None or not isinstance(event.data, dict):
        return None
    line = LogLine.model_validate({**event.data, "seq": event.id, "created_at": event.data.get("at")})
    if line.created_at.tzinfo is None:
        line.created_at = line.created_at.replace(tzinfo=timezone.utc)
    return line


def logs(job_id: str, follow: bool, retry: RetryPolicy) -> Plan[None]:
    """Emit the job's log lines, oldest first; with `follow`, then the new ones live until the job ends."""
    cursor = 0
    while True:
        params = {"after": cursor, "limit": LOG_PAGE}
        call = Call("GET", f"{_job_path(job_id)}/logs", params=params, repeatable=True)
        page = yield from request_model(call, retry, LogsPublic)
        for line in page.data:
            cursor = line.seq
            yield Emit(line)
        if len(page.data) < LOG_PAGE:
            break
    if follow:
        # A log line's seq is its event id: the stream resumes right after the last line read.
        yield from events(job_id, cursor, retry, select=_log_line)
    return None


def download_model(job_id: str, path: str | os.PathLike, retry: RetryPolicy) -> Plan[Path]:
    """Stream GET /v1/jobs/{id}/model into `path` (through `<path>.part`, renamed once complete, so `path`
    never holds half a file); a connection lost mid-way starts the download again."""
    target = Path(path)
    partial = target.with_name(target.name + ".part")
    call = Call("GET", f"{_job_path(job_id)}/model", stream=True, repeatable=True)
    attempt = 0
    try:
        while True:
            attempt += 1
            yield from request(call, retry)
            try:
                with partial.open("wb") as out:
                    while True:
                        chunk = yield ReadChunk()
                        if chunk is None:
                            break
                        out.write(chunk)
            except httpx.RequestError as exc:
                if attempt > retry.retries:
                    raise ConnectionFailedError(
                        f"the download of job {job_id}'s model was cut {attempt} times: {type(exc).__name__}: {exc}"
                    ) from exc
                yield Sleep(retry.delay(attempt))
                continue
            partial.replace(target)
            return target
    finally:
        partial.unlink(missing_ok=True)


# -- studies -----------------------------------------------------------------------------------------------


def _study_path(study_id: str) -> str:
    if not isinstance(study_id, str) or not study_id:
        raise ValueError(f"study_id must be a non-empty string, the id returned by submit_study (got {study_id!r}).")
    return f"/v1/studies/{quote(study_id, safe='')}"


def study_body(spec: StudySpecLike) -> dict[str, Any]:
    """The JSON body for a study spec (as `spec_body` for a job spec)."""
    if isinstance(spec, StudySpec):
        return spec.model_dump(mode="json")
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, str | os.PathLike):
        try:
            return load_study_file(spec).model_dump(mode="json")
        except (OSError, ValueError) as exc:
            raise SpecError(f"{os.fspath(spec)}: {exc}") from exc
    raise TypeError(
        f"spec must be a StudySpec, a mapping or the path of a .json/.yaml file (got {type(spec).__name__})."
    )


def submit_study(spec: StudySpecLike, retry: RetryPolicy) -> Plan[StudyPublic]:
    """POST /v1/studies: every trial is queued at once (an answer lost in transit is not retried: the POST would
    queue a second study)."""
    call = Call("POST", "/v1/studies", json=study_body(spec))
    return (yield from request_model(call, retry, StudyPublic))


def study(study_id: str, retry: RetryPolicy) -> Plan[StudyPublic]:
    """GET /v1/studies/{id}: trials, status and verdict as of now."""
    return (yield from request_model(Call("GET", _study_path(study_id), repeatable=True), retry, StudyPublic))


def studies(page_size: int, retry: RetryPolicy) -> Plan[None]:
    """Emit every study (newest first), page after page, each once."""
    if not 1 <= page_size <= 100:
        raise ValueError(f"page_size must be between 1 and 100 (got {page_size}).")
    seen: set[str] = set()
    offset = 0
    while True:
        params = {"offset": offset, "limit": page_size}
        call = Call("GET", "/v1/studies", params=params, repeatable=True)
        page = yield from request_model(call, retry, StudiesPublic)
        for item in page.data:
            if item.id not in seen:
                seen.add(item.id)
                yield Emit(item)
        offset += len(page.data)
        if not page.data or offset >= page.count:
            return None


def study_events(study_id: str, last_event_id: str | None, retry: RetryPolicy) -> Plan[None]:
    """Emit the study's events (`study`: the whole study with its verdict; `trial`: a trial's transition, its id a
    dotted cursor) until every trial ended, resuming after a cut with `Last-Event-ID` like a job's stream."""

    def ended() -> Plan[str | None]:
        current = yield from study(study_id, retry)
        if all(trial.status.is_terminal for trial in current.trials):
            return None
        return f"the service ended the stream of study {study_id} while it is {current.status}"

    return (yield from _stream(f"{_study_path(study_id)}/events", last_event_id, retry, lambda event: event, ended))


def cancel_study(study_id: str, retry: RetryPolicy) -> Plan[StudyPublic]:
    """DELETE /v1/studies/{id}: cancels the queued and running trials, keeps the finished ones."""
    call = Call("DELETE", _study_path(study_id), read_timeout=CANCEL_READ_TIMEOUT_S, repeatable=True)
    return (yield from request_model(call, retry, StudyPublic))
