"""The dashboard in a real headless Chromium against the real service (uvicorn on loopback, a real local Ray).

The story of the module, in order on one server: the page and its files are served (with a strict CSP, outside
the OpenAPI schema); the form shows the API's 422 sentences next to the offending fields; a small digits job
submitted through the form is followed live (its loss curve grows while it runs) to the end, while its twin with
sync_bn off (same seed) runs beside it; the layer view shows every BatchNorm layer x recorded step and a clicked
layer's channels; the two jobs are compared side by side; the twin is deleted from the list.

Screenshots of each step land in artifacts/screenshots/. With SYNCBN_DOCS_SCREENSHOT=1 the finished job page is
also written to docs/dashboard.png (the README's picture).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dashboard import STATIC_DIR
from service.settings import Settings
from tests.dashboard.browser import PLAYWRIGHT_MISSING
from tests.service.conftest_api import LiveServer, wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
#: Long enough to watch the curve grow over several drains of the run's records, short enough for CI.
EPOCHS = 2
STEPS_PER_EPOCH = 8
STEPS = EPOCHS * STEPS_PER_EPOCH
FORM_VALUES = {
    "name": "dashboard-sync-on",
    "workers": "2",
    "cpus_per_worker": "1",
    "epochs": str(EPOCHS),
    "batch_size": "16",
    "steps_per_epoch": str(STEPS_PER_EPOCH),
    "stats_every": "1",
    "checkpoint_every": "0",
    "seed": "7",
}
#: Generous: a 2-worker Ray Train run starts in 10-60 s on a busy 2-core machine.
RUN_TIMEOUT_MS = 240_000


class Story:
    """What the steps of the module share: the server and the two jobs."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.job_id = ""
        self.twin_id = ""

    def client(self) -> httpx.Client:
        return self.server.client()


@pytest.fixture(scope="module")
def story(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("dashboard"), cancel_wait_s=60)
    with LiveServer(settings) as server:
        story = Story(server)
        yield story
        with story.client() as client:  # leave no run behind in the session's Ray
            for job in client.get("/v1/jobs", params={"limit": 500}).json()["data"]:
                if job["status"] in ("queued", "running"):
                    client.post(f"/v1/jobs/{job['id']}/cancel")


def module_imports(source: str) -> list[str]:
    return re.findall(r'^import [^;]*? from "\./([\w.]+\.js)";', source, flags=re.MULTILINE | re.DOTALL)


def test_the_page_and_its_files_are_served(story: Story) -> None:
    url = story.server.url
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert 'src="ui/static/app.js"' in page.text and "ui/static/vendor/uPlot.iife.min.js" in page.text

    # Every module app.js imports, transitively, is served as JavaScript (a missing file would blank the page).
    pending, seen = ["app.js"], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        answer = httpx.get(f"{url}/ui/static/{name}")
        assert answer.status_code == 200, name
        assert "javascript" in answer.headers["content-type"], (name, answer.headers["content-type"])
        pending.extend(module_imports(answer.text))
    assert seen >= {"app.js", "api.js", "dom.js", "charts.js", "heatmap.js", "spec_form.js", "job_feed.js"}
    assert seen == {p.name for p in STATIC_DIR.glob("*.js")}, "a module in static/ is never imported"
    for name in ("style.css", "vendor/uPlot.min.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.LICENSE"):
        assert httpx.get(f"{url}/ui/static/{name}").status_code == 200, name

    # The page needs no token, holds no data, and stays out of the API's schema; the files stay in their folder.
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)
    with httpx.Client(base_url=url) as raw:
        escape = raw.send(raw.build_request("GET", "/ui/static/%2e%2e/mount.py"))
        assert escape.status_code == 404


