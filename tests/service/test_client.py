"""The Python client (`service.client`) against a real service: every verb on a real tiny job, the error
mapping (404/409/422/401 carry `status_code` and the service's sentence), the asyncio twin, and the public
surface. The service is a real uvicorn server on loopback (`LiveServer`) on the session's local Ray; the tests of
this module run in order and share one finished job.

Retries, dropped connections and the event stream's resumption are in `test_client_resilience.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

import service.client
from service.api.models import JobPublic, JobSummary, LayerHistoryPublic, LayersPublic, LogLine, MetricsPublic
from service.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    Client,
    ClientError,
    ConflictError,
    Event,
    InvalidRequestError,
    NotFoundError,
    RetryPolicy,
    SpecError,
    WaitTimeoutError,
)
from service.client._errors import error_from_response
from service.client._sse import parse_events
from service.settings import Settings
from service.spec import JobSpec
from service.status import JobStatus
from tests.service.conftest_api import LiveServer, read_events, tiny_spec

pytestmark = pytest.mark.timeout(240)

#: A digits job of 1 epoch, 4 steps, statistics every 2 steps: the shortest real run.
ONE_EPOCH = {"epochs": 1, "steps_per_epoch": 4, "stats_every": 2}


class Story:
    """What the tests of the module share: the server and the finished job."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.job: JobPublic | None = None
        self.events: list[Event] = []


@pytest.fixture(scope="module")
def story(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("client"), max_concurrent_jobs=1, cancel_wait_s=60)
    with LiveServer(settings) as server:
        yield Story(server)
        with Client(server.url) as client:  # leave no run behind in the session's Ray
            for job in client.list():
                if not job.status.is_terminal:
                    with contextlib.suppress(ConflictError):
                        client.cancel(job.id)


def test_all_is_the_public_surface() -> None:
    public = {name for name in dir(service.client) if not name.startswith("_")}
    assert set(service.client.__all__) == public
    errors = [getattr(service.client, name) for name in service.client.__all__ if name.endswith("Error")]
    assert all(issubclass(kind, ClientError) for kind in errors), "one hierarchy"


def test_errors_cross_processes_without_their_response() -> None:
    response = httpx.Response(422, json={"detail": "workers: too many.", "errors": [{"field": "workers"}]})
    error = pickle.loads(pickle.dumps(error_from_response(response)))
    assert isinstance(error, InvalidRequestError) and error.response is None
    assert (error.status_code, error.detail, error.errors) == (422, "workers: too many.", [{"field": "workers"}])
    summary = dict.fromkeys(JobSummary.model_fields, None) | {"epochs_done": 0}
    job = JobPublic.model_validate(
        {"id": "a" * 32, "name": None, "status": "queued", "spec": tiny_spec(), "created_at": "2026-01-01T00:00:00Z"}
        | dict.fromkeys(("started_at", "finished_at", "error", "queue_position"), None)
        | {"cancel_requested": False, "has_model": False, "summary": summary, "owner": "default"}
    )
    late = pickle.loads(pickle.dumps(WaitTimeoutError("still queued.", job=job)))
    assert late.job == job and late.status_code is None and str(late) == "still queued."


def test_sse_decoder_handles_comments_multiline_data_and_ids() -> None:
    lines = [": ping", "retry: 2000", "", "id: 1", "event: status", 'data: {"status":', 'data: "queued"}', ""]
    lines += ["event: log", "data: not json", "", "id: x", "data: 3", "", "id: 9", "data: cut off"]
    assert list(parse_events(lines)) == [
        Event(1, "status", {"status": "queued"}),
        Event(None, "log", "not json"),
        Event(None, "message", 3),
    ], "an event the stream ends in the middle of is not dispatched"


def test_retry_policy_backs_off_and_honours_retry_after() -> None:
    policy = RetryPolicy(retries=3, backoff_s=1.0, max_backoff_s=4.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]
    assert policy.delay(1, "3") == 3.0 and policy.delay(1, "60") == 4.0
    jittered = RetryPolicy(backoff_s=1.0, jitter=0.5)
    assert all(0.5 <= jittered.delay(1) <= 1.0 for _ in range(50))
    with pytest.raises(ValueError, match="retries must be >= 0"):
        RetryPolicy(retries=-1)


