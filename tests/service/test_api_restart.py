"""`syncbn serve` killed and started again: the job that was running (its embedded Ray died with the service) is
marked failed with the reason "service restarted" and can be resubmitted, the job that was queued still runs,
and a SIGTERM stops the service cleanly (exit code 0).

Real processes: the `syncbn serve` command with its own embedded Ray, killed with SIGKILL like a crash.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
