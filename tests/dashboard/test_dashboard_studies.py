"""The study pages in a real headless Chromium against the real service (uvicorn on loopback, the session's Ray).

Scheduling is paused (max_concurrent_jobs=0), so nothing trains: a study's trials are real queued jobs, and the
finished ones get their records (steps, epochs, the local arm's layer statistics, the end) through the server's
own store, as a run's records arrive. What is checked, against the API's numbers: the study list links to a study
whose page draws each arm's mean, interval and per-seed dots and the paired difference against the margin band
where their values say (positions in the SVGs, not only data), states the verdict's sentence, links every trial,
overlays the trials' curves and shows the local arm's skew heatmap with the verdict's layer ranking; a study
followed live gets its verdict when its trials end and is cancelled by its button; the new-study form shows the
API's 422 sentences next to the field (an arm's row included) and submits what was typed; a job page's button
opens that form filled with the job's spec as the base.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from service.settings import Settings
from service.spec import JobSpec
from service.status import JobStatus
from service.study_spec import StudySpec
from tests.dashboard.browser import PLAYWRIGHT_MISSING
from tests.service.conftest_api import LiveServer, tiny_spec

sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect

pytestmark = pytest.mark.timeout(240)

LAYERS = ("stem.bn", "block1.bn", "head.bn")
STEPS = (1, 2, 3, 4)
LAYER_STEPS = (2, 4)
#: Best validation accuracy per (arm, seed); each trial's epochs reach it at a different epoch.
BEST = {
    (0, 0): 0.91,
    (0, 1): 0.83,
    (0, 2): 0.875,
    (1, 0): 0.72,
    (1, 1): 0.61,
    (1, 2): 0.69,
}


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("studies-dashboard"), max_concurrent_jobs=0, cancel_wait_s=0)
    with LiveServer(settings) as live:
        yield live


def create_study(server: LiveServer, name: str, seeds: int) -> tuple[str, dict[tuple[int, int], str]]:
    """A study of sync_bn true/false over `seeds` seeds, queued in the server's store; its trials by (arm, seed)."""
    spec = StudySpec.model_validate({"name": name, "base": tiny_spec(), "seeds": seeds})
    trials = [(uuid.uuid4().hex, arm, seed, job.model_dump(mode="json")) for arm, seed, job in spec.trial_specs()]
    study, jobs = server.app.state.store.create_study(uuid.uuid4().hex, spec.model_dump(mode="json"), trials)
    return study.id, {(job.study_arm, job.study_seed): job.id for job in jobs}


