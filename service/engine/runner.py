"""Launching, following, re-attaching to and cancelling one training run on Ray.

Each run consists of two detached, named Ray actors in namespace `syncbn` (neither reserves a CPU; both are placed
on the node of the process that launches them, so losing another node does not take the run down with it):

- `syncbn-job-{job_id}` (`JobDriver`): loads and checks the data, runs `TorchTrainer.fit()` (which blocks, and
  whose Ray Train controller is pinned to this actor's node and owned by it), then writes the `end` record and
  exits;
- `syncbn-recorder-{job_id}` (`RecordLog`): the records, filled by the controller's `RecordingCallback`.

Both being detached, a service restart does not stop the run: `attach_run(job_id)` finds it again by name.
When the run died with the service (an embedded Ray goes down with it), `launch_run(..., resume_from=...)` starts
it again from a checkpoint that `service.engine.checkpoints.resume_point` picked: the train loop restores it
when Ray Train has none of its own to hand over (Ray Train V2's way to resume a run in a new cluster), and later
worker failures of that launch resume from its own newer checkpoints as usual.
Cancelling asks the Ray Train controller to abort (its worker group and placement group go away, so the run's CPUs
and GPUs come back), then kills the driver.

Usage::

    ensure_ray(None)
    run = launch_run(spec, "job42", Path("runs/job42"))
    seq = 0
    while not run.done():
        for record in run.poll(seq):
            seq = record["seq"]
        time.sleep(0.5)
    run.close()  # once every record has been read
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from service.engine.cluster import TRAIN_ENV_VARS, train_env_inherited
from service.engine.recorder import RECORDER_NAMESPACE, RecordLog, recorder_name
from service.engine.storage import RunStorage
from service.spec import JobSpec

logger = logging.getLogger(__name__)

__all__ = ["TRAIN_ENV_VARS", "JobRun", "attach_run", "driver_name", "launch_run"]

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RPC_TIMEOUT_S = 60.0


def driver_name(job_id: str) -> str:
    """Name of the driver actor of a job."""
    return f"syncbn-job-{job_id}"


@ray.remote(num_cpus=0, max_restarts=0)
class JobDriver:
    """Runs one job's `TorchTrainer.fit()` inside the cluster and records how it ended.

    Responsibilities:
      - prepare the data set (a bad npz, a missing folder or column fails here, before any worker starts): share
        in-memory tensors via the object store, hand Ray Data datasets to the trainer as `datasets=`;
      - configure Ray Train: scaling, gloo/NCCL, failure and checkpoint policy, the recording callback;
      - translate the outcome into the `end` record: status, verdict, error (rank and message), model path;
      - keep a second copy of the Ray Train controller's handle, so a cancel can still abort the controller (and
        free the placement group) when the record log is gone. `run()` blocks in `fit()`, so the actor is
        started with a second thread for these small calls.
    """

    def __init__(
        self,
        job_id: str,
        spec: dict[str, Any],
        output_dir: str,
        data_root: str | None,
        storage_uri: str,
        run_name: str,
        allowed_schemes: list[str] | None = None,
        resume_from: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.run_name = run_name
        self.resume_from = resume_from
        self.spec = JobSpec.model_validate(spec)
        self.output_dir = Path(output_dir)
        self.data_root = data_root
        self.storage = RunStorage(storage_uri)
        self.allowed_schemes = list(allowed_schemes or [])
        self.recorder = ray.get_actor(recorder_name(job_id), namespace=RECORDER_NAMESPACE)
        self._controller: ActorHandle | None = None
        self._mark("driver_started")

    def _mark(self, name: str) -> None:
        """Send a mark of the run's timeline to the record log (not waited for: calls from here stay in order)."""
        self.recorder.mark.remote(name, time.time())

    def set_controller(self, handle: ActorHandle) -> None:
        """Keep the Ray Train controller's handle (pushed by the controller itself when it starts)."""
        self._controller = handle

    def controller(self) -> ActorHandle | None:
        """The Ray Train controller's handle, or None before it started."""
        return self._controller

    def run(self) -> None:
        """Train, write the `end` record, then exit this actor."""
        status, error, model_path = "failed", None, None
        try:
            summary, model_path = self._fit()
            if summary is None:
                error = "training ended without a final report (see the log records)"
            elif summary.get("verdict") == "diverged":
                error, model_path = summary.get("reason") or "diverged", None
            elif model_path is None:
                error = f"training ended but its final model is missing from the storage {self.storage.uri}"
            else:
                status = "succeeded"
        except Exception as exc:  # every failure must end as a record, never as a silent dead actor
            error = _describe_failure(exc)
            logger.warning("job %s failed: %s", self.job_id, error)
        if error:
            ray.get(self.recorder.log.remote("error", error), timeout=_RPC_TIMEOUT_S)
        ray.get(self.recorder.finish.remote(status, error, model_path), timeout=_RPC_TIMEOUT_S)
        ray.actor.exit_actor()

    def _fit(self) -> tuple[dict[str, Any] | None, str | None]:
        """Run `TorchTrainer.fit()`; returns the final report and the final model's location in the storage."""
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from service.engine.data import prepare_data
        from service.engine.data.shard_config import ShardConfig
        from service.engine.model_registry import check_model_name
        from service.engine.recording_callback import (
            ControllerHandleCallback,
            PlacementGroupCallback,
            RecordingCallback,
            TrackingCallback,
        )
        from service.engine.tracking import RunTracker
        from service.engine.train_loop import train_loop_per_worker
        from service.spec import CONV_MODELS

        spec = self.spec
        check_model_name(spec.model)  # a clear failure here rather than one per worker
        # In-memory kinds are loaded here; streamed kinds are listed and checked here, and read by Ray Data.
        data = prepare_data(spec.dataset, spec.seed, self.data_root, self.allowed_schemes)
        self._mark("data_ready")
        info = data.info
        # The data's shape is known now (an npz file's only now): its channels against the model's.
        check_model_name(spec.model, info.sample_shape, spec.dataset.kind)
        if spec.model in CONV_MODELS and len(info.sample_shape) != 3:
            raise ValueError(
                f"model {spec.model!r} needs image samples (channels, height, width), but the data set's samples "
                f"have shape {info.sample_shape}: use model 'mlp' or save x as (N, C, H, W)."
            )
        if info.train_size < spec.workers or (info.streamed and info.val_size < spec.workers):
            raise ValueError(
                f"the data set has {info.train_size} training and {info.val_size} validation samples, fewer than "
                f"workers={spec.workers}: use fewer workers or more data."
            )
        ray.get(self.recorder.log.remote("info", info.describe()), timeout=_RPC_TIMEOUT_S)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # MLflow/TensorBoard run in the controller, which gets every merged report (service.engine.tracking).
        tracker = RunTracker(spec, self.job_id, self.storage.uri, self.run_name) if spec.tracking else None
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": spec.model_dump(mode="json"),
                "data": {
                    "info": info.to_dict(),
                    "splits": ray.put(data.splits) if data.splits is not None else None,
                },
                "resume_from": self.resume_from,
            },
            # Streamed kinds: Ray Train splits the training set equally over the ranks, the validation set
            # unevenly so that every row is scored once (service.engine.data.shard_config).
            datasets=data.datasets or None,
            dataset_config=ShardConfig(),
            torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=spec.workers,
                use_gpu=spec.use_gpu,
                placement_strategy=spec.placement_strategy,
                resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=self.run_name,
                storage_path=self.storage.storage_path(),
                failure_config=FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=[
                    RecordingCallback(self.recorder, tracker),
                    ControllerHandleCallback([self.recorder, ray.get_runtime_context().current_actor]),
                    PlacementGroupCallback(self.recorder),
                    *([TrackingCallback(tracker, self.recorder)] if tracker is not None else []),
                ],
                # Ray Train logs every report at INFO (with its metrics: whole layer statistics); ours go to
                # the recorder instead.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        self._mark("fit_started")
        result = trainer.fit()
        self._mark("fit_returned")
        summary = ray.get(self.recorder.summary.remote(), timeout=_RPC_TIMEOUT_S)
        model_path = None
        if result.checkpoint is not None:
            # The last checkpoint is the final report's, with the model in it (none when the run diverged).
            location = self.storage.model_location(result.checkpoint.path)
            model_path = self.storage.find_model(self.job_id, location)
            model_path = location if model_path is not None else None
        return summary, model_path