def test_the_form_shows_each_validation_error_next_to_its_field(story: Story, open_page: Any) -> None:
    page = open_page(f"{story.server.url}/#/new")
    p = page.page
    expect(p.locator("#spec-form")).to_be_visible()
    # The form follows the spec's schema: every JobSpec field has an input.
    for name in ("model", "dataset.kind", "workers", "optimizer.lr", "lr_schedule.warmup_epochs", "sync_bn", "seed"):
        expect(p.locator(f'[name="{name}"]')).to_have_count(1)
    for name in ("precision", "channels_last", "compile"):
        expect(p.locator(f'[name="{name}"]')).to_have_count(1)

    # The model field offers what GET /v1/models lists (it is not an enum of the schema).
    with story.client() as client:
        models = [entry["name"] for entry in client.get("/v1/models").json()["data"]]
    expect(p.locator('[name="model"] option')).to_have_count(len(models))
    assert p.locator('[name="model"] option').evaluate_all("options => options.map(o => o.value)") == models
    # fp16 needs a GPU: the API's sentence about the whole body lands on the field it names first.
    p.select_option('[name="precision"]', "fp16")
    p.click("#submit-job")
    expect(p.locator('[data-error-for="precision"]')).to_contain_text("precision 'fp16' needs use_gpu=true")
    p.select_option('[name="precision"]', "fp32")

    p.fill('[name="optimizer.lr"]', "0")
    p.click("#submit-job")
    error = p.locator('[data-error-for="optimizer.lr"]')
    expect(error).to_be_visible()
    expect(error).to_contain_text("optimizer.lr: input should be greater than 0")
    expect(p.locator('[name="optimizer.lr"]')).to_have_attribute("aria-invalid", "true")

    # A cross-field check: the API reports it on the whole body; the form places it at the field it names.
    p.fill('[name="optimizer.lr"]', "0.1")
    p.fill('[name="epochs"]', "2")
    p.fill('[name="lr_schedule.warmup_epochs"]', "3")
    p.click("#submit-job")
    expect(p.locator('[data-error-for="lr_schedule.warmup_epochs"]')).to_contain_text(
        "lr_schedule.warmup_epochs must be smaller than epochs"
    )
    expect(error).to_be_hidden()

    # Text that is not a number goes to the API as typed, and its sentence comes back to the field.
    p.fill('[name="lr_schedule.warmup_epochs"]', "0")
    p.fill('[name="batch_size"]', "many")
    p.click("#submit-job")
    expect(p.locator('[data-error-for="batch_size"]')).to_contain_text("batch_size: input should be a valid integer")

    # Fields of another variant appear with it; an error inside a nested object lands on the named field.
    p.fill('[name="batch_size"]', "16")
    expect(p.locator('[data-field="dataset.input_shape"]')).to_be_hidden()
    p.select_option('[name="dataset.kind"]', "synthetic")
    p.fill('[name="dataset.input_shape"]', "8, 8")
    p.click("#submit-job")
    expect(p.locator('[data-error-for="dataset.input_shape"]')).to_contain_text("add the channel count")
    page.shot("validation")

    with story.client() as client:
        assert client.get("/v1/jobs").json()["count"] == 0, "no refused submission created a job"
    page.assert_clean()


#: Records every value the loss chart's point count takes, from the page itself (no polling gaps).
RECORD_POINTS = """() => {
  window.__lossPoints = [];
  new MutationObserver(() => {
    const chart = document.querySelector("#chart-loss");
    if (!chart) return;
    const n = Number(chart.dataset.points);
    if (window.__lossPoints[window.__lossPoints.length - 1] !== n) window.__lossPoints.push(n);
  }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["data-points"] });
}"""


