"""The Ray Train callback that forwards every report round to the job's recorder actor.

Ray Train V2 calls `UserCallback.after_report` in the controller's process with one metrics dict per rank
(`metrics[i]` from world rank i) each time all workers have called `ray.train.report`. We merge them there
(`service.engine.reports.records_from_reports`) and push the records to the recorder. The callbacks hold only the
recorder's handle: per-job state lives in the recorder actor, which the service reads (the callback object itself
lives in another process, and `Result.metrics` is None for reports without a checkpoint).

With a `tracking` section in the spec, the same merged records also go to a `service.engine.tracking.RunTracker`
(MLflow, TensorBoard) that runs on a thread of this process; `TrackingCallback` ends its runs when the controller
finishes or aborts. The tracker's failures come back as `log` records in the next push.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.train import Checkpoint, UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from service.engine.reports import records_from_reports
from service.engine.tracking import RunTracker

logger = logging.getLogger(__name__)

__all__ = [
    "ControllerHandleCallback",
    "PlacementGroupCallback",
    "RecordingCallback",
    "TrackingCallback",
    "describe_worker_error",
]

_PUSH_TIMEOUT_S = 60.0


def describe_worker_error(rank: int, error: BaseException) -> str:
    """`rank R: Type: message` with the innermost exception's own message (not Ray's wrapper text)."""
    cause: BaseException = error
    while True:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
    message = str(cause).strip().splitlines()
    text = message[-1] if message else ""
    return f"rank {rank}: {type(cause).__name__}: {text}".rstrip(": ")


class RecordingCallback(UserCallback):
    """Merges each report round across ranks and pushes the records to the job's recorder actor.

    Args:
        recorder: handle of the job's recorder actor (`service.engine.recorder.RecordLog` as a Ray actor).
        tracker: the run's MLflow/TensorBoard tracker, or None; it gets every round's records (never blocking).
    """

    def __init__(self, recorder: ActorHandle, tracker: RunTracker | None = None) -> None:
        self._recorder = recorder
        self._tracker = tracker

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: Checkpoint | None,
    ) -> None:
        try:
            records = records_from_reports(metrics)
        except Exception as exc:  # a malformed report must not kill the controller; say so in the job's log
            logger.exception("could not merge a report round")
            records = [{"kind": "log", "level": "error", "message": f"could not merge a report round: {exc!r}"}]
        if any(r["kind"] == "summary" for r in records):
            # The final report is in: its checkpoint (with the model) has been uploaded to the run's storage.
            records.append({"kind": "timeline", "final_reported": time.time()})
        if checkpoint is not None:
            epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
            after = f" after epoch {epochs[0]}" if epochs else ""
            records.append({"kind": "log", "level": "debug", "message": f"checkpoint{after} saved: {checkpoint.path}"})
        if self._tracker is not None:
            final = checkpoint is not None and any(r["kind"] == "summary" for r in records)
            self._tracker.submit(records, checkpoint.path if final else None)
            records = records + self._tracker.take_log_records()
        # Waiting here keeps the order: records reach the recorder before the driver writes the end record.
        ray.get(self._recorder.push.remote(records), timeout=_PUSH_TIMEOUT_S)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        records = []
        for rank, error in sorted(worker_exceptions.items()):
            logger.debug("worker error on rank %d: %s", rank, "".join(traceback.format_exception(error)))
            records.append({"kind": "log", "level": "error", "message": describe_worker_error(rank, error)})
        ray.get(self._recorder.push.remote(records), timeout=_PUSH_TIMEOUT_S)


class TrackingCallback(ControllerCallback):
    """Ends the run's trackers with the run: their last records reach the record log before `fit()` returns.

    Holds the same `RunTracker` as the `RecordingCallback` of the run (both travel to the controller in one
    pickled list of callbacks, so they share it there).
    """

    def __init__(self, tracker: RunTracker, recorder: ActorHandle) -> None:
        self._tracker = tracker
        self._recorder = recorder

    def after_controller_finish(self, result: Any) -> None:
        records = self._tracker.close(failed=getattr(result, "error", None) is not None)
        if records:
            ray.get(self._recorder.push.remote(records), timeout=_PUSH_TIMEOUT_S)

    def before_controller_abort(self) -> None:
        self._tracker.abort()


class ControllerHandleCallback(ControllerCallback):
    """Hands the Ray Train controller's actor handle to the recorder (and the driver) as soon as it starts.

    Cancelling a run then calls the controller's own `abort()`, the path Ray Train takes on Ctrl-C: it tears the
    worker group down and removes its placement group. Killing the controller instead would leave the placement
    group reserved until the launching process exits (Ray ties it to the creating job, and Ray Train's own
    cleaner needs the dashboard's state API, which an embedded Ray without dashboard lacks).

    `ControllerCallback` is Ray Train's internal controller hook; `RunConfig(callbacks=...)` passes such callbacks
    through to the controller as they are (Ray 2.50-2.60).
    """

    def __init__(self, holders: list[ActorHandle]) -> None:
        self._holders = holders  # actors with a `set_controller(handle)` method: the record log and the driver

    def after_controller_start(self, train_run_context: Any) -> None:
        handle = ray.get_runtime_context().current_actor
        ray.get([holder.set_controller.remote(handle) for holder in self._holders], timeout=_PUSH_TIMEOUT_S)


class PlacementGroupCallback(WorkerGroupCallback):
    """Tells the job's record log the id of every placement group Ray Train reserves for the run's workers.

    Ray ties a placement group to the Ray job that created it: the service's, since the controller runs inside
    it. When a run ends without the controller's own clean-up (its driver actor was killed, its node died), the
    group stays reserved until the service exits. With the ids in the record log, `JobRun.close` removes what is
    left. (Ray Train's own cleaner needs the dashboard's state API, which an embedded Ray without dashboard lacks.)
    It also marks the run's timeline (`service.engine.timeline`): `workers_requested` and `workers_ready`.

    `WorkerGroupCallback` is Ray Train's internal worker-group hook, passed through like `ControllerCallback`.
    """

    def __init__(self, recorder: ActorHandle) -> None:
        self._recorder = recorder

    def before_worker_group_start(self, worker_group_context: Any) -> None:
        self._recorder.mark.remote("workers_requested", time.time())  # a timeline mark: not waited for

    def after_worker_group_start(self, worker_group: Any) -> None:
        # Ray Train's own callbacks ran before this one: the process group exists.
        ready = time.time()
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        ray.get(self._recorder.add_placement_group.remote(group.id.hex()), timeout=_PUSH_TIMEOUT_S)
        self._recorder.mark.remote("workers_ready", ready)
