"""High availability on real parts: `syncbn serve` replicas on one PostgreSQL database and one Ray cluster.

- the leader lease itself: one advisory-lock session leads, a second waits; when the leader's session dies (its
  backend terminated, as when its process or node is lost) or the database stops, the lease is lost and another
  replica takes it;
- the leader SIGKILLed mid-run: a follower takes over within 15 s, re-attaches the running jobs and starts the
  queued ones; every job succeeds with each epoch and step stored exactly once, and Ray ran one run per job;
- the database stopped for 20 s mid-run: the API answers only 200 or 503 meanwhile, a submission is refused with
  503 and leaves nothing behind, training goes on, and once the database is back the job's history is complete,
  without a gap or a duplicate;
- a rolling upgrade: two new replicas join, the old follower and then the old leader get SIGTERM and exit 0; the
  leader hands its lease over without stopping a run, and every job finishes;
- SQLite serves one replica: a second `syncbn serve` on the same file refuses to start with a sentence.

The parts are real and owned by the test module: a PostgreSQL server from `initdb` on a free port (the machine's
shared server is not touched), `ray start --head` on free ports, and `syncbn serve` processes; each is stopped by
its pid. The jobs are small (one worker, a few epochs of digits) so that the module fits a 2-core CI machine.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from service.jobs.leadership import AdvisoryLease, ReplicaConflictError, SingleReplicaLease, sqlite_lock_path
from service.settings import Settings
from tests.service.conftest_api import LiveServer, ServeProcess, tiny_spec, wait_for
from tests.service.own_servers import OwnPostgres, RayHead, postgres_binaries, replica, wait_gone

pytestmark = [
    pytest.mark.slow,  # several replicas, its own PostgreSQL and Ray head: `make test-slow` (.ci/run) runs it
    pytest.mark.timeout(900),
    pytest.mark.skipif(postgres_binaries() is None, reason="the PostgreSQL server binaries (initdb) are not installed"),
]

#: A job of a few epochs on one worker, recording metrics and layer statistics every 2 steps.
EPOCHS, STEPS_PER_EPOCH, STATS_EVERY = 3, 8, 2
#: Jobs of the takeover case (the issue asks for 6; 3 keep the module within minutes on a 2-core CI machine, and
#: still have runs running and waiting when the leader dies).
JOBS = 3
#: Seconds a first run may take to start: Ray Train's start is 10-20 s on an idle machine, minutes on a loaded one.
RUN_START_S = 420
#: The leader lease must change hands within this many seconds of the leader's death (the issue's bound).
TAKEOVER_LIMIT_S = 15.0


def _spec(name: str, **overrides: Any) -> dict[str, Any]:
    fields = {"epochs": EPOCHS, "steps_per_epoch": STEPS_PER_EPOCH, "stats_every": STATS_EVERY, "workers": 1}
    return tiny_spec(name=name, **(fields | overrides))


@pytest.fixture(scope="module")
def postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    head = RayHead(num_cpus=4)
    try:
        yield head.wait_ready()
    finally:
        head.stop()


def _database(postgres: OwnPostgres) -> str:
    """A new empty database on the test's own server; its SQLAlchemy URL."""
    name = f"ha_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def _start(data_dir: Path, url: str, ray_head: RayHead, *names: str) -> list[ServeProcess]:
    """Replicas started together (each imports torch and joins Ray: in parallel, that is paid once)."""
    processes = [replica(data_dir, url, ray_head, name, "--max-concurrent-jobs", "2") for name in names]
    for process in processes:
        process.wait_ready(240)
    return processes


