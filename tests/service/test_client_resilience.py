"""The client survives what networks and restarts do: a service that is not up yet (connection refused, then it
starts), a port nothing listens on, 503 answers, an answer cut after its headers (a submit retried with the same
Idempotency-Key creates one job), and an event stream cut again and again in the middle of an event (`events()`
resumes with Last-Event-ID and yields exactly the stored events, once each). Only connection errors and 503 are
retried: a 404 or a 500 is sent once.

The faults come from `FaultyProxy`, a real HTTP server of our own (uvicorn on loopback) in front of a real
service (`LiveServer`): it forwards each request and injects the fault a test asks for. The late start is a real
`syncbn serve` process (`ServeProcess`, with its own embedded Ray) that the client calls the moment it is launched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.client import (
    Client,
    ConnectionFailedError,
    NotFoundError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    UnexpectedResponseError,
)
from service.settings import Settings
from service.status import JobStatus
from tests.service.conftest_api import LiveServer, ServeProcess, free_port, read_events, tiny_spec, wait_for

pytestmark = pytest.mark.timeout(240)

#: Retries that keep the tests quick: up to 8 attempts after the first, 10-50 ms apart.
QUICK = RetryPolicy(retries=8, backoff_s=0.01, max_backoff_s=0.05)


class FaultyProxy:
    """A real HTTP server on loopback that forwards every request to `upstream` and injects faults on demand.

    - `answers`: (status, body) pairs answered instead of forwarding, one per request, first request first;
    - `cut_answers`: the next N requests are forwarded, then their answers are cut after the headers;
    - `cut_streams_after`: event streams are cut after this many events, in the middle of the next one.
    `seen` records (method, path, headers) of every request.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.answers: list[tuple[int, str]] = []
        self.cut_answers = 0
        self.cut_streams_after: int | None = None
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.cut_bodies: list[bytes] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off", interface="asgi3"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"proxy-{self.port}", daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        wait_for(lambda: self._server.started, 30, "the proxy to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        self.seen.append((scope["method"], scope["path"], headers))
        if self.answers:
            status, text = self.answers.pop(0)
            content_type = b"application/json" if text.startswith("{") else b"text/html"
            start = {"type": "http.response.start", "status": status}
            await send({**start, "headers": [(b"content-type", content_type), (b"retry-after", b"0")]})
            await send({"type": "http.response.body", "body": text.encode()})
            return
        query = scope["query_string"].decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        forwarded = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")}
        async with httpx.AsyncClient(base_url=self.upstream, timeout=120) as upstream:
            request = upstream.build_request(scope["method"], target, headers=forwarded, content=body)
            response = await upstream.send(request, stream=True)
            try:
                await self._relay(response, send)
            finally:
                await response.aclose()

    async def _relay(self, response: httpx.Response, send: Any) -> None:
        kept = [
            (key.encode(), value.encode())
            for key, value in response.headers.items()
            if key not in ("content-length", "transfer-encoding", "connection")
        ]
        start = {"type": "http.response.start", "status": response.status_code}
        streaming = response.headers.get("content-type", "").startswith("text/event-stream")
        if streaming and self.cut_streams_after is not None:
            await send({**start, "headers": kept})
            events, has_data = 0, False
            async for line in response.aiter_lines():
                await send({"type": "http.response.body", "body": f"{line}\n".encode(), "more_body": True})
                if events == self.cut_streams_after:
                    return  # half an event went out: returning now makes uvicorn close the connection
                if line.startswith("data"):
                    has_data = True
                elif line == "" and has_data:
                    events, has_data = events + 1, False
            await send({"type": "http.response.body", "body": b""})
            return
        content = await response.aread()
        length = [(b"content-length", str(len(content)).encode())]
        await send({**start, "headers": kept + length})
        if self.cut_answers:
            self.cut_answers -= 1
            self.cut_bodies.append(content)
            return  # the headers went out, the body never will: the connection is closed
        await send({"type": "http.response.body", "body": content})


class Setup:
    """The real service, the proxy in front of it, and the job they carry."""

    def __init__(self, server: LiveServer, proxy: FaultyProxy) -> None:
        self.server = server
        self.proxy = proxy
        self.job_id = ""


