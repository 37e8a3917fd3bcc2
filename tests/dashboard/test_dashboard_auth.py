"""The dashboard against a service with API tokens, in a real headless Chromium (real uvicorn, real local Ray).

The page and its files load without a token; the first API call answers 401 and the page asks for a token with
the service's sentence; a wrong token is refused the same way; the right one is kept in the tab's sessionStorage,
sent as `Authorization: Bearer` on every request including the event stream (read with fetch, since EventSource
cannot send headers), and survives a reload. Scheduling is paused (max_concurrent_jobs=0), so the jobs submitted
here stay queued: they are cancelled and deleted from the job page and from the list, without training anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from service.settings import Settings
from tests.dashboard.browser import PLAYWRIGHT_MISSING
from tests.service.conftest_api import LiveServer, tiny_spec

sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect

pytestmark = pytest.mark.timeout(180)

TOKEN = "dashboard-test-token-0123456789"
#: A job name that would run script if the page ever put server strings into innerHTML.
HOSTILE_NAME = '<img src="x" onerror="window.__injected = 1">'


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("dashboard-auth"), api_tokens=[TOKEN], max_concurrent_jobs=0)
    with LiveServer(settings) as live:
        yield live


def test_the_page_asks_for_a_token_and_sends_it_everywhere(server: LiveServer, open_page: Any) -> None:
    page = open_page(f"{server.url}/")
    p = page.page
    panel = p.locator("#auth-panel")
    expect(panel).to_be_visible()
    expect(p.locator("#auth-reason")).to_contain_text("this service requires a bearer token")
    expect(p.locator("#job-rows")).to_contain_text("Waiting for an API token")
    page.shot("token-prompt", full_page=False)

    p.fill("#auth-token", "not-the-right-token-at-all")
    p.click("#auth-form button[type=submit]")
    expect(p.locator("#auth-reason")).to_contain_text("not one of this service's api_tokens")
    expect(panel).to_be_visible()
    assert p.evaluate("sessionStorage.getItem('syncbn.token')") is None, "a refused token is not kept"

    p.fill("#auth-token", TOKEN)
    p.click("#auth-form button[type=submit]")
    expect(panel).to_be_hidden()
    expect(p.locator("#job-rows")).to_contain_text("No jobs yet")
    expect(p.locator("#cluster")).to_contain_text("scheduling paused")
    expect(p.locator("#whoami")).to_have_text("signed in as default")  # a bare token is the principal "default"
    assert p.evaluate("sessionStorage.getItem('syncbn.token')") == TOKEN

    p.reload()
    expect(p.locator("#job-rows")).to_contain_text("No jobs yet")
    expect(panel).to_be_hidden()

    # Submit through the form; the job page follows the job's event stream with the bearer header.
    p.goto(f"{server.url}/#/new")
    expect(p.locator("#spec-form")).to_be_visible()
    p.click("#preset-quick")
    expect(p.locator('[name="name"]')).to_have_value("quick-digits")
    p.click("#submit-job")
    p.wait_for_url(re.compile(r"#/jobs/[0-9a-f]{32}$"))
    job_id = p.url.rsplit("/", 1)[1]
    expect(p.locator("#page")).to_have_attribute("data-status", "queued")
    expect(p.locator("#stream-state")).to_have_attribute("data-state", "live")
    expect(p.locator("#log-lines")).to_contain_text("job submitted and queued")
    page.shot("queued-job")

    p.click("#cancel-job")
    expect(p.locator("#page")).to_have_attribute("data-status", "cancelled")
    expect(p.locator("#stream-state")).to_have_attribute("data-state", "ended")
    p.click("#delete-job")  # the confirmation dialog is accepted
    p.wait_for_url(re.compile(r"#/jobs$"))
    expect(p.locator(f'tr[data-job-id="{job_id}"]')).to_have_count(0)

    # A job whose name is markup is shown as text, never parsed; then it is cancelled and deleted from the list.
    with server.client(token=TOKEN) as client:
        other = client.post("/v1/jobs", json=tiny_spec(name=HOSTILE_NAME)).json()["id"]
    row = p.locator(f'tr[data-job-id="{other}"]')
    expect(row).to_have_attribute("data-status", "queued")
    expect(row.locator("td.job-cell a")).to_have_text(HOSTILE_NAME)
    assert p.locator("#job-rows img").count() == 0
    assert p.evaluate("window.__injected") is None
    row.locator('[data-action="cancel"]').click()
    expect(row).to_have_attribute("data-status", "cancelled")
    row.locator('[data-action="delete"]').click()
    expect(row).to_have_count(0)
    with server.client(token=TOKEN) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.get(f"/v1/jobs/{other}").status_code == 404

    # Forgetting the token brings the prompt back at the next request.
    p.click("#forget-token")
    expect(panel).to_be_visible()
    assert p.evaluate("sessionStorage.getItem('syncbn.token')") is None
    page.assert_clean()