def _ready(process: ServeProcess) -> dict[str, Any]:
    try:
        return httpx.get(f"{process.url}/readyz", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


def _leader(processes: list[ServeProcess], timeout: float = 30) -> ServeProcess:
    """The replica that says it leads (waited for), after checking that every live replica names it."""

    def found() -> ServeProcess | None:
        leading = [p for p in processes if p.process.poll() is None and _ready(p).get("leading")]
        return leading[0] if len(leading) == 1 else None

    leader = wait_for(found, timeout, "one replica to lead")
    name = _ready(leader)["replica"]
    for process in processes:
        if process.process.poll() is None:
            assert _ready(process)["leader"] == name, f"{process.url} names another leader than {name}"
    return leader


def _wait_all_ended(client: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    def ended() -> dict[str, dict[str, Any]] | None:
        jobs = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in ids}
        return jobs if all(job["status"] in ("succeeded", "failed", "cancelled") for job in jobs.values()) else None

    return wait_for(ended, timeout, f"jobs {ids} to end", interval=1.0)


def _check_history_exactly_once(client: httpx.Client, job_id: str, data_dir: Path) -> list[dict[str, Any]]:
    """Every epoch and recorded step stored once, in order; one Ray Train run; returns the job's log lines."""
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, EPOCHS + 1)), metrics["epochs"]
    expected_steps = list(range(STATS_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, STATS_EVERY))
    assert [s["step"] for s in metrics["steps"]] == expected_steps
    assert client.get(f"/v1/jobs/{job_id}/layers").json()["recorded_steps"] == expected_steps
    runs = sorted(p.name for p in (data_dir / "storage").glob(f"syncbn-{job_id}*"))
    assert runs == [f"syncbn-{job_id}"], f"one Ray Train run per job launch, got {runs}"
    lines = client.get(f"/v1/jobs/{job_id}/logs", params={"limit": 1000}).json()["data"]
    assert not [line for line in lines if line["message"].startswith("resumed")], "no run started again"
    return lines


def _stop_all(processes: list[ServeProcess]) -> None:
    for process in processes:
        if process.process.poll() is None:
            process.kill()


# -- the lease -----------------------------------------------------------------------------------------------


def test_the_lease_is_held_by_one_session_and_lost_with_it(postgres: OwnPostgres) -> None:
    url = _database(postgres)
    first, second = AdvisoryLease(url, "first"), AdvisoryLease(url, "second")
    try:
        assert first.acquire() and first.held()
        assert not second.acquire(), "a second replica waits while the first leads"
        assert second.leader() == "first" and first.leader() == "first"
        with psycopg.connect(postgres.dsn) as admin:
            # The leader's session ends as when its process or node dies: PostgreSQL frees the lock itself.
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'syncbn-lease:first'"
            )
        wait_for(lambda: second.acquire(), 10, "the second replica to take the freed lease")
        assert not first.held(), "the first replica sees that it lost the lease"
        assert not first.acquire() and first.leader() == "second"

        postgres.stop()  # a database restart ends every session: nobody holds the lease meanwhile
        assert not second.held() and second.leader() is None
        with pytest.raises((OperationalError, psycopg.OperationalError)):
            second.acquire()
        postgres.start()
        assert second.acquire() and second.leader() == "second"
        second.release()
        assert first.acquire(), "a released lease is free at once"
    finally:
        if postgres.process is None or postgres.process.poll() is not None:
            postgres.start()
        first.release()
        second.release()


def test_a_second_replica_on_one_sqlite_file_refuses_to_start(ray_cluster: dict, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_jobs=0)
    with LiveServer(settings):  # holds the file lock for its whole life
        second = ServeProcess(tmp_path / "data")
        code = wait_gone(second.process, 60)
        log = second.log()
        assert code == 1, log
        assert "SQLite serves a single replica" in log and "PostgreSQL" in log, log
        with pytest.raises(ReplicaConflictError):
            SingleReplicaLease(sqlite_lock_path(settings.resolved_database_url()), "third", "the file")
    # Stopped, the first replica leaves the file to the next one.
    SingleReplicaLease(sqlite_lock_path(settings.resolved_database_url()), "next", "the file").release()


# -- replicas ------------------------------------------------------------------------------------------------


