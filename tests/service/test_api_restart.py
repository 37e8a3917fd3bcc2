"""`syncbn serve` killed and started again: the job that was running (its embedded Ray died with the service) is
marked failed with the reason "service restarted" when it had no checkpoint, and can be resubmitted; a job with
checkpoints resumes from the latest one and ends with exactly its epochs and gap-free steps; the processes the
killed service's Ray left behind are stopped; the job that was queued still runs, and a SIGTERM stops the service
cleanly (exit code 0).

Real processes: the `syncbn serve` command with its own embedded Ray, killed with SIGKILL like a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from service.engine.ray_leftovers import PROCESS_FILE
from tests.service.conftest_api import ServeProcess, read_events, tiny_spec, wait_for

pytestmark = pytest.mark.timeout(300)


def test_running_job_fails_as_service_restarted_and_queued_job_still_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    flags = ("--max-concurrent-jobs", "1", "--ray-num-cpus", "4")
    first = ServeProcess(data_dir, *flags).wait_ready()
    try:
        with first.client() as client:
            long_spec = tiny_spec(name="interrupted", epochs=50, steps_per_epoch=40)
            interrupted = client.post("/v1/jobs", json=long_spec).json()
            waiting = client.post("/v1/jobs", json=tiny_spec(name="waiting")).json()
            wait_for(
                lambda: client.get(f"/v1/jobs/{interrupted['id']}").json()["status"] == "running",
                60,
                "the first job to start",
            )
            assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"
    finally:
        first.kill()

    second = ServeProcess(data_dir, *flags).wait_ready()
    try:
        with second.client() as client:
            failed = client.get(f"/v1/jobs/{interrupted['id']}").json()
            assert failed["status"] == "failed" and failed["error"] == "service restarted", failed
            assert failed["finished_at"] is not None
            events = read_events(client, interrupted["id"], timeout=10)
            assert [e["data"]["status"] for e in events if e["event"] == "status"] == ["queued", "running", "failed"]

            def run_reports() -> bool:  # the run's own driver wrote to the job's log: it executes in Ray
                lines = client.get(f"/v1/jobs/{waiting['id']}/logs").json()["data"]
                return any(line["source"] == "run" for line in lines)

            wait_for(run_reports, 120, "the job that was queued to run after the restart")
            assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "running"

            again = client.post("/v1/jobs", json=failed["spec"])
            assert again.status_code == 201, "a job failed by a restart can be resubmitted as it was"
            client.post(f"/v1/jobs/{again.json()['id']}/cancel")
        code = second.terminate()
        assert code == 0, f"exit code {code} after SIGTERM:\n{second.log()}"
    finally:
        if second.process.poll() is None:
            second.kill()


def test_serve_refuses_an_open_bind_without_tokens(tmp_path: Path) -> None:
    process = ServeProcess(tmp_path, "--host", "0.0.0.0")
    code = process.process.wait(60)
    log = process.log()
    assert code == 2, log
    assert "no api_tokens are configured" in log and "--allow-insecure-bind" in log


def _running_recorded_processes(data_dir: Path) -> list[tuple[int, float]]:
    """(pid, start time) of the processes listed in ray-processes.json that still run."""
    recorded = json.loads((data_dir / PROCESS_FILE).read_text())
    return [(e["pid"], e["create_time"]) for e in recorded["processes"] if _runs(e["pid"], e["create_time"])]


def _runs(pid: int, create_time: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - create_time) < 0.05 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(600)  # two services start their own Ray, and a run starts twice
def test_sigkilled_service_resumes_a_checkpointed_job_and_stops_its_ray_leftovers(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    flags = ("--max-concurrent-jobs", "1", "--ray-num-cpus", "4")
    # Epochs of a few seconds: Ray Train's newest checkpoint is then at most an epoch ahead of the stored records,
    # and one of the two kept checkpoints is one the history reaches (see service.engine.checkpoints).
    epochs, steps_per_epoch, stats_every = 5, 30, 5
    spec = tiny_spec(
        name="resumable", epochs=epochs, steps_per_epoch=steps_per_epoch, stats_every=stats_every, checkpoint_every=1
    )
    first = ServeProcess(data_dir, *flags).wait_ready()
    try:
        with first.client() as client:
            job = client.post("/v1/jobs", json=spec).json()
            wait_for(
                lambda: client.get(f"/v1/jobs/{job['id']}").json()["summary"]["epochs_done"] >= 2,
                180,
                "two epochs to end",
            )
            before = client.get(f"/v1/jobs/{job['id']}").json()
            assert before["status"] == "running", before
        # SIGKILL of the service process alone, as the OOM killer or `kill -9 <pid>` does: its embedded Ray's
        # agents are not in the way of the signal and outlive it.
        first.process.kill()
        first.process.wait(30)
        time.sleep(2)  # what dies with the service (GCS, raylet, workers) has gone by now
        leftovers = _running_recorded_processes(data_dir)

        second = ServeProcess(data_dir, *flags).wait_ready()
        try:
            still = [pid for pid, started in leftovers if _runs(pid, started)]
            assert still == [], f"processes of the killed service's Ray still run: {still}"
            with second.client() as client:
                done = wait_for(
                    lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] != "running" and j,
                    300,
                    "the resumed job to end",
                )
                assert done["status"] == "succeeded", done
                assert done["summary"]["epochs_done"] == epochs
                metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
                assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, epochs + 1))
                expected_steps = list(range(stats_every, epochs * steps_per_epoch + 1, stats_every))
                assert [s["step"] for s in metrics["steps"]] == expected_steps
                layers = client.get(f"/v1/jobs/{job['id']}/layers").json()
                assert layers["recorded_steps"] == expected_steps
                history = client.get(f"/v1/jobs/{job['id']}/layers/{next(iter(layers['layers']))}").json()
                assert [p["step"] for p in history["points"]] == expected_steps

                lines = [line["message"] for line in client.get(f"/v1/jobs/{job['id']}/logs").json()["data"]]
                resumed = [m for m in lines if m.startswith("resumed after a service restart at epoch ")]
                assert len(resumed) == 1, lines
                epoch = int(resumed[0].rsplit(" ", 1)[1])
                assert 1 <= epoch <= epochs, resumed
                events = read_events(client, job["id"], timeout=30)
                assert [e["data"]["epoch"] for e in events if e["event"] == "resumed"] == [epoch]
                statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
                assert statuses == ["queued", "running", "succeeded"]
        finally:
            second.kill()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.process.pid, signal.SIGKILL)


def _alive_leftovers_of(pids: list[int]) -> set[int]:
    import psutil

    return {pid for pid in pids if psutil.pid_exists(pid)}
