"""The layer heatmap reads only the statistic it shows, in a real headless Chromium against the real service.

The jobs' per-layer statistics are written into the server's own store (the real `JobStore` ingesting `layers`
records, as a run's records arrive), so no training is needed (scheduling is paused: max_concurrent_jobs=0). The
page's requests are watched as Chromium sends them. What is checked: the first load asks `/layer-summaries` for the
statistic on screen only; choosing another statistic asks for exactly that one, once; going back asks nothing; the
cells drawn (read from the heatmap's own tooltip, cell by cell) are the stored values of the chosen statistic, also
when the answer for a statistic chosen before arrives late; and a read that fails says so instead of a blank map.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from service.settings import Settings
from service.spec import JobSpec
from service.status import JobStatus
from tests.dashboard.browser import PLAYWRIGHT_MISSING
from tests.service.conftest_api import LiveServer, tiny_spec

sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect

pytestmark = pytest.mark.timeout(180)

LAYERS = ("stem.bn", "block1.bn", "head.bn")
STEPS = (2, 4, 6, 8, 10, 12)
#: The statistics the heatmap offers (service/dashboard/static/layer_view.js, STATISTICS), the first one first.
STATISTICS = (
    "skew_between_share_max",
    "skew_max_gap",
    "drift_mean",
    "drift_max",
    "batch_var_mean",
    "batch_var_min",
    "dead_channels",
    "weight_mean",
    "weight_grad_norm",
)
#: A cell without a value: drift_mean of the second layer at the third recorded step.
EMPTY_CELL = ("drift_mean", 1, 2)


def stored_value(key: str, layer: int, column: int) -> float | None:
    """The value written for `key` of layer `layer` at the `column`-th recorded step (distinct per statistic)."""
    if (key, layer, column) == EMPTY_CELL:
        return None
    return (STATISTICS.index(key) + 1) * 10 + layer + STEPS[column] / 7  # no ties at 4 digits


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("heatmap"), max_concurrent_jobs=0)
    with LiveServer(settings) as live:
        yield live


def finished_job_with_layer_statistics(server: LiveServer, name: str) -> str:
    """A succeeded job whose records (LAYERS x STEPS summaries, then its end) went through the server's store."""
    store = server.app.state.store
    job_id = uuid.uuid4().hex
    store.create_job(job_id, JobSpec.model_validate(tiny_spec(name=name)).model_dump(mode="json"))
    store.transition(job_id, JobStatus.RUNNING)
    records: list[dict[str, Any]] = []
    for column, step in enumerate(STEPS):
        layers = {
            layer: {"synchronized": True, **{key: stored_value(key, row, column) for key in STATISTICS}}
            for row, layer in enumerate(LAYERS)
        }
        records.append({"kind": "layers", "step": step, "epoch": 1 + column // 3, "layers": layers})
    records.append({"kind": "end", "status": "succeeded"})
    store.ingest(job_id, [{**record, "seq": seq} for seq, record in enumerate(records, start=1)])
    return job_id


def expected_cells(key: str) -> list[list[float | None]]:
    """What the tooltip shows for every cell: the stored float32 value to 4 significant digits (dom.js `num`)."""
    cells = []
    for row in range(len(LAYERS)):
        line = []
        for column in range(len(STEPS)):
            value = stored_value(key, row, column)
            line.append(None if value is None else float(f"{float(np.float32(value)):.4g}"))
        cells.append(line)
    return cells


#: Moves the pointer over the middle of every cell of a heatmap and returns the tooltip's text for each.
READ_CELLS = """([box, rows, columns]) => {
  const canvas = document.querySelector(`${box} canvas.heatmap-canvas`);
  const tooltip = document.querySelector(`${box} .heatmap-tooltip`);
  const rect = canvas.getBoundingClientRect();
  const rowHeight = 22;  // heatmap.js rowHeight for a few rows
  const out = [];
  for (let r = 0; r < rows; r++) {
    const line = [];
    for (let c = 0; c < columns; c++) {
      const x = rect.left + ((c + 0.5) * rect.width) / columns;
      const y = rect.top + (r + 0.5) * rowHeight;
      canvas.dispatchEvent(new MouseEvent("mousemove", { clientX: x, clientY: y, bubbles: true }));
      line.push(tooltip.hidden ? null : tooltip.textContent);
    }
    out.push(line);
  }
  return out;
}"""


def drawn_cells(page: Any, box: str) -> list[list[float | None]]:
    """The value of every cell as the heatmap's tooltip states it (None: "no value"), checking its layer and step."""
    texts = page.evaluate(READ_CELLS, [box, len(LAYERS), len(STEPS)])
    cells = []
    for row, line in enumerate(texts):
        values = []
        for column, text in enumerate(line):
            match = re.fullmatch(rf"layer {re.escape(LAYERS[row])}step {STEPS[column]}: (.+)", text or "")
            assert match, f"cell ({row}, {column}): tooltip {text!r}"
            values.append(None if match.group(1) == "no value" else float(match.group(1)))
        cells.append(values)
    return cells


class Requests:
    """The /layer-summaries and /events requests a page sent, as Chromium sent them."""

    def __init__(self, page: Any) -> None:
        self.summaries: list[list[str]] = []  # the keys asked for, request by request
        self.events: list[dict[str, list[str]]] = []
        page.on("request", self.on_request)

    def on_request(self, request: Any) -> None:
        url = urlparse(request.url)
        query = parse_qs(url.query)
        if url.path.endswith("/layer-summaries"):
            self.summaries.append(query["keys"][0].split(","))
        elif url.path.endswith("/events"):
            self.events.append(query)


def choose(page: Any, select: str, box: str, key: str) -> None:
    """Pick `key` in the statistic <select> and wait until its heatmap draws it."""
    page.select_option(select, key)
    heatmap = page.locator(box)
    expect(heatmap).to_have_attribute("data-statistic", key)
    expect(heatmap).to_have_attribute("data-state", "ready")


def test_the_heatmap_reads_only_the_statistic_it_shows(server: LiveServer, open_page: Any) -> None:
    job_id = finished_job_with_layer_statistics(server, "heatmap-keys")
    page = open_page("about:blank")
    p = page.page
    requests = Requests(p)
    page.goto(f"{server.url}/#/jobs/{job_id}")
    box = "#layer-heatmap"
    heatmap = p.locator(box)
    expect(heatmap).to_have_attribute("data-columns", str(len(STEPS)))
    expect(p.locator("#stream-state")).to_have_attribute("data-state", "ended")

    # First load: the statistic on screen only, and the stream leaves out the `layers` events of those steps.
    assert requests.summaries == [[STATISTICS[0]]]
    assert [e.get("layers_after_step") for e in requests.events] == [[str(STEPS[-1])]]
    expect(heatmap).to_have_attribute("data-state", "ready")
    assert drawn_cells(p, box) == expected_cells(STATISTICS[0])

    # Another statistic: exactly that key, once; its stored values are drawn (a cell without a value stays empty).
    choose(p, "#layer-stat", box, "drift_mean")
    assert requests.summaries[1:] == [["drift_mean"]]
    drawn = drawn_cells(p, box)
    assert drawn == expected_cells("drift_mean") and drawn[1][2] is None
    page.shot("drift-mean")

    # Back and forth between loaded statistics: no request.
    choose(p, "#layer-stat", box, STATISTICS[0])
    assert drawn_cells(p, box) == expected_cells(STATISTICS[0])
    choose(p, "#layer-stat", box, "drift_mean")
    assert drawn_cells(p, box) == expected_cells("drift_mean")
    assert requests.summaries[1:] == [["drift_mean"]]

    # Two quick switches: the first answer is held back and arrives after the second one was drawn.
    held: list[Any] = []

    def hold(route: Any) -> None:
        held.append(route)  # answered below, by the real server, once the next statistic is drawn

    late = re.compile(r"/layer-summaries\?keys=batch_var_mean$")
    p.route(late, hold)
    p.select_option("#layer-stat", "batch_var_mean")
    expect(heatmap).to_have_attribute("data-state", "loading")
    expect(p.locator(f"{box} .heatmap-status")).to_have_text("Loading “Batch variance: mean over channels”…")
    page.shot("loading")
    choose(p, "#layer-stat", box, "weight_mean")
    assert drawn_cells(p, box) == expected_cells("weight_mean")
    assert len(held) == 1, "the held request reached the page's route"
    with p.expect_event("requestfinished", lambda r: "keys=batch_var_mean" in r.url):
        held[0].continue_()
    p.unroute(late)
    p.wait_for_timeout(500)  # past the feed's 150 ms notification of the late answer
    expect(heatmap).to_have_attribute("data-statistic", "weight_mean")
    assert drawn_cells(p, box) == expected_cells("weight_mean"), "the late answer must not replace what is shown"
    choose(p, "#layer-stat", box, "batch_var_mean")  # its late answer was kept: no second request
    assert drawn_cells(p, box) == expected_cells("batch_var_mean")
    assert requests.summaries[2:] == [["batch_var_mean"], ["weight_mean"]]

    # A read that fails (the job was deleted meanwhile) is said, not drawn as an empty map.
    with server.client() as client:
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    p.select_option("#layer-stat", "dead_channels")
    expect(heatmap).to_have_attribute("data-state", "error")
    status = p.locator(f"{box} .heatmap-status")
    expect(status).to_contain_text("Could not read “Dead channels (batch variance < eps)”")
    expect(status).to_contain_text(job_id)
    assert requests.summaries[4:] == [["dead_channels"]]
    page.shot("error")
    page.assert_clean()


def test_the_compare_page_reads_the_shown_statistic_of_both_jobs(server: LiveServer, open_page: Any) -> None:
    ids = [finished_job_with_layer_statistics(server, f"heatmap-compare-{side}") for side in "ab"]
    page = open_page("about:blank")
    p = page.page
    requests = Requests(p)
    page.goto(f"{server.url}/#/compare?a={ids[0]}&b={ids[1]}")
    boxes = ("#compare-heatmap-a", "#compare-heatmap-b")
    for box in boxes:
        expect(p.locator(box)).to_have_attribute("data-columns", str(len(STEPS)))
    assert requests.summaries == [[STATISTICS[0]], [STATISTICS[0]]]
    for box in boxes:
        expect(p.locator(box)).to_have_attribute("data-state", "ready")

    p.select_option("#compare-stat", "skew_max_gap")
    for box in boxes:
        expect(p.locator(box)).to_have_attribute("data-statistic", "skew_max_gap")
        expect(p.locator(box)).to_have_attribute("data-state", "ready")
        assert drawn_cells(p, box) == expected_cells("skew_max_gap")
    assert requests.summaries[2:] == [["skew_max_gap"], ["skew_max_gap"]]
    choose(p, "#compare-stat", boxes[0], STATISTICS[0])
    assert drawn_cells(p, boxes[1]) == expected_cells(STATISTICS[0])
    assert len(requests.summaries) == 4, "both feeds still hold the first statistic"
    page.shot("compare")
    page.assert_clean()
