"""The job page's event stream survives a dropped connection, in a real headless Chromium.

The page reaches the real service (uvicorn on loopback, a real local Ray) through a TCP relay the test can cut.
With the job page live, every connection is cut and new ones are refused for a while: the page shows it is
reconnecting. Meanwhile the job is cancelled (directly, not through the relay), so the events the page missed
exist only on the server. When the relay forwards again, the page reconnects with `Last-Event-ID` (the id of the
last event it had) and shows what it missed, each line once, and the stream ends with the job. Scheduling is
paused (max_concurrent_jobs=0): nothing trains.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from service.settings import Settings
from tests.dashboard.browser import PLAYWRIGHT_MISSING
from tests.dashboard.tcp_relay import TcpRelay
from tests.service.conftest_api import LiveServer, tiny_spec, wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("stream-drop"), max_concurrent_jobs=0, cancel_wait_s=0)
    with LiveServer(settings) as live:
        yield live


def _event_requests(relay: TcpRelay) -> list[str]:
    """The request heads the page sent for the job's event stream, in order."""
    heads = [raw.decode("latin-1") for raw in relay.sent]
    return [head for head in heads if head.startswith("GET ") and "/events" in head.split("\r\n", 1)[0]]


def test_the_job_page_resumes_its_stream_after_a_drop(server: LiveServer, open_page: Any) -> None:
    relay = TcpRelay(server.port).start()
    try:
        with server.client() as client:
            job = client.post("/v1/jobs", json=tiny_spec(name="stream-drop")).json()
        page = open_page(f"{relay.url}/#/jobs/{job['id']}")
        p = page.page
        state = p.locator("#stream-state")
        expect(state).to_have_attribute("data-state", "live")
        expect(p.locator("#page")).to_have_attribute("data-status", "queued")
        expect(p.locator("#log-lines")).to_contain_text("job submitted and queued")
        expect(p.locator("#whoami")).to_have_text("open service: no token needed")
        first = _event_requests(relay)
        assert len(first) == 1 and "last-event-id" not in first[0].lower()

        relay.cut()
        expect(state).to_have_attribute("data-state", re.compile("reconnecting|connecting|error"))
        with server.client() as client:
            assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        expect(p.locator("#page")).to_have_attribute("data-status", "queued")  # the page has not heard yet
        page.shot("stream-dropped")

        relay.resume()
        expect(p.locator("#page")).to_have_attribute("data-status", "cancelled", timeout=30_000)
        expect(state).to_have_attribute("data-state", "ended")
        logs = p.locator("#log-lines li")
        texts = [logs.nth(i).text_content() or "" for i in range(logs.count())]
        assert sum("job submitted and queued" in t for t in texts) == 1, texts
        assert sum("job cancelled before it started" in t for t in texts) == 1, texts
        page.shot("stream-resumed")

        resumed = wait_for(lambda: _event_requests(relay)[1:], 10, "the page's reconnection")
        header = re.search(r"(?im)^last-event-id:\s*(\d+)\s*$", resumed[-1])
        assert header is not None, resumed[-1]
        assert int(header.group(1)) == 2, "it resumed after the two events it had (queued status, first log line)"
    finally:
        relay.close()
