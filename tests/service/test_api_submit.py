"""`syncbn submit`: the client validates the spec file, posts it, reports the service's refusals, and with
`--follow` streams the job's events until it ends (exit code 1 when the job did not succeed).

Against a real uvicorn server (scheduling paused, so the submitted job stays queued until the test cancels it).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from service.cli import main
from service.settings import Settings
from tests.service.conftest_api import LiveServer, tiny_spec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("submit"), max_concurrent_jobs=0)
    with LiveServer(settings) as live:
        yield live


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if path.suffix == ".yaml" else json.dumps(data))
    return path


def test_submit_prints_the_queued_job(server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write(tmp_path / "job.yaml", tiny_spec(name="from-yaml"))
    assert main(["submit", str(spec), "--url", server.url]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("submitted job ") and "(queued, position" in line
    job_id = line.split()[2]
    with server.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["name"] == "from-yaml"
    assert main(["submit", str(spec), "--url", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "queued"


def test_submit_reports_bad_files_and_refusals(server: LiveServer, tmp_path: Path, capsys) -> None:
    bad = write(tmp_path / "bad.json", tiny_spec(workers=0))
    assert main(["submit", str(bad), "--url", server.url]) == 2
    assert "workers" in capsys.readouterr().err
    too_big = write(tmp_path / "big.json", tiny_spec(workers=16))
    assert main(["submit", str(too_big), "--url", server.url]) == 2
    assert "refused the job (422)" in capsys.readouterr().err
    assert main(["submit", str(tmp_path / "missing.json"), "--url", server.url]) == 2
    unreachable = "http://127.0.0.1:9"
    assert main(["submit", str(too_big), "--url", unreachable, "--timeout", "2"]) == 2
    assert "cannot reach the service" in capsys.readouterr().err


def test_follow_streams_until_the_job_ends(server: LiveServer, tmp_path: Path, capsys) -> None:
    spec = tiny_spec(name="followed", seed=11)
    key = f"follow-{time.time_ns()}"
    with server.client() as client:
        job_id = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key}).json()["id"]

    def cancel_soon() -> None:
        time.sleep(2)
        with server.client() as client:
            client.post(f"/v1/jobs/{job_id}/cancel")

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    path = write(tmp_path / "followed.json", spec)
    code = main(["submit", str(path), "--url", server.url, "--idempotency-key", key, "--follow"])
    canceller.join()
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"submitted job {job_id}" in out, "the same key follows the job created with it"
    assert "status cancelled" in out and f"job {job_id} cancelled" in out
