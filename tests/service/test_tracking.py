"""Runs mirrored to MLflow and TensorBoard: what a real `mlflow server` holds after a job, what TensorBoard's own
reader finds in the event files, and that a tracker that fails never fails the job (its failures are logged on
the job and counted in the service's Prometheus metrics).

The MLflow server is the full `mlflow` package in a tool environment of its own (`make mlflow-venv` builds
`.venv-mlflow` from `constraints-mlflow.txt`; `make test` does it first): its pins (pyarrow < 26) do not fit the
service's. The jobs log through `mlflow-skinny`, the client the service installs. The server runs on a free
loopback port with an SQLite backend and a local artifact folder, started here and stopped by its pid.
Two short digits jobs (2 epochs of 4 steps): one against the live server, one through the REST service with
TensorBoard and an MLflow server that is not there.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.cli import main
from service.engine.runner import JobRun, launch_run
from service.engine.tracking import LAYER_SCALARS, RunTracker, check_tracking, flatten_spec, normalize_tracking_uri
from service.settings import Settings
from service.spec import JobSpec
from tests.service.conftest_api import LiveServer, free_port, tiny_spec, wait_for

pytestmark = pytest.mark.timeout(600)  # the MLflow server's start (its database migrations) counts in the first test

REPO = Path(__file__).resolve().parents[2]
#: The `mlflow` command of the tool environment (SYNCBN_MLFLOW_BIN overrides it).
MLFLOW_BIN = Path(os.environ.get("SYNCBN_MLFLOW_BIN", REPO / ".venv-mlflow" / "bin" / "mlflow"))
TRACKING_JOB = {
    "model": "small_resnet",
    "workers": 2,
    "epochs": 2,
    "batch_size": 16,
    "steps_per_epoch": 4,
    "stats_every": 2,
    "checkpoint_every": 0,
    "seed": 3,
    "optimizer": {"name": "sgd", "lr": 0.1},
}


# ------------------------------------------------------------------ the spec, the allow-list (no Ray)


def test_tracking_section_validates_and_refuses_what_it_must() -> None:
    spec = JobSpec(
        tracking={"mlflow": {"tracking_uri": "http://mlflow:5000", "experiment_name": "e"}, "tensorboard": {}}
    )
    assert spec.tracking is not None and spec.tracking.mlflow is not None
    assert spec.tracking.mlflow.log_model is True and spec.tracking.tensorboard.histograms is True
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec  # a dumped spec validates again
    refused = {
        "no tracker": {},
        "file store": {"mlflow": {"tracking_uri": "file:///etc", "experiment_name": "e"}},
        "plugin scheme": {"mlflow": {"tracking_uri": "databricks://profile", "experiment_name": "e"}},
        "credentials": {"mlflow": {"tracking_uri": "http://u:p@mlflow:5000", "experiment_name": "e"}},
        "unknown field": {"mlflow": {"tracking_uri": "http://mlflow:5000", "experiment_name": "e", "token": "x"}},
        "empty experiment": {"mlflow": {"tracking_uri": "http://mlflow:5000", "experiment_name": ""}},
    }
    messages = {}
    for case, tracking in refused.items():
        with pytest.raises(ValueError) as caught:
            JobSpec(tracking=tracking)
        messages[case] = str(caught.value)
    assert "mlflow and/or tensorboard" in messages["no tracker"]
    assert "http:// or https://" in messages["file store"] and "'file'" in messages["file store"]
    assert "'databricks'" in messages["plugin scheme"]
    assert "MLFLOW_TRACKING_TOKEN" in messages["credentials"]
    assert "token" in messages["unknown field"]


def test_only_allowed_tracking_servers_pass_and_spellings_of_one_server_match() -> None:
    assert normalize_tracking_uri("HTTP://MLflow.Example:80/") == "http://mlflow.example:80"
    assert normalize_tracking_uri("https://[::1]/mlflow/") == "https://[::1]:443/mlflow"
    allowed = ["http://mlflow.internal:5000"]
    check_tracking(JobSpec().tracking, [])  # no tracking: nothing to allow
    check_tracking(JobSpec(tracking={"tensorboard": {}}).tracking, [])  # TensorBoard needs no allow-list
    check_tracking(
        JobSpec(tracking={"mlflow": {"tracking_uri": "http://MLFLOW.internal:5000/", "experiment_name": "e"}}).tracking,
        allowed,
    )
    for uri in ("http://mlflow.internal:5001", "http://169.254.169.254", "https://mlflow.internal:5000"):
        tracking = JobSpec(tracking={"mlflow": {"tracking_uri": uri, "experiment_name": "e"}}).tracking
        with pytest.raises(ValueError, match=r"tracking\.mlflow\.tracking_uri .*SYNCBN_TRACKING_URIS"):
            check_tracking(tracking, allowed)
    settings = Settings(tracking_uris="http://a:5000, https://b")  # the environment's comma-separated form
    assert settings.tracking_uris == ["http://a:5000", "https://b"]
    with pytest.raises(ValueError, match="tracking_uris"):
        Settings(tracking_uris="file:///tmp/mlruns")


def test_cli_train_refuses_a_tracking_server_the_environment_does_not_allow(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_path = tmp_path / "spec.json"
    tracking = {"mlflow": {"tracking_uri": "http://10.0.0.1:5000", "experiment_name": "e"}}
    spec_path.write_text(json.dumps({"tracking": tracking}))
    monkeypatch.setenv("SYNCBN_TRACKING_URIS", "http://127.0.0.1:5000")
    assert main(["train", str(spec_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'http://10.0.0.1:5000' is not a tracking server" in err and "http://127.0.0.1:5000" in err


def test_the_spec_flattens_into_mlflow_params() -> None:
    flat = flatten_spec(JobSpec(**TRACKING_JOB).model_dump(mode="json"))
    assert flat["optimizer.lr"] == "0.1" and flat["optimizer.name"] == "sgd"
    assert flat["dataset.kind"] == "digits" and flat["dataset.input_shape"] == "[3, 16, 16]"
    assert flat["sync_bn"] == "true" and flat["name"] == "null" and flat["tracking"] == "null"


def test_a_pickled_tracker_writes_each_step_once_even_when_a_restarted_group_repeats_it(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = JobSpec(tracking={"tensorboard": {"histograms": False}})
    # Built by the job's driver, used in the Ray Train controller: it travels pickled, before any thread exists.
    tracker = pickle.loads(pickle.dumps(RunTracker(spec, "job-x", str(tmp_path), "syncbn-job-x")))

    def step(n: int) -> dict[str, Any]:
        return {"kind": "step", "step": n, "epoch": 1, "train_loss": 1 / n, "lr": 0.1, "samples_per_s": 9.0}

    tracker.submit([step(2), step(4)])
    tracker.submit([step(4), step(6)])  # a worker group restarted from a checkpoint reports step 4 again
    tracker.submit([{"kind": "summary", "verdict": "completed"}])
    lines = [record["message"] for record in tracker.close(failed=False)]
    assert "tracking: tensorboard: run ended FINISHED; 0 failure(s)" in lines, lines

    events = EventAccumulator(str(tmp_path / "syncbn-job-x" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("step/train_loss")] == [
        (2, pytest.approx(0.5)),
        (4, pytest.approx(0.25)),
        (6, pytest.approx(1 / 6)),
    ]
    assert "step/step_time_s" not in events.Tags()["scalars"]  # a field the record lacks is not invented
    assert not events.Tags()["histograms"]


# ------------------------------------------------------------------ a real MLflow server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with an SQLite backend on a free loopback port; yields its URI."""
    if not MLFLOW_BIN.exists():
        pytest.skip(f"no MLflow server at {MLFLOW_BIN}: run `make mlflow-venv` (make test does)")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [
            str(MLFLOW_BIN),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # the server's job runner (a second process for MLflow's own server-side jobs) is not needed here
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: the server's workers stop with it
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"{uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 240, "the mlflow server to answer /health", interval=0.5)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


def _follow(run: JobRun, timeout: float = 300.0) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not records or records[-1]["kind"] != "end":
        records.extend(run.poll(records[-1]["seq"] if records else 0))
        assert time.monotonic() < deadline, f"run {run.job_id} did not end in {timeout} s: {records[-3:]}"
        time.sleep(0.2)
    return records


def test_a_job_logs_params_metrics_layer_summaries_and_its_model_to_mlflow(
    ray_cluster: dict, mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    job_id = f"track-{uuid.uuid4().hex[:8]}"
    tracking = {"mlflow": {"tracking_uri": mlflow_server, "experiment_name": "syncbn-tests", "run_name": "digits"}}
    spec = JobSpec(**TRACKING_JOB, tracking=tracking)
    run = launch_run(spec, job_id, tmp_path)
    records = _follow(run)
    run.close()
    end = records[-1]
    logs = [r["message"] for r in records if r["kind"] == "log"]
    assert end["status"] == "succeeded", (end, logs)
    assert not [r for r in records if r.get("tracking_failure")], logs
    assert any(m.startswith("tracking: mlflow: logging to run") for m in logs), logs
    assert "tracking: mlflow: run ended FINISHED; 0 failure(s)" in logs

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("syncbn-tests")
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`syncbn.job_id` = '{job_id}'")
    assert found.info.status == "FINISHED" and found.info.run_name == "digits"
    assert found.data.params["optimizer.lr"] == "0.1" and found.data.params["model"] == "small_resnet"
    assert found.data.params["tracking.mlflow.experiment_name"] == "syncbn-tests"

    steps = [r for r in records if r["kind"] == "step"]
    history = client.get_metric_history(found.info.run_id, "step/train_loss")
    assert [m.step for m in history] == [s["step"] for s in steps] == [2, 4, 6, 8]
    assert [m.value for m in history] == pytest.approx([s["train_loss"] for s in steps])
    epochs = [r for r in records if r["kind"] == "epoch"]
    val_acc = client.get_metric_history(found.info.run_id, "epoch/val_acc")
    assert [(m.step, m.value) for m in val_acc] == [(e["epoch"], pytest.approx(e["val_acc"])) for e in epochs]

    layers = [r for r in records if r["kind"] == "layers"]
    assert layers
    for name, summary in layers[-1]["layers"].items():
        for key in LAYER_SCALARS:
            series = client.get_metric_history(found.info.run_id, f"layer/{name}/{key}")
            if summary[key] is not None:
                assert series[-1].step == layers[-1]["step"] and series[-1].value == pytest.approx(summary[key])
    share = client.get_metric_history(found.info.run_id, "layer/stem.1/skew_between_share_mean")
    assert len(share) == len(layers) and all(0.0 <= m.value <= 1.0 for m in share)

    assert [a.path for a in client.list_artifacts(found.info.run_id, "model")] == ["model/model.pt"]
    downloaded = Path(client.download_artifacts(found.info.run_id, "model/model.pt", str(tmp_path / "dl")))
    assert downloaded.read_bytes() == Path(end["model_path"]).read_bytes()
    state = torch.load(downloaded, weights_only=True)
    assert "stem.1.running_mean" in state  # the saved model is a plain BatchNorm state dict


# ------------------------------------------------------------------ TensorBoard, and a tracker that fails


def test_tensorboard_events_and_a_failing_mlflow_that_does_not_fail_the_job(ray_cluster: dict, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = Settings(data_dir=tmp_path, tracking_uris=[dead])
    with LiveServer(settings) as server, server.client() as client:
        elsewhere = {"mlflow": {"tracking_uri": "http://127.0.0.1:1", "experiment_name": "e"}}
        refused = client.post("/v1/jobs", json=tiny_spec(tracking=elsewhere))
        assert refused.status_code == 422, refused.text
        assert "tracking.mlflow.tracking_uri" in refused.text and "SYNCBN_TRACKING_URIS" in refused.text

        tracking = {"mlflow": {"tracking_uri": dead, "experiment_name": "e"}, "tensorboard": {}}
        created = client.post("/v1/jobs", json=tiny_spec(**TRACKING_JOB, tracking=tracking))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        job = wait_for(
            lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
            300,
            "the job to end",
            interval=0.5,
        )
        lines = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()["data"]]
        assert job["status"] == "succeeded", (job["error"], lines)
        failures = [m for m in lines if m.startswith("tracking: mlflow:") and "failed" in m]
        assert len(failures) == 3 and all("starting the run failed" in m for m in failures), failures
        assert any("switched off after 3 failures in a row" in m for m in lines), lines
        assert "tracking: mlflow: 3 failure(s); nothing was logged" in lines
        assert "tracking: tensorboard: run ended FINISHED; 0 failure(s)" in lines
        counted = client.get("/metrics").text
        assert 'syncbn_tracking_failures_total{tracker="mlflow"} 3.0' in counted, counted

        steps = client.get(f"/v1/jobs/{job_id}/metrics").json()["steps"]
        epochs = client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]
        layers = client.get(f"/v1/jobs/{job_id}/layers").json()

    logdir = tmp_path / "storage" / f"syncbn-{job_id}" / "tensorboard"
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    loss = events.Scalars("step/train_loss")
    assert [e.step for e in loss] == [s["step"] for s in steps] == [2, 4, 6, 8]
    assert [e.value for e in loss] == pytest.approx([s["train_loss"] for s in steps], rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("epoch/val_acc")] == [
        (e["epoch"], pytest.approx(e["val_acc"], rel=1e-6)) for e in epochs
    ]
    assert "layer/stem.1/skew_between_share_mean" in tags["scalars"]
    for name, layer in layers["layers"].items():
        for row, tag in (("mean", "batch_mean"), ("var", "batch_var")):
            histogram = events.Histograms(f"layer/{name}/{tag}")
            assert [h.step for h in histogram][-1] == layers["step"]
            last = histogram[-1].histogram_value
            assert last.num == len(layer[row]) == layer["channels"]
            assert last.min == pytest.approx(min(layer[row]), rel=1e-6)
            assert last.max == pytest.approx(max(layer[row]), rel=1e-6)
            assert last.sum == pytest.approx(sum(layer[row]), rel=1e-5, abs=1e-6)