def finish_trial(server: LiveServer, job_id: str, arm: int, seed: int) -> None:
    """Run a trial's records through the store: 4 steps, 2 epochs (the best accuracy BEST[arm, seed] in one of
    them), the local arm's per-layer skew at steps 2 and 4, and a successful end."""
    store = server.app.state.store
    store.transition(job_id, JobStatus.RUNNING)
    speed = 200.0 if arm == 1 else 100.0
    records: list[dict[str, Any]] = []
    best = BEST[arm, seed]
    accuracies = [best, best - 0.05] if seed % 2 else [best - 0.04, best]
    for step in STEPS:
        epoch = 1 + (step - 1) // 2
        records.append({"kind": "step", "step": step, "epoch": epoch, "train_loss": 2.0 / step, "samples_per_s": speed})
        if arm == 1 and step in LAYER_STEPS:
            layers = {
                layer: {"synchronized": False, "skew_between_share_mean": 0.1 * (row + 1) + 0.01 * step + 0.001 * seed}
                for row, layer in enumerate(LAYERS)
            }
            records.append({"kind": "layers", "step": step, "epoch": epoch, "layers": layers})
        if step % 2 == 0:
            accuracy = accuracies[step // 2 - 1]
            records.append(
                {"kind": "epoch", "epoch": step // 2, "step": step, "val_acc": accuracy, "val_loss": 1 - accuracy}
            )
    records.append({"kind": "end", "status": "succeeded", "verdict": "completed"})
    store.ingest(job_id, [{**record, "seq": seq} for seq, record in enumerate(records, start=1)])


#: The marks of an interval_plot SVG: its scale and, per row, the whisker, the mean and the dots (position, value).
READ_PLOT = """(selector) => {
  const plot = document.querySelector(selector);
  const n = (node, name) => Number(node.getAttribute(name));
  const rows = [...plot.querySelectorAll("g.row")].map((row) => {
    const ci = row.querySelector("line.ci");
    const mean = row.querySelector("path.mean");
    return {
      label: row.querySelector(".row-label").textContent,
      ci: ci ? [n(ci, "x1"), n(ci, "x2"), n(ci, "data-low"), n(ci, "data-high")] : null,
      mean: mean ? [n(mean, "data-x"), n(mean, "data-value")] : null,
      dots: [...row.querySelectorAll("circle.dot")].map((dot) => [n(dot, "cx"), n(dot, "data-value")]),
    };
  });
  const band = plot.querySelector("rect.band");
  const zero = plot.querySelector("line.zero");
  return {
    scale: ["data-domain-low", "data-domain-high", "data-x0", "data-x1"].map((name) => n(plot, name)),
    rows,
    band: band ? [n(band, "x"), n(band, "width"), n(band, "data-low"), n(band, "data-high")] : null,
    zero: zero ? n(zero, "x1") : null,
  };
}"""


class Plot:
    """An interval plot as drawn: `at(value)` is where the plot's own scale puts a value."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.low, self.high, self.x0, self.x1 = data["scale"]
        self.rows = data["rows"]
        self.band = data["band"]
        self.zero = data["zero"]

    def at(self, value: float) -> float:
        return self.x0 + (value - self.low) / (self.high - self.low) * (self.x1 - self.x0)

    def check_row(self, index: int, mean: float, low: float, high: float, dots: list[float]) -> None:
        """Row `index` shows these numbers, each mark at its value's position."""
        row = self.rows[index]
        assert row["mean"][1] == pytest.approx(mean) and row["mean"][0] == pytest.approx(self.at(mean), abs=0.01)
        x1, x2, drawn_low, drawn_high = row["ci"]
        assert (drawn_low, drawn_high) == (pytest.approx(low), pytest.approx(high))
        assert (x1, x2) == (pytest.approx(self.at(low), abs=0.01), pytest.approx(self.at(high), abs=0.01))
        assert sorted(value for _, value in row["dots"]) == pytest.approx(sorted(dots))
        for x, value in row["dots"]:
            assert x == pytest.approx(self.at(value), abs=0.01)


def read_plot(page: Any, selector: str) -> Plot:
    return Plot(page.evaluate(READ_PLOT, selector))


def js_num(value: float, digits: int = 4) -> str:
    """dom.js `num`: `digits` significant digits with trailing zeros dropped, or JavaScript's exponent form below
    1e-3 (e.g. 1.23e-4)."""
    if value != 0 and abs(value) < 1e-3:
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return repr(float(f"{value:.{digits}g}")).removesuffix(".0")


def best_of(client: Any, job_id: str) -> float:
    """A trial's best validation accuracy as the API's metrics state it."""
    return max(point["val_acc"] for point in client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"])


def test_a_finished_study_draws_its_arms_difference_verdict_and_trials(server: LiveServer, open_page: Any) -> None:
    study_id, trials = create_study(server, "finished study", seeds=3)
    for (arm, seed), job_id in trials.items():
        finish_trial(server, job_id, arm, seed)
    with server.client() as client:
        study = client.get(f"/v1/studies/{study_id}").json()
        bests = {key: best_of(client, job_id) for key, job_id in trials.items()}
    verdict = study["verdict"]
    assert study["status"] == "succeeded" and verdict["outcome"] == "pays", study

    # The list (through the nav link) shows the study with its outcome and sentence, and links to it.
    page = open_page(f"{server.url}/#/jobs")
    p = page.page
    p.click('nav a[data-nav="studies"]')
    expect(p.locator('nav a[data-nav="studies"]')).to_have_attribute("aria-current", "page")
    row = p.locator(f'tr[data-study-id="{study_id}"]')
    expect(row).to_have_attribute("data-status", "succeeded")
    expect(row.locator("[data-outcome]")).to_have_attribute("data-outcome", "pays")
    expect(row.locator(".study-answer")).to_have_text(verdict["sentence"])
    expect(row).to_contain_text("sync_bn=true vs sync_bn=false")
    expect(row).to_contain_text("6 / 6")
    row.locator("a").first.click()
    p.wait_for_url(re.compile(rf"#/studies/{study_id}$"))

    expect(p.locator("#study-title")).to_have_text("finished study")
    expect(p.locator("#verdict-sentence")).to_have_text(verdict["sentence"])
    expect(p.locator("#study-verdict [data-outcome]")).to_have_attribute("data-outcome", "pays")
    expect(p.locator("#verdict-explained")).to_contain_text("So it pays")
    expect(p.locator("#stream-state")).to_have_attribute("data-state", "ended")
    expect(p.locator("#cancel-study")).to_have_count(0)

    # One row per arm, with the verdict's numbers.
    for index, arm in enumerate(verdict["arms"]):
        line = p.locator(f'#arm-rows tr[data-arm="{index}"]')
        expect(line.locator(".arm-mean")).to_have_text(f"{arm['mean'] * 100:.2f}%")
        expect(line.locator(".arm-ci")).to_have_text(f"{arm['ci_low'] * 100:.2f}% – {arm['ci_high'] * 100:.2f}%")
        expect(line.locator(".arm-n")).to_have_text("3")
        expect(line.locator(".arm-speed")).to_have_text(js_num(arm["samples_per_s"]))
        expect(line.locator(".arm-wall")).to_have_text(re.compile(r"^\d+ s$"))
    # The arms' plot: means, intervals and each seed's best where their values are.
    expect(p.locator("#arms-plot circle.dot")).to_have_count(6)
    arms_plot = read_plot(p, "#arms-plot")
    for index, arm in enumerate(verdict["arms"]):
        dots = [bests[index, seed] for seed in range(3)]
        assert dots == pytest.approx([BEST[index, seed] for seed in range(3)], abs=1e-6)
        arms_plot.check_row(index, arm["mean"], arm["ci_low"], arm["ci_high"], dots)

    # The paired difference against the margin band, and its table.
    difference = verdict["difference"]
    plot = read_plot(p, "#difference-plot")
    paired = [bests[0, seed] - bests[1, seed] for seed in range(3)]
    plot.check_row(0, difference["mean"], difference["ci_low"], difference["ci_high"], paired)
    x, width, band_low, band_high = plot.band
    margin = verdict["margin"]
    assert margin == pytest.approx(0.005) and (band_low, band_high) == (pytest.approx(-margin), pytest.approx(margin))
    assert x == pytest.approx(plot.at(-margin), abs=0.01) and x + width == pytest.approx(plot.at(margin), abs=0.01)
    assert plot.zero == pytest.approx(plot.at(0.0), abs=0.01)
    diff_row = p.locator('#difference-table tr[data-arm="1"]')
    expect(diff_row.locator(".diff-mean")).to_have_text(f"+{difference['mean'] * 100:.2f} points")
    expect(diff_row.locator(".diff-pairs")).to_have_text("3")
    expect(diff_row.locator(".diff-p")).to_have_text(js_num(difference["p_value"], 3))
    expect(diff_row.locator(".diff-cost")).to_have_text(f"{js_num(verdict['cost_ratio'], 3)}×")

    # Every trial is linked, with its status and best value; an arm-1 trial links to its comparison with arm 0.
    expect(p.locator("#trial-rows tr")).to_have_count(len(trials))
    for (arm, seed), job_id in trials.items():
        line = p.locator(f'#trial-rows tr[data-job-id="{job_id}"]')
        expect(line).to_have_attribute("data-status", "succeeded")
        expect(line.locator("a.trial-link")).to_have_attribute("href", f"#/jobs/{job_id}")
        expect(line.locator(".trial-best")).to_have_text(f"{bests[arm, seed] * 100:.2f}%")
        if arm == 1:
            compare = f"#/compare?a={trials[0, seed]}&b={job_id}"
            expect(line.locator("a.button")).to_have_attribute("href", compare)

    # The trials' curves overlaid: every trial is a series of each chart.
    expect(p.locator("#study-loss")).to_have_attribute("data-points", str(len(STEPS)))
    expect(p.locator("#study-accuracy")).to_have_attribute("data-points", "2")
    legend = p.locator("#study-accuracy .u-legend")
    for label in ("sync_bn=true", "sync_bn=false"):
        for seed in range(3):
            expect(legend).to_contain_text(f"{label} · seed {seed} validation")

    # The local arm's skew: one trial's heatmap (seed 0 first), and the verdict's ranking of the layers.
    heatmap = p.locator("#study-heatmap")
    expect(heatmap).to_have_attribute("data-job", trials[1, 0])
    expect(heatmap).to_have_attribute("data-rows", str(len(LAYERS)))
    expect(heatmap).to_have_attribute("data-columns", str(len(LAYER_STEPS)))
    assert p.locator("#study-heatmap .heatmap-row").all_inner_texts() == list(LAYERS)
    ranked = p.locator("#verdict-layers tr[data-layer]")
    expect(ranked).to_have_count(len(verdict["layers"]))
    assert [layer["layer"] for layer in verdict["layers"]] == list(reversed(LAYERS))
    for index, layer in enumerate(verdict["layers"]):
        expect(ranked.nth(index)).to_have_attribute("data-layer", layer["layer"])
        expect(ranked.nth(index).locator(".layer-share")).to_have_text(js_num(layer["between_share_mean"]))
    p.select_option("#skew-trial", trials[1, 2])
    expect(heatmap).to_have_attribute("data-job", trials[1, 2])
    expect(heatmap).to_have_attribute("data-state", "ready")
    page.shot("study")

    # A trial's link opens its job page, which links back to the study.
    p.locator(f'#trial-rows tr[data-job-id="{trials[0, 1]}"] a.trial-link').click()
    expect(p.locator("#job-study")).to_have_attribute("href", f"#/studies/{study_id}")
    page.assert_clean()


def test_a_study_followed_live_gets_its_verdict_and_is_cancelled(server: LiveServer, open_page: Any) -> None:
    study_id, trials = create_study(server, "live study", seeds=3)
    page = open_page(f"{server.url}/#/studies/{study_id}")
    p = page.page
    expect(p.locator("#stream-state")).to_have_attribute("data-state", "live")
    expect(p.locator("#study-verdict [data-outcome]")).to_have_attribute("data-outcome", "none")
    expect(p.locator("#page")).to_have_attribute("data-status", "queued")

    # Seeds 0 and 1 of both arms end while the page is open: two pairs, so a verdict, while seed 2 waits.
    for seed in (0, 1):
        for arm in (0, 1):
            finish_trial(server, trials[arm, seed], arm, seed)
    with server.client() as client:
        study = client.get(f"/v1/studies/{study_id}").json()
    assert study["status"] == "running" and study["verdict"] is not None
    expect(p.locator("#verdict-sentence")).to_have_text(study["verdict"]["sentence"])
    expect(p.locator("#page")).to_have_attribute("data-status", "running")
    for seed in (0, 1):
        for arm in (0, 1):
            expect(p.locator(f'#trial-rows tr[data-job-id="{trials[arm, seed]}"]')).to_have_attribute(
                "data-status", "succeeded"
            )
    expect(p.locator("#arms-plot circle.dot")).to_have_count(4)
    expect(p.locator("#arm-rows .arm-n").first).to_have_text("2")

    # Cancel: the waiting trials are cancelled, the study reads cancelled, the verdict so far stays.
    p.click("#cancel-study")  # the confirmation dialog is accepted
    expect(p.locator("#page")).to_have_attribute("data-status", "cancelled")
    for arm in (0, 1):
        waiting = p.locator(f'#trial-rows tr[data-job-id="{trials[arm, 2]}"]')
        expect(waiting).to_have_attribute("data-status", "cancelled")
    expect(p.locator("#cancel-study")).to_have_count(0)
    expect(p.locator("#verdict-sentence")).to_have_text(study["verdict"]["sentence"])
    with server.client() as client:
        after = client.get(f"/v1/studies/{study_id}").json()
    assert after["status"] == "cancelled" and after["verdict"]["sentence"] == study["verdict"]["sentence"]
    assert {t["status"] for t in after["trials"] if t["seed"] == 2} == {"cancelled"}
    page.shot("cancelled")
    page.assert_clean()


def test_the_new_study_form_shows_422s_at_the_field_and_submits(server: LiveServer, open_page: Any) -> None:
    page = open_page(f"{server.url}/#/studies/new")
    p = page.page
    expect(p.locator("#spec-form")).to_be_visible()
    # Built from the study's schema: the base is the whole job spec, then the study's own fields.
    for name in ("name", "base.model", "base.workers", "base.optimizer.lr", "seeds", "metric", "confidence", "margin"):
        expect(p.locator(f'[name="{name}"]')).to_have_count(1)
    with server.client() as client:
        models = [entry["name"] for entry in client.get("/v1/models").json()["data"]]
        studies_before = client.get("/v1/studies").json()["count"]
    assert p.locator('[name="base.model"] option').evaluate_all("options => options.map(o => o.value)") == models
    expect(p.locator('[name="seeds"]')).to_have_value("3")
    expect(p.locator('[name="arms.0.sync_bn"]')).to_have_value("true")
    expect(p.locator('[name="arms.1.sync_bn"]')).to_have_value("false")

    def submit_and_expect(field: str, *words: str) -> None:
        p.click("#submit-study")
        error = p.locator(f'[data-error-for="{field}"]')
        for word in words:
            expect(error).to_contain_text(word)

    p.fill('[name="seeds"]', "1")
    submit_and_expect("seeds", "seeds must be between 2 and 10")
    expect(p.locator('[name="seeds"]')).to_have_attribute("aria-invalid", "true")

    p.fill('[name="seeds"]', "2")
    p.fill('[name="arms.1.batch_size"]', "0")
    submit_and_expect("arms", "arms.1.batch_size", "greater than or equal to 1")
    expect(p.locator('[data-error-for="seeds"]')).to_be_hidden()
    expect(p.locator('tr[data-arm="1"]')).to_have_class(re.compile(r"\binvalid\b"))
    expect(p.locator('[name="arms.1.batch_size"]')).to_have_attribute("aria-invalid", "true")

    p.fill('[name="arms.1.batch_size"]', "")
    p.select_option('[name="arms.1.sync_bn"]', "true")
    submit_and_expect("arms", "arms[1] runs the same job as arms[0]")
    p.select_option('[name="arms.1.sync_bn"]', "false")

    p.fill('[name="base.optimizer.lr"]', "0")
    submit_and_expect("base.optimizer.lr", "base.optimizer.lr: input should be greater than 0")
    p.fill('[name="base.optimizer.lr"]', "0.1")

    # A check of the whole base lands on the field its sentence names (written without the `base.` prefix).
    p.fill('[name="base.epochs"]', "1")
    p.fill('[name="base.lr_schedule.warmup_epochs"]', "2")
    submit_and_expect("base.lr_schedule.warmup_epochs", "warmup_epochs must be smaller than epochs")
    p.fill('[name="base.lr_schedule.warmup_epochs"]', "0")
    page.shot("form-errors")
    with server.client() as client:
        assert client.get("/v1/studies").json()["count"] == studies_before, "no refused submission made a study"

    for name, value in {
        "name": "form study",
        "base.workers": "2",
        "base.cpus_per_worker": "1",
        "base.batch_size": "8",
        "base.steps_per_epoch": "2",
        "seeds": "4, 9",
        "margin": "0.01",
    }.items():
        p.fill(f'[name="{name}"]', value)
    p.select_option('[name="base.dataset.kind"]', "digits")
    p.select_option('[name="metric"]', "val_loss")
    p.click("#submit-study")
    p.wait_for_url(re.compile(r"#/studies/[0-9a-f]{32}$"))
    study_id = p.url.rsplit("/", 1)[1]
    expect(p.locator("#study-title")).to_have_text("form study")
    with server.client() as client:
        study = client.get(f"/v1/studies/{study_id}").json()
        client.delete(f"/v1/studies/{study_id}")
    spec = study["spec"]
    assert (spec["seeds"], spec["margin"], spec["metric"], spec["confidence"]) == ([4, 9], 0.01, "val_loss", 0.95)
    assert spec["arms"] == [{"sync_bn": True}, {"sync_bn": False}]
    base = spec["base"]
    assert (base["workers"], base["batch_size"], base["steps_per_epoch"], base["epochs"]) == (2, 8, 2, 1)
    assert base["dataset"]["kind"] == "digits" and base["optimizer"]["lr"] == 0.1
    assert [(t["arm"], t["seed"]) for t in study["trials"]] == [(0, 4), (1, 4), (0, 9), (1, 9)]
    page.assert_clean()


def test_the_job_pages_study_button_fills_the_form_with_the_job(server: LiveServer, open_page: Any) -> None:
    spec = JobSpec.model_validate(
        tiny_spec(name="button-job", batch_size=12, seed=5, sync_group_size=2, optimizer={"name": "sgd", "lr": 0.05})
    ).model_dump(mode="json")
    job_id = uuid.uuid4().hex
    server.app.state.store.create_job(job_id, spec)

    page = open_page(f"{server.url}/#/jobs/{job_id}")
    p = page.page
    p.click("#study-syncbn")
    p.wait_for_url(re.compile(rf"#/studies/new\?from={job_id}$"))
    expect(p.locator("#form-note")).to_contain_text("button-job")
    expect(p.locator('[name="name"]')).to_have_value("button-job: is SyncBN worth it?")
    filled = {"base.batch_size": "12", "base.seed": "5", "base.optimizer.lr": "0.05", "base.sync_group_size": "2"}
    for name, value in filled.items():
        expect(p.locator(f'[name="{name}"]')).to_have_value(value)
    expect(p.locator('[name="base.model"]')).to_have_value(spec["model"])
    expect(p.locator('[name="seeds"]')).to_have_value("3")
    expect(p.locator('[name="arms.0.sync_bn"]')).to_have_value("true")
    expect(p.locator('[name="arms.1.sync_bn"]')).to_have_value("false")
    # Local BatchNorm has no groups: the second arm clears the job's group size.
    expect(p.locator('[name="arms.1.sync_group_size"]')).to_have_value("null")
    page.shot("prefilled")

    p.click("#submit-study")
    p.wait_for_url(re.compile(r"#/studies/[0-9a-f]{32}$"))
    study_id = p.url.rsplit("/", 1)[1]
    with server.client() as client:
        study = client.get(f"/v1/studies/{study_id}").json()
        client.delete(f"/v1/studies/{study_id}")
    assert study["spec"]["base"] == spec, "the form sent the job's spec back unchanged as the base"
    assert study["spec"]["arms"] == [{"sync_bn": True}, {"sync_bn": False, "sync_group_size": None}]
    assert study["spec"]["seeds"] == 3 and study["name"] == "button-job: is SyncBN worth it?"
    page.assert_clean()