@pytest.fixture(scope="module")
def setup(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    # max_concurrent_jobs=0: jobs stay queued, nothing trains
    settings = Settings(data_dir=tmp_path_factory.mktemp("client-faults"), max_concurrent_jobs=0)
    with LiveServer(settings) as server, FaultyProxy(server.url) as proxy:
        yield Setup(server, proxy)
        with server.client() as raw:  # leave no run behind in the session's Ray
            for job in raw.get("/v1/jobs").json()["data"]:
                if job["status"] in ("queued", "running"):
                    raw.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_submit_whose_answer_is_cut_is_retried_into_the_same_job(setup: Setup) -> None:
    setup.proxy.cut_answers = 1
    with Client(setup.proxy.url, retry=QUICK) as client:
        job = client.submit(tiny_spec(name="cut-answer"))
    posts = [headers for method, _, headers in setup.proxy.seen if method == "POST"]
    assert len(posts) == 2, "the cut answer was retried once"
    assert posts[0]["idempotency-key"] == posts[1]["idempotency-key"], "with the key generated for this submit"
    assert json.loads(setup.proxy.cut_bodies[0])["id"] == job.id, "the retry returned the job the first POST made"
    with setup.server.client() as raw:
        assert [j["id"] for j in raw.get("/v1/jobs").json()["data"]] == [job.id], "one job, not two"
    setup.job_id = job.id


def test_the_event_stream_resumes_after_every_cut(setup: Setup) -> None:
    assert setup.job_id, "needs the queued job of the previous test"
    proxy = setup.proxy
    proxy.cut_streams_after = 1  # every stream is cut after one event, in the middle of the next
    start = len(proxy.seen)

    def cancel() -> None:  # new events arrive while the client is following (and being cut)
        with setup.server.client() as raw:
            raw.post(f"/v1/jobs/{setup.job_id}/cancel")

    canceller = threading.Timer(1.0, cancel)
    canceller.start()
    try:
        with Client(proxy.url, retry=QUICK) as client:
            events = list(client.events(setup.job_id))
    finally:
        canceller.join()
        proxy.cut_streams_after = None
    with setup.server.client() as raw:
        stored = read_events(raw, setup.job_id)
    assert [(e.id, e.type, e.data) for e in events] == [(e["id"], e["event"], e["data"]) for e in stored]
    assert [e.data["status"] for e in events if e.type == "status"] == ["queued", "cancelled"]
    streams = [headers for _, path, headers in proxy.seen[start:] if path.endswith("/events")]
    assert "last-event-id" not in streams[0] and len(streams) >= len(stored)
    resumed = [int(headers["last-event-id"]) for headers in streams[1:]]
    assert resumed == [event.id for event in events][: len(resumed)], "each resumes after the last whole event"

    proxy.cut_streams_after = 0  # now no event ever gets through: the client gives up with a sentence
    try:
        quitter = Client(proxy.url, retry=RetryPolicy(retries=3, backoff_s=0.01))
        with quitter, pytest.raises(ConnectionFailedError, match="cut 4 times in a row without an event"):
            list(quitter.events(setup.job_id))
    finally:
        proxy.cut_streams_after = None


def test_503_is_retried_and_other_errors_are_not(setup: Setup) -> None:
    assert setup.job_id, "needs the job of the first test"
    proxy = setup.proxy
    with Client(proxy.url, retry=QUICK) as client:
        proxy.answers = [(503, '{"detail": "Ray does not answer."}')] * 2
        start = len(proxy.seen)
        assert client.get(setup.job_id).id == setup.job_id
        assert len(proxy.seen) - start == 3, "two 503 answers, then the job"

        proxy.answers = [(503, '{"detail": "Ray does not answer."}')] * 20
        with pytest.raises(ServiceUnavailableError) as unavailable:
            client.get(setup.job_id)
        assert unavailable.value.status_code == 503 and unavailable.value.detail == "Ray does not answer."
        proxy.answers = []

        for status, kind in ((500, ServerError), (404, NotFoundError)):
            proxy.answers = [(status, '{"detail": "no."}')]
            start = len(proxy.seen)
            with pytest.raises(kind) as error:
                client.get(setup.job_id)
            assert error.value.status_code == status and len(proxy.seen) - start == 1, "sent once"

        proxy.answers = [(200, "<html>a login page</html>")]
        with pytest.raises(UnexpectedResponseError, match=r"not a JobPublic.*syncbn service"):
            client.get(setup.job_id)


def test_a_syncbn_serve_that_is_still_starting_is_waited_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    serve = ServeProcess(tmp_path, "--max-concurrent-jobs", "0", "--ray-num-cpus", "2")  # starting from now on
    patient = RetryPolicy(retries=300, backoff_s=0.2, max_backoff_s=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="service.client"), Client(serve.url, retry=patient) as client:
            job = client.submit(tiny_spec(name="early"))
            refused = [r.getMessage() for r in caplog.records if "ConnectError" in r.getMessage()]
            assert refused and refused[0].startswith("POST /v1/jobs: ConnectError"), "sent before the port was open"
            assert job.status is JobStatus.QUEUED and [j.id for j in client.list()] == [job.id]
            assert client.cancel(job.id).status is JobStatus.CANCELLED
    finally:
        assert serve.terminate() == 0, serve.log()


def test_a_port_nothing_listens_on_fails_with_a_sentence() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retry=RetryPolicy(retries=2, backoff_s=0.01)) as client:
        with pytest.raises(ConnectionFailedError) as refused:
            client.get("0" * 32)
        assert refused.value.status_code is None and refused.value.response is None
        assert "tried 3 times" in refused.value.detail and "ConnectError" in refused.value.detail

    async def fails_too() -> ConnectionFailedError:
        from service.client import AsyncClient

        async with AsyncClient(url, retry=RetryPolicy(retries=1, backoff_s=0.01)) as client:
            try:
                await client.get("0" * 32)
            except ConnectionFailedError as exc:
                return exc
        raise AssertionError("no error")

    assert "tried 2 times" in asyncio.run(fails_too()).detail
