"""The job lifecycle and the job manager without HTTP: the state machine's rules, admission against the real
cluster, and resource-aware FIFO scheduling of real runs on the session's local Ray (a job whose CPUs are not free
waits in the queue instead of hanging inside Ray, and starts as soon as they are).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.jobs.manager import JobCannotFitError, JobManager, JobNotFoundError, JobStateError
from service.settings import Settings
from service.spec import JobSpec
from service.status import JobStatus
from service.store import IdempotencyKeyReusedError, JobStore
from tests.service.conftest_api import tiny_spec, wait_for

pytestmark = pytest.mark.timeout(240)


def test_terminal_states_and_allowed_transitions() -> None:
    assert [s.value for s in JobStatus if s.is_terminal] == ["succeeded", "failed", "cancelled"]
    assert not JobStatus.QUEUED.is_terminal and not JobStatus.RUNNING.is_terminal
    assert JobStatus.QUEUED.can_become(JobStatus.RUNNING) and JobStatus.QUEUED.can_become(JobStatus.CANCELLED)
    assert JobStatus.RUNNING.can_become(JobStatus.SUCCEEDED) and not JobStatus.RUNNING.can_become(JobStatus.QUEUED)
    assert not JobStatus.QUEUED.can_become(JobStatus.SUCCEEDED), "a job cannot succeed without running"
    for final in JobStatus.terminal():
        assert not any(final.can_become(target) for target in JobStatus), f"{final} must be final"
    assert set(JobStatus.predecessors(JobStatus.CANCELLED)) == {JobStatus.QUEUED, JobStatus.RUNNING}
    assert JobStatus("running") is JobStatus.RUNNING and JobStatus.RUNNING == "running"


@pytest.fixture
def manager(ray_cluster: dict, tmp_path: Path) -> Iterator[JobManager]:
    settings = Settings(data_dir=tmp_path, poll_interval_s=0.1)
    store = JobStore(settings.resolved_database_url())
    manager = JobManager(settings, store)
    manager.start()
    yield manager
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        for job in store.jobs_with_status(status):
            manager.cancel(job.id)
    wait_for(lambda: manager.running_count() == 0, 60, "the runs to stop")
    manager.stop()
    store.close()


def status_of(manager: JobManager, job_id: str) -> str:
    return manager.store.get_job(job_id).status


def test_admission_says_what_the_cluster_has(manager: JobManager) -> None:
    capacity = manager.cluster_capacity(fresh=True)
    assert capacity["cpus"] == 4 and capacity["gpus"] == 0 and len(capacity["nodes"]) == 1
    with pytest.raises(JobCannotFitError, match=r"asks for 5 CPUs .* the cluster has 4 CPUs and 0 GPUs"):
        manager.submit_check(JobSpec.model_validate(tiny_spec(workers=5)))
    with pytest.raises(JobCannotFitError, match=r"cpus_per_worker=4\.5"):
        manager.submit_check(JobSpec.model_validate(tiny_spec(workers=1, cpus_per_worker=4.5)))
    manager.submit_check(JobSpec.model_validate(tiny_spec(workers=4)))
    assert manager.concurrency_limit() == 4, "default limit: the cluster's CPU count"
    # One node: STRICT_SPREAD can place a single worker, never two (Ray would retry placement forever).
    manager.submit_check(JobSpec.model_validate(tiny_spec(workers=1, placement_strategy="STRICT_SPREAD")))
    with pytest.raises(JobCannotFitError, match=r"STRICT_SPREAD .* only 1 node\(s\) can host one"):
        manager.submit_check(JobSpec.model_validate(tiny_spec(workers=2, placement_strategy="STRICT_SPREAD")))
    manager.submit_check(JobSpec.model_validate(tiny_spec(workers=2, placement_strategy="SPREAD")))


def test_requests_about_unknown_or_finished_jobs(manager: JobManager) -> None:
    with pytest.raises(JobNotFoundError, match="no job with id 'nope'"):
        manager.cancel("nope")
    with pytest.raises(JobNotFoundError):
        manager.delete("nope")
    spec = JobSpec.model_validate(tiny_spec(workers=5, name="too big"))
    with pytest.raises(JobCannotFitError):
        manager.submit(spec)
    assert manager.store.list_jobs()[1] == 0, "a refused job leaves no row behind"
    job, created = manager.submit(JobSpec.model_validate(tiny_spec()), idempotency_key="k-1")
    assert created
    same, created_again = manager.submit(JobSpec.model_validate(tiny_spec()), idempotency_key="k-1")
    assert same.id == job.id and not created_again
    with pytest.raises(IdempotencyKeyReusedError):
        manager.submit(JobSpec.model_validate(tiny_spec(seed=1)), idempotency_key="k-1")
    with pytest.raises(JobStateError, match="only finished jobs can be deleted"):
        manager.delete(job.id)
    assert manager.cancel(job.id) in (JobStatus.CANCELLED, JobStatus.RUNNING)


def test_a_job_waits_in_the_queue_until_its_cpus_are_free(manager: JobManager) -> None:
    first, _ = manager.submit(JobSpec.model_validate(tiny_spec(workers=3, epochs=50, steps_per_epoch=40)))
    second, _ = manager.submit(JobSpec.model_validate(tiny_spec(workers=2, epochs=50, steps_per_epoch=40)))
    wait_for(lambda: status_of(manager, first.id) == "running", 60, "the first job to start")
    time.sleep(2)  # several scheduler passes (every 0.1 s): none may start the second job
    assert status_of(manager, second.id) == "queued", "3 + 2 CPUs do not fit a 4-CPU cluster: it waits"
    assert manager.store.queue_positions() == {second.id: 1}

    assert manager.cancel(first.id) is JobStatus.RUNNING  # a running job is stopping, not yet stopped
    wait_for(lambda: status_of(manager, first.id) == "cancelled", 60, "the first job to be cancelled")
    wait_for(lambda: status_of(manager, second.id) == "running", 60, "the second job to start on the freed CPUs")
    second_row = manager.store.get_job(second.id)
    assert second_row.started_at >= manager.store.get_job(first.id).finished_at
    manager.cancel(second.id)
    wait_for(lambda: status_of(manager, second.id) == "cancelled", 60, "the second job to be cancelled")
    assert manager.running_count() == 0