def test_the_leader_sigkilled_mid_run_loses_no_job_and_no_record(
    postgres: OwnPostgres, ray_head: RayHead, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    replicas = _start(data_dir, _database(postgres), ray_head, "a", "b")
    try:
        leader = _leader(replicas)
        follower = next(p for p in replicas if p is not leader)
        ids = []
        for index in range(JOBS):  # submitted across the replicas; two run at once, the others wait
            with replicas[index % 2].client() as client:
                response = client.post("/v1/jobs", json=_spec(f"ha-{index}"))
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
        with follower.client() as client:
            wait_for(
                lambda: client.get(f"/v1/jobs/{ids[0]}").json()["summary"]["last_step"],
                RUN_START_S,
                "the first job to store its first step",
            )
            running = [i for i in ids if client.get(f"/v1/jobs/{i}").json()["status"] == "running"]
            assert running, "a job runs when the leader dies"

            killed_at = time.monotonic()
            leader.kill()  # SIGKILL, as the OOM killer or a lost node does
            wait_for(lambda: _ready(follower).get("leading"), TAKEOVER_LIMIT_S + 5, "the follower to take over", 0.05)
            takeover_s = time.monotonic() - killed_at
            print(f"takeover after SIGKILL of the leader: {takeover_s:.2f} s")
            assert takeover_s < TAKEOVER_LIMIT_S

            jobs = _wait_all_ended(client, ids, 600)
            assert {job_id: job["status"] for job_id, job in jobs.items()} == dict.fromkeys(ids, "succeeded")
            reattached = []
            for job_id in ids:
                lines = _check_history_exactly_once(client, job_id, data_dir)
                if any("re-attached to the surviving run" in line["message"] for line in lines):
                    reattached.append(job_id)
            assert reattached and set(reattached) <= set(ids), "the new leader followed the runs of the old one"
            text = client.get("/metrics").text
            assert "syncbn_leader 1.0" in text and "syncbn_leader_takeovers_total 1.0" in text
    finally:
        _stop_all(replicas)


def test_a_database_outage_of_20_s_mid_run_costs_nothing(
    postgres: OwnPostgres, ray_head: RayHead, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    replicas = _start(data_dir, _database(postgres), ray_head, "a", "b")
    answers: list[tuple[str, int]] = []
    try:
        with replicas[0].client() as client:
            job_id = client.post("/v1/jobs", json=_spec("outage", epochs=EPOCHS)).json()["id"]
            wait_for(
                lambda: client.get(f"/v1/jobs/{job_id}").json()["summary"]["last_step"] or 0,
                RUN_START_S,
                "the job to store its first step",
            )
        stop = threading.Event()

        def ask() -> None:  # what clients see during the outage, on both replicas
            while not stop.is_set():
                for process in replicas:
                    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", "/v1/jobs"), ("GET", "/readyz")):
                        try:
                            answers.append((path, httpx.request(method, process.url + path, timeout=15).status_code))
                        except httpx.HTTPError as exc:
                            answers.append((path, -1))
                            print(f"no answer from {process.url}{path}: {exc}")
                time.sleep(0.2)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        postgres.stop()
        try:
            wait_for(lambda: any(code == 503 for path, code in answers if path.startswith("/v1/jobs/")), 20, "a 503")
            submitted = httpx.post(f"{replicas[1].url}/v1/jobs", json=_spec("during-outage"), timeout=15)
            assert submitted.status_code == 503, submitted.text
            assert "database does not answer" in submitted.json()["detail"]
            assert submitted.headers["Retry-After"]
            time.sleep(max(0.0, 20 - 3))
        finally:
            postgres.start()
        time.sleep(3)
        stop.set()
        asker.join(30)
        assert {code for _, code in answers} <= {200, 503}, sorted(set(answers))

        with replicas[1].client() as client:
            job = _wait_all_ended(client, [job_id], 600)[job_id]
            assert job["status"] == "succeeded", job
            _check_history_exactly_once(client, job_id, data_dir)
            listed = client.get("/v1/jobs").json()
            assert [j["id"] for j in listed["data"]] == [job_id], "the refused submission left nothing behind"
            assert _leader(replicas) is not None
    finally:
        _stop_all(replicas)


def test_a_rolling_upgrade_stops_no_run(postgres: OwnPostgres, ray_head: RayHead, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = _database(postgres)
    old = _start(data_dir, url, ray_head, "old-a", "old-b")
    new: list[ServeProcess] = []
    try:
        leader = _leader(old)
        follower = next(p for p in old if p is not leader)
        with leader.client() as client:
            ids = [client.post("/v1/jobs", json=_spec(f"upgrade-{i}")).json()["id"] for i in range(2)]
            wait_for(
                lambda: all(client.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids),
                RUN_START_S,
                "both jobs to run",
            )
        # The next version joins (its schema upgrade runs under the migrations' advisory lock), then the old
        # replicas stop one at a time.
        new = _start(data_dir, url, ray_head, "new-a", "new-b")
        assert follower.terminate(30) == 0, follower.log()
        assert leader.terminate(30) == 0, leader.log()
        successor = _leader(new, timeout=TAKEOVER_LIMIT_S)
        with successor.client() as client:
            statuses = {i: client.get(f"/v1/jobs/{i}").json()["status"] for i in ids}
            assert set(statuses.values()) <= {"running", "succeeded"}, statuses
            jobs = _wait_all_ended(client, ids, 600)
            assert {i: job["status"] for i, job in jobs.items()} == dict.fromkeys(ids, "succeeded")
            for job_id in ids:
                _check_history_exactly_once(client, job_id, data_dir)
    finally:
        _stop_all(old + new)