def test_a_job_submitted_through_the_form_is_followed_live(story: Story, open_page: Any) -> None:
    page = open_page(f"{story.server.url}/#/new")
    p = page.page
    expect(p.locator("#spec-form")).to_be_visible()
    for name, value in FORM_VALUES.items():
        p.fill(f'[name="{name}"]', value)
    p.select_option('[name="model"]', "small_resnet")
    p.select_option('[name="dataset.kind"]', "digits")
    expect(p.locator('[name="sync_bn"]')).to_be_checked()
    p.evaluate(RECORD_POINTS)
    p.click("#submit-job")
    p.wait_for_url(re.compile(r"#/jobs/[0-9a-f]{32}$"))
    story.job_id = p.url.rsplit("/", 1)[1]

    # Its twin, local BatchNorm on the same seed, runs beside it (for the comparison below).
    with story.client() as client:
        spec = client.get(f"/v1/jobs/{story.job_id}").json()["spec"]
        assert spec["name"] == "dashboard-sync-on" and spec["steps_per_epoch"] == STEPS_PER_EPOCH and spec["seed"] == 7
        twin = client.post("/v1/jobs", json={**spec, "name": "dashboard-sync-off", "sync_bn": False})
        assert twin.status_code == 201, twin.text
        story.twin_id = twin.json()["id"]

    expect(p.locator("#job-title")).to_have_text("dashboard-sync-on")
    expect(p.locator("#stream-state")).to_have_attribute("data-state", "live")
    expect(p.locator("#page")).to_have_attribute("data-status", "running", timeout=RUN_TIMEOUT_MS)
    page.shot("running")
    expect(p.locator("#page")).to_have_attribute("data-status", "succeeded", timeout=RUN_TIMEOUT_MS)
    expect(p.locator("#chart-loss")).to_have_attribute("data-points", str(STEPS))

    seen = [n for n in p.evaluate("window.__lossPoints") if n > 0]
    assert len(set(seen)) >= 2, f"the loss curve never grew while the job ran (point counts seen: {seen})"
    assert seen == sorted(seen) and seen[-1] == STEPS, seen

    with story.client() as client:
        job = client.get(f"/v1/jobs/{story.job_id}").json()
        metrics = client.get(f"/v1/jobs/{story.job_id}/metrics").json()
    assert [point["step"] for point in metrics["steps"]] == list(range(1, STEPS + 1))
    expect(p.locator("#chart-accuracy")).to_have_attribute("data-points", str(EPOCHS))
    expect(p.locator("#chart-lr")).to_have_attribute("data-points", str(STEPS))
    expect(p.locator("#chart-throughput")).to_have_attribute("data-points", str(STEPS))
    expect(p.locator("#card-progress")).to_contain_text(f"{EPOCHS} / {EPOCHS} epochs")
    expect(p.locator("#card-acc")).to_contain_text(f"best {job['summary']['best_val_acc'] * 100:.1f}%")
    expect(p.locator("#card-verdict")).to_contain_text(job["summary"]["verdict"])
    expect(p.locator("#card-precision")).to_have_text("Precisionfp32")
    expect(p.locator("#stream-state")).to_have_attribute("data-state", "ended")
    expect(p.locator("#download-model")).to_be_visible()
    expect(p.locator("#delete-job")).to_be_visible()
    expect(p.locator("#cancel-job")).to_have_count(0)

    # The same curves against epochs: step points fall between the epoch marks.
    p.check('input[name="x-axis"][value="epoch"]')
    expect(p.locator("#chart-loss")).to_have_attribute("data-points", str(STEPS))
    p.check('input[name="x-axis"][value="step"]')
    page.shot("finished")
    if os.environ.get("SYNCBN_DOCS_SCREENSHOT"):
        page.shot("docs", path=REPO / "docs" / "dashboard.png")
    page.assert_clean()


def test_the_layer_view_shows_every_layer_and_a_clicked_layers_channels(story: Story, open_page: Any) -> None:
    assert story.job_id, "needs the job of the previous test"
    with story.client() as client:
        latest = client.get(f"/v1/jobs/{story.job_id}/layers").json()
    names, steps = list(latest["layers"]), latest["recorded_steps"]
    assert len(steps) == STEPS and len(names) >= 5

    # A fresh page on a finished job: everything comes from the replayed event stream.
    page = open_page(f"{story.server.url}/#/jobs/{story.job_id}")
    p = page.page
    heatmap = p.locator("#layer-heatmap")
    expect(heatmap).to_have_attribute("data-rows", str(len(names)))
    expect(heatmap).to_have_attribute("data-columns", str(len(steps)))
    assert p.locator("#layer-heatmap .heatmap-row").all_inner_texts() == names, "rows in the model's layer order"

    p.select_option("#layer-stat", "drift_mean")
    expect(p.locator("#layer-stat-help")).to_contain_text("running mean")
    p.select_option("#layer-stat", "dead_channels")
    p.select_option("#layer-stat", "skew_between_share_max")

    target = names[3]
    channels = latest["layers"][target]["channels"]
    p.click(f'#layer-heatmap .heatmap-row[data-row="{target}"]')
    detail = p.locator("#layer-detail")
    expect(p.locator("#layer-name")).to_have_text(target)
    expect(detail).to_have_attribute("data-step", str(steps[-1]))
    expect(p.locator("#channel-means")).to_have_attribute("data-points", str(channels))
    expect(p.locator("#channel-vars")).to_have_attribute("data-points", str(channels))
    expect(p.locator("#mean-history")).to_have_attribute("data-rows", str(channels))
    expect(p.locator("#mean-history")).to_have_attribute("data-columns", str(len(steps)))
    page.shot("layer-detail")

    # Step back through the layer's history with the keyboard.
    p.focus("#layer-step")
    p.keyboard.press("Home")
    expect(detail).to_have_attribute("data-step", str(steps[0]))

    # Clicking a heatmap cell opens that layer at that step: the top-left cell is the first layer, first step.
    canvas = p.locator("#layer-heatmap canvas.heatmap-canvas")
    canvas.hover(position={"x": 2, "y": 5})
    tooltip = p.locator("#layer-heatmap .heatmap-tooltip")
    expect(tooltip).to_contain_text(f"layer {names[0]}")
    expect(tooltip).to_contain_text(f"step {steps[0]}:")
    canvas.click(position={"x": 2, "y": 5})
    expect(p.locator("#layer-name")).to_have_text(names[0])
    expect(detail).to_have_attribute("data-step", str(steps[0]))
    page.shot("layers", full_page=True)
    page.assert_clean()