def test_errors_carry_the_status_code_and_the_services_sentence(story: Story, tmp_path: Path) -> None:
    with Client(story.server.url) as client:
        with pytest.raises(NotFoundError) as missing:
            client.get("0" * 32)
        assert missing.value.status_code == 404 and "0" * 32 in missing.value.detail
        assert missing.value.response is not None and missing.value.response.status_code == 404
        assert str(missing.value).startswith("404 Not Found: ")

        with pytest.raises(InvalidRequestError) as invalid:
            client.submit(tiny_spec(workers=0))
        assert invalid.value.status_code == 422 and "workers" in invalid.value.detail
        assert invalid.value.errors and invalid.value.errors[0]["field"] == "workers"

        with pytest.raises(InvalidRequestError) as too_big:
            client.submit(tiny_spec(workers=16))
        assert too_big.value.status_code == 422 and "16" in too_big.value.detail

        bad_file = tmp_path / "bad.yaml"
        bad_file.write_text(yaml.safe_dump(tiny_spec(workers=0)))
        with pytest.raises(SpecError, match="workers") as spec_error:
            client.submit(bad_file)
        assert spec_error.value.status_code is None and isinstance(spec_error.value, ValueError)
        with pytest.raises(SpecError, match=r"missing\.json"):
            client.submit(tmp_path / "missing.json")
        with pytest.raises(ValueError, match="status must be one of queued"):
            list(client.list(status="done"))
        assert not any(True for _ in client.list()), "none of the refused specs became a job"


def test_a_job_through_every_verb(story: Story, tmp_path: Path) -> None:
    from service.engine.model_registry import build_model

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(name="every-verb", workers=1, **ONE_EPOCH)))
    with Client(story.server.url) as client, story.server.client() as raw:
        submitted = client.submit(spec_file, idempotency_key="every-verb-1")
        assert isinstance(submitted, JobPublic) and submitted.name == "every-verb"
        assert submitted.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        again = client.submit(tiny_spec(name="every-verb", workers=1, **ONE_EPOCH), idempotency_key="every-verb-1")
        assert again.id == submitted.id, "the same Idempotency-Key returns the first job"

        live_lines = list(client.logs(submitted.id, follow=True))  # follows the run live until it ends
        events = list(client.events(submitted.id))
        truth = read_events(raw, submitted.id)
        assert [(e.id, e.type, e.data) for e in events] == [(e["id"], e["event"], e["data"]) for e in truth]
        assert [e.data["status"] for e in events if e.type == "status"] == ["queued", "running", "succeeded"]
        later = list(client.events(submitted.id, last_event_id=events[2].id))
        assert later == events[3:], "last_event_id resumes after that event"

        job = client.wait(submitted.id, timeout=30)
        assert job.status is JobStatus.SUCCEEDED and job.has_model and job.summary.epochs_done == 1
        assert client.get(job.id) == job == JobPublic.model_validate(raw.get(f"/v1/jobs/{job.id}").json())
        assert [j.id for j in client.list(status="succeeded")] == [job.id]
        assert [j.id for j in client.list(JobStatus.QUEUED)] == []

        metrics = client.metrics(job.id)
        assert isinstance(metrics, MetricsPublic)
        assert metrics == MetricsPublic.model_validate(raw.get(f"/v1/jobs/{job.id}/metrics").json())
        assert [p.step for p in metrics.steps] == [2, 4] and [p.epoch for p in metrics.epochs] == [1]
        assert [p.step for p in client.metrics(job.id, since_step=2).steps] == [4]
        with pytest.raises(InvalidRequestError) as bad_query:
            client.metrics(job.id, since_step=2**60)
        assert bad_query.value.status_code == 422 and "since_step" in bad_query.value.detail

        latest = client.layers(job.id)
        assert isinstance(latest, LayersPublic) and latest.step == 4 and latest.recorded_steps == [2, 4]
        first = client.layers(job.id, step=2)
        assert first.step == 2 and set(first.layers) == set(latest.layers)
        assert "mean" not in next(iter(client.layers(job.id, channels=False).layers.values()))
        nearest = client.layers(job.id, step=3)  # not recorded: the nearest kept snapshot answers, and says so
        assert nearest.requested_step == 3 and nearest.step in (2, 4)
        name = next(iter(latest.layers))
        history = client.layer(job.id, name)
        assert isinstance(history, LayerHistoryPublic) and [p.step for p in history.points] == [2, 4]
        assert len(client.layer(job.id, name, max_points=1).points) == 1
        with pytest.raises(NotFoundError, match="no statistics for layer 'nope'"):
            client.layer(job.id, "nope")

        lines = list(client.logs(job.id))
        assert lines and all(isinstance(line, LogLine) for line in lines)
        assert [line.model_dump(mode="json") for line in lines] == raw.get(f"/v1/jobs/{job.id}/logs").json()["data"]
        assert live_lines == lines, "the lines followed live are the stored lines"
        assert list(client.logs(job.id, follow=True)) == lines, "a finished job: follow ends with the last line"
        log_events = [(e.id, e.data["message"]) for e in events if e.type == "log"]
        assert [(line.seq, line.message) for line in lines] == log_events

        path = client.download_model(job.id, tmp_path / "model.pt")
        assert path == tmp_path / "model.pt" and not (tmp_path / "model.pt.part").exists()
        model = build_model("small_resnet", (1, 8, 8), 10)
        model.load_state_dict(torch.load(path, weights_only=True), strict=True)
        assert path.read_bytes() == raw.get(f"/v1/jobs/{job.id}/model").content
    story.job, story.events = job, events


