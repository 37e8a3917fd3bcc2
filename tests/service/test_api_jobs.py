"""Real jobs through the real service: a small digits job is submitted, followed live by Server-Sent Events and
read back (metrics, per-layer statistics, logs, the final model); a second job waits in the queue behind it,
survives a restart of the service (its run is re-attached, since the session's Ray lives on), and is cancelled,
after which Ray's CPUs come back; a job whose data cannot be used fails with the reason and the service stays up.

The tests of this module run in order on one data folder: each step continues the story of the previous one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from service.settings import Settings
from tests.service.conftest_api import LiveServer, read_events, tiny_spec, wait_for

pytestmark = pytest.mark.timeout(300)


class Story:
    """What the steps of the module share: the settings, the current server and the jobs' ids."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = LiveServer(settings).start()
        self.first: dict[str, Any] = {}
        self.second: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.free_cpus_before = 0.0

    def client(self) -> httpx.Client:
        return self.server.client()

    def restart(self) -> None:
        self.server.stop()
        self.server = LiveServer(self.settings).start()


@pytest.fixture(scope="module")
def story(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    data_dir = tmp_path_factory.mktemp("jobs")
    (data_dir / "npz").mkdir()
    np.savez(data_dir / "npz" / "flat.npz", x=np.zeros((64, 10), np.float32), y=np.arange(64) % 2)
    story = Story(Settings(data_dir=data_dir, max_concurrent_jobs=1, cancel_wait_s=60))
    yield story
    with story.client() as client:  # leave no run behind in the session's Ray
        for job in client.get("/v1/jobs", params={"limit": 500}).json()["data"]:
            if job["status"] in ("queued", "running"):
                client.post(f"/v1/jobs/{job['id']}/cancel")
    story.server.stop()


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_a_job_whose_data_does_not_fit_the_model_fails_with_the_reason(story: Story) -> None:
    with story.client() as client:
        spec = tiny_spec(model="cnn", dataset={"kind": "npz", "path": "flat.npz"})
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        events = read_events(client, job_id, timeout=120)
        failed = job(client, job_id)
        assert failed["status"] == "failed"
        assert "needs image samples" in failed["error"] and "mlp" in failed["error"], failed["error"]
        assert events[-2]["event"] == "status" and events[-2]["data"]["status"] == "failed"
        assert any(line["level"] == "error" for line in client.get(f"/v1/jobs/{job_id}/logs").json()["data"])
        assert client.get("/healthz").status_code == 200
        assert client.get(f"/v1/jobs/{job_id}/model").status_code == 409


def test_a_small_job_is_followed_live_to_the_end(story: Story) -> None:
    with story.client() as client:
        story.free_cpus_before = client.get("/v1/cluster").json()["available_cpus"]
        first = client.post("/v1/jobs", json=tiny_spec()).json()
        second_spec = tiny_spec(name="long", epochs=50, steps_per_epoch=40, stats_every=5, seed=3)
        second = client.post("/v1/jobs", json=second_spec).json()
        assert second["status"] == "queued" and second["queue_position"] == 1, "one job at a time: it waits"
        story.first, story.second = first, second

        events = read_events(client, first["id"])
        story.events = events
        assert [e["id"] for e in events] == list(range(1, len(events) + 1)), "event ids are gap-free from 1"
        statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        assert events[-1]["event"] == "log" and events[-2]["data"]["status"] == "succeeded"

        done = job(client, first["id"])
        assert done["status"] == "succeeded" and done["error"] is None and done["has_model"]
        summary = done["summary"]
        assert summary["epochs_done"] == 2 and summary["verdict"] == "completed"
        assert 0 < summary["best_val_acc"] <= 1 and math.isfinite(summary["final_train_loss"])
        assert summary["last_step"] == 8 and done["started_at"] <= done["finished_at"]

        metrics = client.get(f"/v1/jobs/{first['id']}/metrics").json()
        assert [p["step"] for p in metrics["steps"]] == [2, 4, 6, 8]
        assert [e["data"] for e in events if e["event"] == "step"] == metrics["steps"], "SSE = stored points"
        assert [p["epoch"] for p in metrics["epochs"]] == [1, 2]
        assert [e["data"] for e in events if e["event"] == "epoch"] == metrics["epochs"]
        assert metrics["epochs"][-1]["val_acc"] == summary["final_val_acc"]
        assert all(p["lr"] == 0.1 and p["samples_per_s"] > 0 for p in metrics["steps"])

        layer_events = [e["data"] for e in events if e["event"] == "layers"]
        assert [e["step"] for e in layer_events] == [2, 4, 6, 8]
        logs = client.get(f"/v1/jobs/{first['id']}/logs").json()["data"]
        assert any(line["source"] == "run" and "2 workers" in line["message"] for line in logs)

        waiting = job(client, second["id"])
        assert waiting["status"] in ("queued", "running")
        if waiting["started_at"]:
            assert waiting["started_at"] >= done["finished_at"], "the queued job started only after the first"


def test_reconnecting_with_last_event_id_misses_nothing(story: Story) -> None:
    events = story.events
    with story.client() as client:
        for last in (3, len(events) // 2, len(events) - 1):
            assert read_events(client, story.first["id"], last_event_id=last) == events[last:]
        assert read_events(client, story.first["id"], last_event_id=len(events)) == []
        query = client.get(f"/v1/jobs/{story.first['id']}/events", params={"after": len(events) - 1})
        assert query.text.count("\nid: ") + query.text.startswith("id: ") == 1


def test_layer_statistics_latest_by_step_and_history(story: Story) -> None:
    job_id = story.first["id"]
    with story.client() as client:
        latest = client.get(f"/v1/jobs/{job_id}/layers").json()
        assert latest["step"] == 8 and latest["recorded_steps"] == [2, 4, 6, 8]
        names = list(latest["layers"])
        assert "stem.1" in names and any(name.endswith(".bn1") for name in names)
        stem = latest["layers"]["stem.1"]
        assert stem["synchronized"] and stem["ranks"] == 2 and stem["ranks_agree"] is True
        assert len(stem["mean"]) == len(stem["var"]) == stem["channels"] == 16
        assert stem["dead_channels"] == 0 and 0 <= stem["skew_between_share_mean"] <= 1
        assert stem["count"] == sum(stem["per_rank_count"])

        at_four = client.get(f"/v1/jobs/{job_id}/layers", params={"step": 4}).json()
        assert at_four["step"] == 4 and set(at_four["layers"]) == set(names)
        assert at_four["layers"]["stem.1"]["mean"] != stem["mean"]
        summary_only = client.get(f"/v1/jobs/{job_id}/layers", params={"channels": False}).json()
        assert "mean" not in summary_only["layers"]["stem.1"]
        assert summary_only["layers"]["stem.1"]["batch_var_mean"] == stem["batch_var_mean"]

        history = client.get(f"/v1/jobs/{job_id}/layers/stem.1").json()
        assert [p["step"] for p in history["points"]] == [2, 4, 6, 8]
        assert history["points"][-1]["stats"] == stem
        later = client.get(f"/v1/jobs/{job_id}/layers/stem.1", params={"since_step": 4}).json()
        assert [p["step"] for p in later["points"]] == [6, 8]


def test_layer_statistics_in_the_binary_form_equal_the_json(story: Story) -> None:
    """`Accept: application/x-safetensors` gives the same numbers as JSON, as float32 tensors that the
    safetensors library itself reads (the dashboard's form). JSON writes float32 at its shortest precision,
    which reads back as the same float32."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is a dev dependency")
    job_id = story.first["id"]
    binary = {"Accept": "application/x-safetensors"}
    with story.client() as client:
        history = client.get(f"/v1/jobs/{job_id}/layers/stem.1").json()
        response = client.get(f"/v1/jobs/{job_id}/layers/stem.1", headers=binary)
        assert response.headers["content-type"] == "application/x-safetensors"
        tensors = safetensors_numpy.load(response.content)
        latest = client.get(f"/v1/jobs/{job_id}/layers").json()
        at_step = client.get(f"/v1/jobs/{job_id}/layers", headers=binary)
    assert tensors["step"].tolist() == [p["step"] for p in history["points"]]
    assert tensors["epoch"].tolist() == [p["epoch"] for p in history["points"]]
    for key in ("mean", "var", "running_mean", "running_var"):
        assert tensors[key].dtype == np.float32 and tensors[key].shape == (4, 16)
        as_json = [[math.nan if v is None else v for v in p["stats"][key]] for p in history["points"]]
        np.testing.assert_array_equal(tensors[key], np.array(as_json, dtype=np.float32), err_msg=key)
    # The same file read by hand, as the dashboard does: the header names the summaries of every point.
    size = int.from_bytes(response.content[:8], "little")
    header = json.loads(response.content[8 : 8 + size])
    assert size % 8 == 0 and header["__metadata__"]["format"] == '"syncbn.layer-history.v1"'
    summaries = json.loads(header["__metadata__"]["summaries"])
    assert summaries[-1] == {k: v for k, v in history["points"][-1]["stats"].items() if k not in tensors}

    layers = safetensors_numpy.load(at_step.content)
    np.testing.assert_array_equal(layers["stem.1.mean"], np.array(latest["layers"]["stem.1"]["mean"], np.float32))
    assert {name.rsplit(".", 1)[0] for name in layers} == set(latest["layers"])


def test_the_final_model_is_a_plain_batchnorm_state_dict(story: Story, tmp_path: Path) -> None:
    from service.engine.model_registry import build_model

    with story.client() as client:
        response = client.get(f"/v1/jobs/{story.first['id']}/model")
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    path = tmp_path / "model.pt"
    path.write_bytes(response.content)
    state = torch.load(path, weights_only=True)
    model = build_model("small_resnet", (1, 8, 8), 10)
    model.load_state_dict(state, strict=True)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(type(m) is torch.nn.BatchNorm2d for m in batchnorms)


def test_the_queued_job_runs_next_and_survives_a_service_restart(story: Story) -> None:
    second_id = story.second["id"]
    with story.client() as client:
        wait_for(
            lambda: client.get(f"/v1/jobs/{second_id}/metrics").json()["steps"],
            120,
            "the second job to report its first steps",
        )
        running = job(client, second_id)
        assert running["status"] == "running"
        assert running["started_at"] >= job(client, story.first["id"])["finished_at"]
        steps_before = len(client.get(f"/v1/jobs/{second_id}/metrics").json()["steps"])
        first_metrics = client.get(f"/v1/jobs/{story.first['id']}/metrics").json()

    story.restart()  # same data folder; the session's Ray (and so the run) lives on

    with story.client() as client:
        again = job(client, second_id)
        assert again["status"] == "running", "a run that survived is re-attached, not failed"
        messages = [line["message"] for line in client.get(f"/v1/jobs/{second_id}/logs").json()["data"]]
        assert any("re-attached" in message for message in messages)
        wait_for(
            lambda: len(client.get(f"/v1/jobs/{second_id}/metrics").json()["steps"]) > steps_before + 1,
            60,
            "new steps of the re-attached run",
        )
        steps = [p["step"] for p in client.get(f"/v1/jobs/{second_id}/metrics").json()["steps"]]
        assert steps == sorted(set(steps)), "no step stored twice across the restart"
        assert client.get(f"/v1/jobs/{story.first['id']}/metrics").json() == first_metrics
        assert job(client, story.first["id"])["status"] == "succeeded"


def test_cancel_stops_the_run_and_frees_its_workers(story: Story) -> None:
    second_id = story.second["id"]
    with story.client() as client:
        busy = client.get("/v1/cluster").json()["available_cpus"]
        assert busy <= story.free_cpus_before - 2, "the running job holds its 2 workers' CPUs"
        response = client.post(f"/v1/jobs/{second_id}/cancel")
        assert response.status_code == 200, response.text
        cancelled = response.json()
        assert cancelled["status"] == "cancelled" and cancelled["error"] == "cancelled on request"
        wait_for(
            lambda: client.get("/v1/cluster").json()["available_cpus"] >= story.free_cpus_before,
            60,
            "Ray's CPUs to come back after the cancel",
        )
        conflict = client.post(f"/v1/jobs/{second_id}/cancel")
        assert conflict.status_code == 409 and "already ended" in conflict.json()["detail"]
        events = read_events(client, second_id, timeout=30)
        assert events[-2]["data"]["status"] == "cancelled", "the stream ends with the final status"
        assert client.get(f"/v1/jobs/{second_id}/model").status_code == 409


def test_delete_removes_a_finished_job_and_its_files(story: Story) -> None:
    job_id = story.first["id"]
    folder = story.settings.jobs_dir() / job_id
    stored = Path(story.settings.resolved_storage_uri()) / f"syncbn-{job_id}"  # checkpoints and the final model
    assert folder.is_dir() and list(stored.glob("checkpoint_*/model.pt"))
    with story.client() as client:
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/metrics").status_code == 404
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert not folder.exists() and not stored.exists()
