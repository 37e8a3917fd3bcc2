"""The job manager: turns queued jobs into Ray Train runs, in order, and keeps the store in step with them.

One background thread does all the scheduling and draining; API handlers only call `submit_check`, `cancel`
and `delete`, which are short. The run itself (the engine's `JobRun`) lives in Ray, in detached actors, so
the manager holds nothing that a restart could not rebuild from the database and from Ray.

Several replicas may share one database and one Ray cluster: the thread schedules only while this replica holds
the leader lease (`service.jobs.leadership`). A replica that takes the lease recovers the running jobs as after a
restart (re-attach, or resume from a checkpoint); one that loses it (its lease session died, e.g. the database
went away) steps down: it forgets its runs and leaves them running for the next leader. Requests from the API
are database writes that any replica may make (a cancel sets `cancel_requested`; the leader stops the run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.data_location import check_dataset_locations
from service.jobs.leadership import Lease, default_replica_name, open_lease
from service.settings import Settings
from service.spec import JobSpec
from service.status import JobStatus
from service.store import JobStore
from service.store.models import DEFAULT_OWNER, JobRow

if TYPE_CHECKING:
    from service.engine.runner import JobRun
    from service.engine.storage import RunStorage

__all__ = [
    "Admission",
    "ClusterUnavailableError",
    "JobCannotFitError",
    "JobManager",
    "JobNotFoundError",
    "JobStateError",
]

logger = logging.getLogger(__name__)

#: Reason recorded for a job whose run did not survive a restart of the service (and had no checkpoint).
RESTART_REASON = "service restarted"
#: What a run resumed from its checkpoint after a restart of the service is said to have survived.
RESUME_REASON = "service restart"
#: Consecutive failed polls of a run after which it is considered lost.
MAX_POLL_FAILURES = 20
#: Most records read from a run per poll (each batch is stored in one transaction).
POLL_BATCH = 200
#: Seconds a cluster capacity reading is reused by the scheduler.
CAPACITY_TTL_S = 5.0
#: Seconds between two checks that a running job's driver is still there. A run's end arrives as its `end` record
#: with the next drain; the check is for a driver that vanished without writing one. Each check is a call to the
#: run's record log, and on a machine whose cores the ranks fill, what the service does comes out of training.
DONE_CHECK_S = 2.0


# Errors raised to the API layer:
#
#   LookupError ── JobNotFoundError          (404)
#   ValueError  ── JobCannotFitError         (422: the spec can never run on this cluster)
#   RuntimeError ┬ JobStateError             (409: the job's state does not allow the request)
#                └ ClusterUnavailableError   (503: Ray does not answer, so nothing can be admitted now)


class JobNotFoundError(LookupError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}: list jobs with GET /v1/jobs.")
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_id,))


class JobStateError(RuntimeError):
    """The job exists but its current state does not allow the request."""


class ClusterUnavailableError(RuntimeError):
    """The Ray cluster could not be asked for its resources."""


class JobCannotFitError(ValueError):
    """The job asks for more than the cluster has, so it could never start."""


@dataclass(frozen=True)
class Admission:
    """The resources a job reserves while it runs, from `JobSpec.resources()`."""

    cpus: float
    gpus: float

    @classmethod
    def of(cls, spec: JobSpec) -> Admission:
        resources = spec.resources()
        return cls(cpus=float(resources.get("CPU", 0.0)), gpus=float(resources.get("GPU", 0.0)))


class JobManager:
    """Runs submitted jobs on Ray, oldest first, within the concurrency limit and the cluster's resources.

    - admission: `submit_check` refuses a spec that could never fit the cluster, or whose npz file is missing
      or lies outside the data root;
    - queue: a queued job starts when fewer than `max_concurrent_jobs` run and its CPUs/GPUs are free; the
      oldest queued job goes first and later ones wait behind it (strict FIFO);
    - drain: every `poll_interval_s` each running `JobRun` is polled and its new records are stored in one
      transaction each, so the database holds every record as it arrives;
    - cancellation: queued jobs are cancelled at once; running ones are stopped through `JobRun.cancel`;
    - restart and takeover: running jobs are re-attached with `attach_run`; a job whose run is gone but that
      has a checkpoint is started again ahead of the queue and resumes from it (Ray Train's resume path, as
      after a worker failure); one without a checkpoint fails with the reason "service restarted"; queued jobs
      simply run;
    - leadership: all of the above happens only while `lease` is held; followers try to take it every
      `leader_poll_s`, the leader checks it before every pass and hands it over at `stop`.
    """

    def __init__(self, settings: Settings, store: JobStore, lease: Lease | None = None) -> None:
        self.settings = settings
        self.store = store
        self.replica = settings.replica_name or default_replica_name(settings.port)
        self.lease = lease if lease is not None else open_lease(store.url, self.replica)
        self._leading = False
        self.takeovers = 0  # times this replica became the leader
        self._cancelling: set[str] = set()  # running jobs whose run this leader was asked to stop
        self._runs: dict[str, JobRun] = {}
        self._reserved: dict[str, Admission] = {}
        self._resume: list[str] = []  # running jobs whose run died with the service, oldest first
        self._poll_failures: dict[str, int] = {}
        self._study_checks: set[str] = set()  # studies one of whose trials ended: may they stop early?
        self._done_checked: dict[str, float] = {}  # job id -> time.monotonic() of its last run.done()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._capacity: dict[str, Any] | None = None
        self._storage: RunStorage | None = None
        self._capacity_at = 0.0
        self.records_ingested = 0
        self.loop_errors = 0
        self.tracking_failures: dict[str, int] = {}  # by tracker (mlflow, tensorboard, tracking): for Prometheus

    # -- life of the manager --------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to Ray, take the leader lease if it is free (then recover the jobs left running by a previous
        leader), and start the scheduler thread, which keeps trying to lead when another replica does."""
        from service.engine.cluster import ensure_ray

        ensure_ray(self.settings.ray_address, self.settings.ray_num_cpus)
        self.settings.jobs_dir().mkdir(parents=True, exist_ok=True)
        self.run_storage()  # an unusable storage_uri stops the start here, with its reason
        self._stop.clear()
        self._lead()
        self._thread = threading.Thread(target=self._loop, name="syncbn-job-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the scheduler thread and give the lease up. Runs are left alone: they live in Ray and the next
        leader (another replica, or this one restarted) re-attaches them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        was_leading = self._leading
        self._step_down()
        try:
            self.lease.release()
        except Exception:
            logger.exception("giving the leader lease up failed (it ends with this process's session)")
        if was_leading:
            logger.info("replica %s stopped leading: the lease is free for the next leader", self.replica)

    @property
    def leading(self) -> bool:
        """Whether this replica held the leader lease at its last check."""
        return self._leading

    def leader(self) -> str | None:
        """The replica that leads now (this one's name when it does), None when none does or the database is
        unreachable."""
        return self.replica if self._leading else self.lease.leader()

    def _lead(self) -> bool:
        """Whether this replica leads now: check the lease it holds, or try to take it.

        On taking it, recover the running jobs (a takeover, or the start of a single replica); on losing it,
        step down. A database that does not answer means the lease cannot be proven held: step down.
        """
        if self._leading:
            if self.lease.held():
                return True
            logger.warning("replica %s lost the leader lease: it stops scheduling (runs keep going)", self.replica)
            self._step_down()
            return False
        try:
            acquired = self.lease.acquire()
        except Exception as exc:
            logger.warning("replica %s cannot reach the database to take the lease: %s", self.replica, exc)
            return False
        if not acquired:
            return False
        logger.info("replica %s leads: recovering the running jobs", self.replica)
        try:
            self._recover()
        except Exception:
            logger.exception("recovering the running jobs failed: giving the lease up to try again")
            self._step_down()
            self.lease.release()
            return False
        self._leading = True
        self.takeovers += 1
        try:  # a previous leader may have stopped between a trial's end and its study's early-stop check
            self._study_checks.update(study.id for study in self.store.studies_with_queued_trials())
        except Exception:
            logger.exception("listing the studies with queued trials failed (their next trial end checks them)")
        return True

    def _step_down(self) -> None:
        """Forget every run this replica followed; they keep running in Ray for the next leader."""
        self._leading = False
        with self._lock:
            self._runs.clear()
            self._reserved.clear()
            self._resume.clear()
            self._cancelling.clear()
        self._poll_failures.clear()
        self._study_checks.clear()  # the next leader checks every study with queued trials

    @property
    def stopping(self) -> bool:
        """Whether `stop` was called (streams use it to end promptly on shutdown)."""
        return self._stop.is_set()

    def wake(self) -> None:
        """Ask the scheduler thread for a pass now instead of at its next tick."""
        self._wake.set()

    def _recover(self) -> None:
        from service.engine.checkpoints import job_checkpoints
        from service.engine.runner import attach_run

        runs_dir = self._checkpoints_dir()
        for job in self.store.jobs_with_status(JobStatus.RUNNING):
            try:
                run = attach_run(job.id)
            except Exception:
                logger.exception("re-attaching job %s failed", job.id)
                run = None
            if run is None and job.cancel_requested:
                self.store.transition(
                    job.id,
                    JobStatus.CANCELLED,
                    error="cancelled on request",
                    message="job cancelled: its run stopped with the service before the cancel completed",
                )
                continue
            if run is None and runs_dir is not None and job_checkpoints(runs_dir, job.id):
                with self._lock:
                    self._resume.append(job.id)
                logger.info("job %s has checkpoints: its run will resume", job.id)
                continue
            if run is None:
                self.store.transition(
                    job.id,
                    JobStatus.FAILED,
                    error=RESTART_REASON,
                    message=f"job failed: {RESTART_REASON} and its run did not survive; resubmit the job",
                    level="error",
                )
                continue
            try:
                need = Admission.of(JobSpec.model_validate(job.spec))
            except ValueError:
                need = Admission(cpus=0.0, gpus=0.0)  # a spec this version no longer reads: follow it anyway
            with self._lock:
                self._runs[job.id] = run
                self._reserved[job.id] = need
            self.store.add_log(
                job.id, "info", f"service restarted ({self.replica} leads now); re-attached to the surviving run"
            )
            logger.info("re-attached job %s", job.id)
            if job.cancel_requested:
                self._cancel_run(job.id, run)

    # -- admission ------------------------------------------------------------------------------------------

    def cluster_capacity(self, *, fresh: bool = False) -> dict[str, Any]:
        """The cluster's total resources (`cpus`, `gpus`, `nodes`), cached for a few seconds.

        Raises:
            ClusterUnavailableError: Ray did not answer.
        """
        from service.engine.cluster import cluster_capacity

        now = time.monotonic()
        if fresh or self._capacity is None or now - self._capacity_at > CAPACITY_TTL_S:
            try:
                self._capacity = cluster_capacity()
            except Exception as exc:
                raise ClusterUnavailableError(
                    f"the Ray cluster did not report its resources ({type(exc).__name__}: {exc}): "
                    "check /readyz and the cluster, then retry."
                ) from exc
            self._capacity_at = now
        return self._capacity

    def submit_check(self, spec: JobSpec, *, fresh: bool = False) -> None:
        """Refuse a spec that could never run here (`fresh`: read the cluster now, not a cached reading).

        Raises:
            JobCannotFitError: more CPUs/GPUs in total, or per worker, than the cluster has; fewer nodes able
                to host a worker than `workers` under STRICT_SPREAD; an npz path that escapes the data root
                or does not exist; a dataset.uri/val_uri outside the data root or with a scheme not allowed; an
                MLflow tracking URI the operator did not list in tracking_uris.
        """
        from service.engine.tracking import check_tracking

        try:
            check_dataset_locations(spec.dataset, self.settings.resolved_data_root(), self.settings.allowed_uri_schemes)
            check_tracking(spec.tracking, self.settings.tracking_uris)
        except ValueError as exc:
            raise JobCannotFitError(str(exc)) from exc
        capacity = self.cluster_capacity(fresh=fresh)
        need = Admission.of(spec)
        cpus, gpus = float(capacity.get("cpus", 0.0)), float(capacity.get("gpus", 0.0))
        nodes = capacity.get("nodes") or []
        node_cpus = max((float(n.get("cpus", 0.0)) for n in nodes), default=cpus)
        node_gpus = max((float(n.get("gpus", 0.0)) for n in nodes), default=gpus)
        has = (
            f"the cluster has {_fmt(cpus)} CPUs and {_fmt(gpus)} GPUs in total "
            f"({len(nodes) or 1} node(s), the largest with {_fmt(node_cpus)} CPUs and {_fmt(node_gpus)} GPUs)"
        )
        if need.gpus > gpus:
            raise JobCannotFitError(
                f"the job asks for {_fmt(need.gpus)} GPUs (workers={spec.workers}, use_gpu=true) but {has}: "
                "lower workers or set use_gpu to false."
            )
        if need.cpus > cpus + 1e-9:
            raise JobCannotFitError(
                f"the job asks for {_fmt(need.cpus)} CPUs (workers={spec.workers} x cpus_per_worker="
                f"{_fmt(spec.cpus_per_worker)}) but {has}: lower workers or cpus_per_worker."
            )
        if spec.cpus_per_worker > node_cpus + 1e-9:
            raise JobCannotFitError(
                f"one worker asks for cpus_per_worker={_fmt(spec.cpus_per_worker)} CPUs but {has}: "
                "lower cpus_per_worker."
            )
        if spec.use_gpu and node_gpus < 1:
            raise JobCannotFitError(f"use_gpu=true needs a node with a GPU but {has}: set use_gpu to false.")
        if spec.placement_strategy == "STRICT_SPREAD":
            hosts = [
                n
                for n in nodes
                if float(n.get("cpus", 0.0)) + 1e-9 >= spec.cpus_per_worker
                and (not spec.use_gpu or float(n.get("gpus", 0.0)) >= 1)
            ]
            if len(hosts) < spec.workers:
                raise JobCannotFitError(
                    f"placement_strategy STRICT_SPREAD puts each of the {spec.workers} workers on its own node, but "
                    f"only {len(hosts)} node(s) can host one ({has}): lower workers or use SPREAD or PACK."
                )

    def concurrency_limit(self) -> int:
        """How many jobs may run at once: the setting, or the cluster's CPU count (at least 1)."""
        if self.settings.max_concurrent_jobs is not None:
            return self.settings.max_concurrent_jobs
        return max(1, int(float(self.cluster_capacity().get("cpus", 1.0))))

    # -- requests from the API ------------------------------------------------------------------------------

    def submit(
        self, spec: JobSpec, *, idempotency_key: str | None = None, owner: str = DEFAULT_OWNER
    ) -> tuple[JobRow, bool]:
        """Queue a job of `owner`, or return the one the owner created earlier with the same `idempotency_key` and
        spec (keys are per owner: two principals may use the same key for different jobs).

        Returns:
            (job, created): `created` is False when an earlier job was returned for the key.

        Raises:
            JobCannotFitError: the spec can never run on this cluster (checked only for new jobs).
            IdempotencyKeyReusedError: the key was used before with a different spec.
        """
        spec_json = spec.model_dump(mode="json")
        request_hash = hashlib.sha256(json.dumps(spec_json, sort_keys=True).encode()).hexdigest()
        if idempotency_key is not None:
            earlier = self.store.job_for_idempotency_key(idempotency_key, request_hash, owner=owner)
            if earlier is not None:
                return earlier, False
        self.submit_check(spec)
        job, created = self.store.create_job(
            uuid.uuid4().hex, spec_json, idempotency_key=idempotency_key, request_hash=request_hash, owner=owner
        )
        if created:
            self.wake()
        return job, created

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued job at once, or start stopping a running one.

        Returns:
            The job's status after the request: `cancelled` for a queued job, `running` while a run stops.

        Raises:
            JobNotFoundError: no such job.
            JobStateError: the job already ended.
        """
        job = self.store.get_job(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        status = JobStatus(job.status)
        if status is JobStatus.QUEUED:
            done = self.store.transition(
                job_id,
                JobStatus.CANCELLED,
                error="cancelled before it started",
                message="job cancelled before it started",
            )
            if done is not None:
                return JobStatus.CANCELLED
            status = JobStatus(self.store.get_job(job_id).status)  # started meanwhile: stop the run instead
        if status.is_terminal:
            raise JobStateError(
                f"job {job_id} already ended with status {status.value!r}, so it cannot be cancelled: "
                "only queued or running jobs can be."
            )
        self.store.mark_cancel_requested(job_id)
        with self._lock:
            run = self._runs.get(job_id)
        if run is not None:
            self._cancel_run(job_id, run)
        self.wake()  # on another replica, the leader sees `cancel_requested` at its next drain
        return JobStatus.RUNNING

    def _cancel_run(self, job_id: str, run: JobRun) -> None:
        """Stop a run, once: a cancel asked through the API, noticed at a drain or after a launch is sent once."""
        with self._lock:
            if job_id in self._cancelling:
                return
            self._cancelling.add(job_id)
        try:
            run.cancel()
        except Exception as exc:
            logger.exception("cancelling the run of job %s failed", job_id)
            self.store.add_log(job_id, "error", f"stopping the run failed: {type(exc).__name__}: {exc}")

    def delete(self, job_id: str) -> None:
        """Delete a finished job: its rows and its folder of files.

        Raises:
            JobNotFoundError: no such job.
            JobStateError: the job is queued or running (cancel it first).
        """
        job = self.store.get_job(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        if not JobStatus(job.status).is_terminal:
            raise JobStateError(
                f"job {job_id} is {job.status}, and only finished jobs can be deleted: "
                f"cancel it first with POST /v1/jobs/{job_id}/cancel."
            )
        self._remove_leftover_run(job_id)
        self.store.delete_job(job_id)
        folder = self.job_dir(job_id)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            self.run_storage().delete_run(job_id)
        except Exception as exc:  # the rows are gone; a storage hiccup leaves files behind, said in the log
            logger.warning("removing the stored checkpoints of job %s failed: %s", job_id, exc)

    def _remove_leftover_run(self, job_id: str) -> None:
        """Remove a finished job's actors if a crash left them in the cluster."""
        from service.engine.runner import attach_run

        try:
            run = attach_run(job_id)
            if run is not None:
                run.close()
        except Exception as exc:
            logger.warning("removing leftover actors of job %s failed: %s", job_id, exc)

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job's files (model, checkpoints), under the data folder."""
        return self.settings.jobs_dir() / job_id

    def run_storage(self) -> RunStorage:
        """Where runs keep checkpoints and final models (`Settings.storage_uri`)."""
        from service.engine.storage import RunStorage

        if self._storage is None:
            self._storage = RunStorage(self.settings.resolved_storage_uri())
        return self._storage

    def _checkpoints_dir(self) -> Path | None:
        """The local folder of the run storage, where a run that died with the service is resumed from; None for a
        bucket (`s3://`, `gs://`): resuming after a restart reads checkpoints from a local or mounted folder only."""
        storage = self.run_storage()
        return Path(storage.base) if storage.is_local else None

    def model_file(self, job: JobRow) -> tuple[RunStorage, str] | None:
        """The storage and path of a job's final model when it exists inside the job's run folder, else None.

        The location the run recorded is used only when it lies in this job's run folder of the storage: nothing
        else is ever served. Jobs finished before storage_uri existed keep their model in the job's folder.
        """
        from service.engine.storage import RunStorage

        storage = self.run_storage()
        found = storage.find_model(job.id, job.model_path)
        if found is not None:
            return storage, found
        folder = self.job_dir(job.id).resolve()
        legacy = (folder / "model.pt").resolve()
        if legacy.is_relative_to(folder) and legacy.is_file():
            return RunStorage(str(folder.parent)), str(legacy)
        return None

    def running_count(self) -> int:
        """Number of runs this manager is following."""
        with self._lock:
            return len(self._runs)

    # -- the scheduler thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the pass: a wake() during the pass triggers the next one at once
            try:
                if not self._lead():
                    self._wake.wait(self.settings.leader_poll_s)
                    continue
                self._drain()
                self._stop_settled_studies()
                self._start_queued()
            except ClusterUnavailableError as exc:
                self.loop_errors += 1
                logger.warning("scheduling paused: %s", exc)
            except Exception:
                # A database hiccup must not kill scheduling; the next tick tries again.
                self.loop_errors += 1
                logger.exception("job manager pass failed")
            self._wake.wait(self.settings.poll_interval_s)

    def _drain(self) -> None:
        with self._lock:
            runs = list(self._runs.items())
        for job_id, run in runs:
            if self._stop.is_set():
                return
            self._drain_one(job_id, run)

    def _drain_one(self, job_id: str, run: JobRun) -> None:
        job = self.store.get_job(job_id)
        if job is None or JobStatus(job.status).is_terminal:
            self._forget(job_id)
            return
        if job.cancel_requested:
            self._cancel_run(job_id, run)  # requested through another replica (or before a takeover); sent once
        cursor, ended, stored_any = job.record_seq, None, False
        try:
            # Asked before the poll, so that a run found over has all its records read in this pass.
            done = False
            if time.monotonic() - self._done_checked.get(job_id, 0.0) >= DONE_CHECK_S:
                self._done_checked[job_id] = time.monotonic()
                done = run.done()
            while True:
                records = run.poll(cursor, POLL_BATCH)
                if not records:
                    break
                # A database error here is not the run's failure: it leaves the pass (the loop retries, and a lost
                # lease steps down); the records wait in the run's log and are stored from the job's cursor later.
                result = self._ingest(job_id, records)
                for record in records:
                    if record.get("tracking_failure"):
                        tracker = str(record.get("tracker", "tracking"))
                        self.tracking_failures[tracker] = self.tracking_failures.get(tracker, 0) + 1
                stored_any = True
                cursor = result.record_seq
                self.records_ingested += result.stored
                if result.skipped_kinds:
                    logger.debug("job %s: records of kinds %s are not stored", job_id, result.skipped_kinds)
                if result.ended is not None:
                    ended = result.ended
                    break
                if len(records) < POLL_BATCH or self._stop.is_set():
                    break
        except _StoreError as exc:
            raise exc.__cause__ from None
        except Exception as exc:
            failures = self._poll_failures.get(job_id, 0) + 1
            self._poll_failures[job_id] = failures
            logger.warning("polling job %s failed (%d in a row): %s", job_id, failures, exc)
            if failures >= MAX_POLL_FAILURES:
                self.store.transition(
                    job_id,
                    JobStatus.FAILED,
                    error=f"lost contact with the run: {type(exc).__name__}: {exc}",
                    level="error",
                )
                self._forget(job_id)
                self._cancel_run(job_id, run)  # best effort: do not leave workers training for nobody
            return
        self._poll_failures.pop(job_id, None)
        if ended is not None:
            logger.info("job %s ended: %s", job_id, ended.value)
            if job.study_id is not None:
                self._study_checks.add(job.study_id)
            self._close_run(job_id, run)
        elif done and not stored_any:
            # Over, yet no end record came: never leave such a job running forever.
            latest = self.store.get_job(job_id)
            if latest is not None and not JobStatus(latest.status).is_terminal:
                cancelled = latest.cancel_requested
                self.store.transition(
                    job_id,
                    JobStatus.CANCELLED if cancelled else JobStatus.FAILED,
                    error="cancelled on request" if cancelled else "the run stopped without reporting an end",
                    level="info" if cancelled else "error",
                )
            self._close_run(job_id, run)

    def _ingest(self, job_id: str, records: list[dict[str, Any]]) -> Any:
        """Store records; a failure of the store is raised as `_StoreError` (it is not the run's failure)."""
        try:
            return self.store.ingest(job_id, records)
        except Exception as exc:
            raise _StoreError from exc

    def _close_run(self, job_id: str, run: JobRun) -> None:
        """Forget a finished run and remove its actors from the cluster (its records are all stored)."""
        self._forget(job_id)
        try:
            run.close()
        except Exception as exc:
            logger.warning("removing the actors of job %s failed: %s", job_id, exc)
        self.wake()

    def _forget(self, job_id: str) -> None:
        self._done_checked.pop(job_id, None)
        with self._lock:
            self._runs.pop(job_id, None)
            self._reserved.pop(job_id, None)
            self._cancelling.discard(job_id)
        self._poll_failures.pop(job_id, None)

    def _stop_settled_studies(self) -> None:
        """Cancel the queued trials of each study (one of whose trials just ended) whose verdict settled, when the
        study asks for `early_stop` (`service.jobs.early_stop`)."""
        from service.jobs.early_stop import stop_study_if_settled

        while self._study_checks and not self._stop.is_set():
            study_id = self._study_checks.pop()
            try:
                cancelled = stop_study_if_settled(self.store, study_id)
            except Exception:
                self._study_checks.add(study_id)
                raise
            if cancelled:
                logger.info("study %s stopped early: %d queued trials cancelled", study_id, cancelled)

    def _start_queued(self) -> None:
        if not self._resume_runs():
            return  # runs interrupted by a restart go first; queued jobs wait behind them
        queued = self.store.jobs_with_status(JobStatus.QUEUED)
        for job in queued:
            if self._stop.is_set():
                return
            with self._lock:
                running = len(self._runs)
            if running >= self.concurrency_limit():
                return
            try:
                spec = JobSpec.model_validate(job.spec)
                self.submit_check(spec, fresh=False)
            except ValueError as exc:
                # The cluster shrank, a data file vanished, or the spec no longer validates.
                self.store.transition(job.id, JobStatus.FAILED, error=str(exc), level="error")
                continue
            need = Admission.of(spec)
            if not self._fits_now(need):
                return  # the oldest job waits for resources; later jobs wait behind it
            self._launch(job.id, spec, need)

    def _resume_runs(self) -> bool:
        """Start again, oldest first, the runs that died with the service; True once none is left waiting."""
        from service.engine.checkpoints import resume_point
        from service.engine.runner import launch_run

        with self._lock:
            waiting = list(self._resume)
        for job_id in waiting:
            if self._stop.is_set():
                return False
            job = self.store.get_job(job_id)
            if job is None or job.status != JobStatus.RUNNING.value:
                self._forget_resume(job_id)
                continue
            if job.cancel_requested:
                self.store.transition(
                    job_id, JobStatus.CANCELLED, error="cancelled on request", message="job cancelled before it resumed"
                )
                self._forget_resume(job_id)
                continue
            try:
                spec = JobSpec.model_validate(job.spec)
                self.submit_check(spec)
            except ValueError as exc:
                self.store.transition(job_id, JobStatus.FAILED, error=str(exc), level="error")
                self._forget_resume(job_id)
                continue
            need = Admission.of(spec)
            with self._lock:
                running = len(self._runs)
            if running >= self.concurrency_limit() or not self._fits_now(need):
                return False
            # The newest checkpoint may be ahead of the stored records (see service.engine.checkpoints): resume
            # from the newest one whose epoch is stored, so the history continues without a gap.
            resume_after = self.store.stored_progress(job_id)
            runs_dir = self._checkpoints_dir()
            start = None if runs_dir is None else resume_point(runs_dir, job_id, resume_after["epoch"])
            self._forget_resume(job_id)
            if start is None:
                self.store.transition(
                    job_id,
                    JobStatus.FAILED,
                    error=RESTART_REASON,
                    message=f"job failed: {RESTART_REASON} and its checkpoints are gone; resubmit the job",
                    level="error",
                )
                continue
            epoch = start.epoch
            if not self.lease.held():  # only a leader starts runs (the lease may have gone during this pass)
                self._step_down()
                return False
            if self.store.mark_resumed(job_id, epoch, RESUME_REASON) is None:
                continue
            try:
                run = launch_run(
                    spec,
                    job_id,
                    self.job_dir(job_id),
                    data_root=self.settings.resolved_data_root(),
                    storage_uri=self.run_storage().uri,
                    allowed_schemes=self.settings.allowed_uri_schemes,
                    resume_from=start.path,
                    resume_after=resume_after,
                )
            except Exception as exc:
                logger.exception("resuming job %s failed", job_id)
                self.store.transition(
                    job_id,
                    JobStatus.FAILED,
                    error=f"could not resume the run after a {RESUME_REASON}: {type(exc).__name__}: {exc}",
                    level="error",
                )
                continue
            logger.info("resumed job %s from its checkpoint after epoch %d", job_id, epoch)
            with self._lock:
                self._runs[job_id] = run
                self._reserved[job_id] = need
            latest = self.store.get_job(job_id)
            if latest is not None and latest.cancel_requested:
                self._cancel_run(job_id, run)  # a cancel that came while the run was being started
        return True

    def _forget_resume(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._resume:
                self._resume.remove(job_id)

    def _fits_now(self, need: Admission) -> bool:
        capacity = self.cluster_capacity()
        with self._lock:
            used_cpus = sum(a.cpus for a in self._reserved.values())
            used_gpus = sum(a.gpus for a in self._reserved.values())
        free_cpus = float(capacity.get("cpus", 0.0)) - used_cpus
        free_gpus = float(capacity.get("gpus", 0.0)) - used_gpus
        return need.cpus <= free_cpus + 1e-9 and need.gpus <= free_gpus + 1e-9

    def _launch(self, job_id: str, spec: JobSpec, need: Admission) -> None:
        from service.engine.runner import launch_run

        if not self.lease.held():  # the lease may have gone during this pass: only a leader starts runs
            self._step_down()
            return
        started = self.store.transition(
            job_id,
            JobStatus.RUNNING,
            message=f"job started: {spec.workers} worker(s), {spec.model} on {spec.dataset.kind}, {spec.precision}"
            + (", channels_last" if spec.channels_last else "")
            + (", compiled" if spec.compile else ""),
        )
        if started is None:
            return  # cancelled between the listing and now
        output_dir = self.job_dir(job_id)
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = launch_run(
                spec,
                job_id,
                output_dir,
                data_root=self.settings.resolved_data_root(),
                storage_uri=self.run_storage().uri,
                allowed_schemes=self.settings.allowed_uri_schemes,
            )
        except Exception as exc:
            logger.exception("launching job %s failed", job_id)
            self.store.transition(
                job_id,
                JobStatus.FAILED,
                error=f"could not launch the run: {type(exc).__name__}: {exc}",
                level="error",
            )
            return
        with self._lock:
            self._runs[job_id] = run
            self._reserved[job_id] = need
            latest = self.store.get_job(job_id)
        if latest is not None and latest.cancel_requested:
            self._cancel_run(job_id, run)


class _StoreError(Exception):
    """Internal: the store failed while a run's records were being stored (its `__cause__` is the error)."""


def _fmt(value: float) -> str:
    """A resource amount without a needless '.0'."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