def test_two_jobs_are_compared_side_by_side(story: Story, open_page: Any) -> None:
    assert story.job_id and story.twin_id, "needs the jobs of the previous tests"
    with story.client() as client:
        wait_for(
            lambda: client.get(f"/v1/jobs/{story.twin_id}").json()["status"] == "succeeded",
            RUN_TIMEOUT_MS / 1000,
            "the sync_bn-off twin to succeed",
            interval=1.0,
        )
        layer_count = len(client.get(f"/v1/jobs/{story.twin_id}/layers").json()["layers"])

    page = open_page(f"{story.server.url}/#/jobs")
    p = page.page
    for job_id in (story.job_id, story.twin_id):
        row = p.locator(f'tr[data-job-id="{job_id}"]')
        expect(row).to_have_attribute("data-status", "succeeded")
        row.locator('input[type="checkbox"]').check()
    p.click("#compare-selected")
    p.wait_for_url(re.compile(r"#/compare\?a=[0-9a-f]{32}&b=[0-9a-f]{32}$"))

    diff = p.locator("#spec-diff")
    expect(diff.locator('tr[data-field="sync_bn"]')).to_contain_text("true")
    expect(diff.locator('tr[data-field="sync_bn"]')).to_contain_text("false")
    expect(diff.locator('tr[data-field="name"]')).to_have_count(1)
    expect(diff.locator('tr[data-field="seed"]')).to_have_count(0)
    expect(diff).to_contain_text("seed = 7")
    expect(p.locator("#compare-loss")).to_have_attribute("data-points", str(STEPS))
    expect(p.locator("#compare-accuracy")).to_have_attribute("data-points", str(EPOCHS))
    expect(p.locator("#compare-throughput")).to_have_attribute("data-points", str(STEPS))
    for side in ("a", "b"):
        expect(p.locator(f"#compare-heatmap-{side}")).to_have_attribute("data-rows", str(layer_count))
    # Both series of the overlaid loss chart are drawn: its legend lists A and B.
    legend = p.locator("#compare-loss .u-legend")
    expect(legend).to_contain_text("A: dashboard-sync-on")
    expect(legend).to_contain_text("B: dashboard-sync-off")
    page.shot("compare")
    page.assert_clean()


def test_a_finished_job_is_deleted_from_the_list(story: Story, open_page: Any) -> None:
    assert story.twin_id, "needs the twin of the previous tests"
    page = open_page(f"{story.server.url}/#/jobs")
    p = page.page
    row = p.locator(f'tr[data-job-id="{story.twin_id}"]')
    expect(row).to_have_count(1)
    row.locator('[data-action="delete"]').click()  # the confirmation dialog is accepted
    expect(row).to_have_count(0)
    expect(p.locator(f'tr[data-job-id="{story.job_id}"]')).to_have_count(1)
    with story.client() as client:
        assert client.get(f"/v1/jobs/{story.twin_id}").status_code == 404
    page.assert_clean()