def test_wait_cancel_and_delete(story: Story) -> None:
    assert story.job is not None, "needs the finished job of test_a_job_through_every_verb"
    with Client(story.server.url) as client:
        long = client.submit(JobSpec.model_validate(tiny_spec(name="long", epochs=50, steps_per_epoch=40)))
        with pytest.raises(WaitTimeoutError) as timeout:
            client.wait(long.id, timeout=0.3, poll=0.1)
        assert timeout.value.job.id == long.id and not timeout.value.job.status.is_terminal
        assert isinstance(timeout.value, TimeoutError) and "after 0.3 s" in str(timeout.value)

        with pytest.raises(ConflictError) as running:
            client.delete(long.id)
        assert running.value.status_code == 409 and long.id in running.value.detail
        cancelled = client.cancel(long.id)
        assert cancelled.status is JobStatus.CANCELLED
        with pytest.raises(ConflictError) as again:
            client.cancel(long.id)
        assert again.value.status_code == 409 and "cancelled" in again.value.detail
        with pytest.raises(ConflictError, match="only once a job has succeeded"):
            client.download_model(long.id, "never-written.pt")
        assert not Path("never-written.pt").exists() and not Path("never-written.pt.part").exists()

        client.delete(long.id)
        with pytest.raises(NotFoundError):
            client.get(long.id)
        with pytest.raises(NotFoundError):
            client.delete(long.id)
        assert [j.id for j in client.list()] == [story.job.id]


def test_the_async_client_is_the_same_client(story: Story, tmp_path: Path) -> None:
    assert story.job is not None, "needs the finished job of test_a_job_through_every_verb"
    done = story.job

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(story.server.url, timeout=30) as client:
            queued = await client.submit(tiny_spec(name="async", epochs=50, steps_per_epoch=40))
            cancelled = await client.cancel(queued.id)
            events = [event async for event in client.events(queued.id)]
            try:
                await client.get("f" * 32)
            except APIError as exc:
                missing: APIError | None = exc
            else:
                missing = None
            return {
                "cancelled": cancelled,
                "events": events,
                "jobs": [job.id async for job in client.list()],
                "job": await client.get(done.id),
                "metrics": await client.metrics(done.id),
                "layers": await client.layers(done.id, step=2),
                "layer": await client.layer(done.id, next(iter((await client.layers(done.id)).layers))),
                "logs": [line async for line in client.logs(done.id, follow=True)],
                "waited": await client.wait(done.id),
                "model": await client.download_model(done.id, tmp_path / "async.pt"),
                "missing": missing,
                "deleted": await client.delete(queued.id),
            }

    got = asyncio.run(scenario())
    assert got["cancelled"].status is JobStatus.CANCELLED
    assert [e.data["status"] for e in got["events"] if e.type == "status"][-1] == "cancelled"
    assert got["jobs"][1] == done.id and len(got["jobs"]) == 2
    with Client(story.server.url) as client:
        assert got["job"] == got["waited"] == client.get(done.id)
        assert got["metrics"] == client.metrics(done.id)
        assert got["layers"] == client.layers(done.id, step=2)
        assert got["logs"] == list(client.logs(done.id))
        assert [j.id for j in client.list()] == [done.id], "the async delete went through"
    assert isinstance(got["missing"], NotFoundError) and got["missing"].status_code == 404
    with story.server.client() as raw:
        assert got["model"].read_bytes() == raw.get(f"/v1/jobs/{done.id}/model").content


def test_a_token_is_sent_as_a_bearer_token(ray_cluster: dict, tmp_path: Path) -> None:
    token = "client-test-token-0123456789"
    settings = Settings(data_dir=tmp_path, api_tokens=[token], max_concurrent_jobs=0)
    with LiveServer(settings) as server:
        with Client(server.url) as anonymous, pytest.raises(AuthenticationError) as refused:
            anonymous.get("0" * 32)
        assert refused.value.status_code == 401 and "bearer token" in refused.value.detail
        with Client(server.url, token=token) as client:
            assert list(client.list()) == []
            with pytest.raises(NotFoundError):
                client.get("0" * 32)