def _describe_failure(exc: BaseException) -> str:
    """One line per failed rank for worker errors, else the exception's type and message."""
    from ray.train import ControllerError, WorkerGroupError

    from service.engine.recording_callback import describe_worker_error

    if isinstance(exc, WorkerGroupError):
        failures = sorted(exc.worker_failures.items())
        return "; ".join(describe_worker_error(rank, error) for rank, error in failures)
    if isinstance(exc, ControllerError):
        return f"Ray Train controller failed: {exc.controller_failure!r}"
    return f"{type(exc).__name__}: {exc}"


class JobRun:
    """A handle on one run: read its records, wait for it, cancel it.

    Cheap to create and safe to drop: the run lives in the cluster, not in this object. Several `JobRun`s (e.g.
    before and after a service restart) may follow the same run.
    """

    def __init__(self, job_id: str, recorder: ActorHandle) -> None:
        self.job_id = job_id
        self._recorder = recorder

    def poll(self, after_seq: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Records with `seq > after_seq`, in order (at most `limit`)."""
        return ray.get(self._recorder.poll.remote(after_seq, limit), timeout=_RPC_TIMEOUT_S)

    def info(self) -> dict[str, Any]:
        """The current attempt's workers (rank, pid, hostname), world size, device and steps per epoch."""
        return ray.get(self._recorder.info.remote(), timeout=_RPC_TIMEOUT_S)

    def end(self) -> dict[str, Any] | None:
        """The `end` record once the run is over, else None."""
        return ray.get(self._recorder.end.remote(), timeout=_RPC_TIMEOUT_S)

    def done(self) -> bool:
        """Whether the run is over (its `end` record is written).

        A driver that vanished without writing one (its node died, or it was killed from outside) is recorded
        here as a failure, so a run can never stay "running" forever.
        """
        if ray.get(self._recorder.done.remote(), timeout=_RPC_TIMEOUT_S):
            return True
        if self._driver() is None:
            ray.get(
                self._recorder.finish.remote("failed", "the job's driver actor died before the run ended"),
                timeout=_RPC_TIMEOUT_S,
            )
            return True
        return False

    def wait(self, timeout: float | None = None, poll_interval: float = 0.5) -> bool:
        """Block until the run is over or `timeout` seconds have passed; returns `done()`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_interval)
        return True

    def cancel(self, timeout: float = 30.0) -> None:
        """Stop the run and free its workers; an `end` record with status "cancelled" follows.

        Asks the Ray Train controller to abort (as Ctrl-C on `fit()` does: the worker group and its placement
        group go away), then kills the driver actor. Returns once the driver is gone (or after `timeout` seconds).
        A run that already ended is left as it is.
        """
        recorder = self._recorder
        try:
            if ray.get(recorder.done.remote(), timeout=_RPC_TIMEOUT_S):
                return
            controller = ray.get(recorder.controller.remote(), timeout=_RPC_TIMEOUT_S)
            ray.get(recorder.log.remote("info", "cancel requested: stopping the workers"), timeout=_RPC_TIMEOUT_S)
            # The end record comes first, so the driver's view of the aborted fit() ("failed") cannot replace it.
            ray.get(recorder.finish.remote("cancelled"), timeout=_RPC_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            # The record log is unreachable (its node is gone): abort through the driver's copy of the controller
            # handle, then stop the driver, which owns the workers.
            logger.warning("job %s: record log unreachable while cancelling; stopping the driver anyway", self.job_id)
            controller = self._controller_from_driver()
        if controller is not None:
            # abort() ends by exiting the controller actor, so its reply is an actor error; a controller that is
            # already dead has nothing left to stop.
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.get(controller.abort.remote(), timeout=timeout)
        driver = self._driver()
        if driver is not None:
            ray.kill(driver, no_restart=True)
        deadline = time.monotonic() + timeout
        while self._driver() is not None and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        """Remove the run's actors, and any placement group it left reserved, from the cluster (call once its
        records are stored elsewhere).

        Cancels the run first if it is still going.
        """
        if not self.done():
            self.cancel()
        self.release_placement_groups()
        ray.kill(self._recorder, no_restart=True)
        # ray.kill returns before the name is released; wait for it, so that whoever looks the run up next (a
        # re-attach, a relaunch under the same id) finds it gone.
        deadline = time.monotonic() + _RPC_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                ray.get_actor(recorder_name(self.job_id), namespace=RECORDER_NAMESPACE)
            except ValueError:
                return
            time.sleep(0.05)
        logger.warning("job %s: the record log was still there %gs after it was killed", self.job_id, _RPC_TIMEOUT_S)

    def release_placement_groups(self) -> list[str]:
        """Remove the placement groups of a run that is over but left them reserved; returns their hex ids.

        A run that ends through Ray Train (success, failure, cancel) removes its own; one whose driver actor died
        does not (its controller died with it, and Ray ties the group to the service's Ray job). Does nothing
        while the run goes on.
        """
        if not ray.get(self._recorder.done.remote(), timeout=_RPC_TIMEOUT_S):
            return []
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        removed = []
        for group_id in ray.get(self._recorder.placement_groups.remote(), timeout=_RPC_TIMEOUT_S):
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
            state = ray.util.placement_group_table(group).get("state")
            if state in (None, "REMOVED"):
                continue
            remove_placement_group(group)
            removed.append(group_id)
        if removed:
            logger.warning("job %s: removed %d placement group(s) its run left reserved", self.job_id, len(removed))
        return removed

    def _controller_from_driver(self) -> ActorHandle | None:
        driver = self._driver()
        if driver is None:
            return None
        try:
            return ray.get(driver.controller.remote(), timeout=_RPC_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None

    def _driver(self) -> ActorHandle | None:
        try:
            return ray.get_actor(driver_name(self.job_id), namespace=RECORDER_NAMESPACE)
        except ValueError:
            return None


def launch_run(
    spec: JobSpec,
    job_id: str,
    output_dir: Path,
    *,
    data_root: Path | str | None = None,
    storage_uri: str | None = None,
    allowed_schemes: Sequence[str] = (),
    resume_from: Path | None = None,
    resume_after: dict[str, int] | None = None,
) -> JobRun:
    """Start a run without waiting for it (Ray must already be initialised, see `cluster.ensure_ray`).

    Args:
        spec: the job.
        job_id: a unique id (letters, digits, `_.-`, at most 64 characters); names the actors.
        output_dir: the job's local folder (on the launching node).
        data_root: directory data paths are resolved under (required for npz, and for local image_folder/parquet).
        storage_uri: where Ray Train keeps the run's checkpoints and final model (`service.engine.storage`): a
            folder every node reaches (local disk on one machine, an NFS mount on a cluster) or `s3://`/`gs://`.
            Default: `output_dir/ray`. The end record's `model_path` points into it.
        allowed_schemes: remote URI schemes (`s3`, `gs`) the data may be read from.
        resume_from: a checkpoint folder to start from (a run started again after a service restart).
        resume_after: for such a run, the last `step`, `layers` step and `epoch` already stored, so the new
            record log drops the steps and epochs the resumed run reports a second time.

    Raises:
        ValueError: a malformed job id, an unusable storage URI, or a run with this id still exists in the cluster.
        RuntimeError: Ray is not initialised.
    """
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call service.engine.cluster.ensure_ray() first")
    if not _JOB_ID.match(job_id):
        raise ValueError(
            f"job_id must be 1-64 letters, digits, '_', '.' or '-' starting with a letter or digit (got {job_id!r})"
        )
    if attach_run(job_id) is not None:
        raise ValueError(f"a run with job_id {job_id!r} still exists in the cluster: close it or use another id")
    launched_at = time.time()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    storage = RunStorage(storage_uri if storage_uri is not None else str(output_dir / "ray"))
    # Left to Ray, these zero-CPU actors may land on any node (on a multi-node cluster they often do), and a worker
    # node that dies or is scaled away would take the run's record log or driver, and so the whole run, with it.
    # On the launching node (the head, for the service) they live as long as the cluster. The affinity is hard:
    # Ray places a zero-resource request with a soft affinity on a random node.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    recorder = (
        ray.remote(RecordLog)
        .options(
            name=recorder_name(job_id),
            namespace=RECORDER_NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            max_restarts=0,
            scheduling_strategy=here,
        )
        .remote(job_id, resume_after, launched_at)
    )
    driver = JobDriver.options(
        name=driver_name(job_id),
        namespace=RECORDER_NAMESPACE,
        lifetime="detached",
        max_concurrency=2,  # run() blocks in fit(); set_controller/controller are served beside it
        scheduling_strategy=here,
        # An embedded Ray's workers have the variables already: no runtime_env, so an idle worker process serves.
        **({} if train_env_inherited() else {"runtime_env": {"env_vars": dict(TRAIN_ENV_VARS)}}),
    ).remote(
        job_id,
        spec.model_dump(mode="json"),
        str(output_dir),
        None if data_root is None else str(data_root),
        storage.uri,
        storage.next_run_name(job_id),
        list(allowed_schemes),
        None if resume_from is None else str(resume_from),
    )
    driver.run.remote()
    logger.info("launched job %s (%d workers, output %s)", job_id, spec.workers, output_dir)
    return JobRun(job_id, recorder)


def attach_run(job_id: str) -> JobRun | None:
    """Re-attach to a run by id (e.g. after a service restart); None when its recorder no longer exists."""
    try:
        recorder = ray.get_actor(recorder_name(job_id), namespace=RECORDER_NAMESPACE)
    except ValueError:
        return None
    return JobRun(job_id, recorder)
