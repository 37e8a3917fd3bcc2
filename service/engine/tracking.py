"""Mirroring a run into MLflow and TensorBoard (the spec's `tracking` section).

What is logged, from the merged records of `service.engine.reports` (the same the store keeps):

- MLflow: params (the whole spec, flattened: `optimizer.lr`, `dataset.kind`, ...) and the tag `syncbn.job_id`;
  per-step metrics `step/<field>` (train_loss, lr, samples_per_s, step_time_s; MLflow step = global step);
  per-epoch metrics `epoch/<field>` (train_loss, train_acc, val_loss, val_acc, epoch_time_s; step = epoch);
  per-layer summary scalars `layer/<name>/<key>` on every recorded step (`LAYER_SCALARS`: the between-rank share
  of the variance, the drift of the running statistics from the batch's, dead channels); the final model
  (`model.pt`, plain BatchNorm) as the artifact `model/model.pt`; the run ends FINISHED, FAILED (a failed or
  diverged job) or KILLED (cancelled).
- TensorBoard: the same scalars, plus per-layer histograms of the per-channel batch means and variances
  (`layer/<name>/batch_mean`, `layer/<name>/batch_var`), written with tensorboardX into the run storage:
  `<storage>/syncbn-<job>/tensorboard/` (each launch's own folder, so `tensorboard --logdir <storage>` shows
  every job; deleting a job deletes its events). With an `s3://`/`gs://` storage the events are written to a
  local folder and copied there when the run ends.

Where it runs: in the Ray Train controller's process, beside `RecordingCallback`, which hands each report
round's merged records to a `RunTracker` (and `TrackingCallback` ends it when the controller finishes or
aborts). That process already receives every report exactly once per round, already merged over the ranks, and
holds the final checkpoint's location; it lives exactly as long as the run. Tracking in every rank would
send W copies (or need rank-0-only logic and its own merge of the layer statistics), slow down the training
step, and a failing tracker could take a rank down. The record log actor would do too: it is shared with the
service's readers, and a slow tracker there would stall them. Here the tracker runs on a thread of its own
behind a bounded queue, so a slow or unreachable server never blocks the controller's report loop.

Failures never fail the job: each one becomes a `log` record (level warning, with `tracker` and
`tracking_failure` fields that the job manager counts for Prometheus), pushed with the next report round; a
tracker that fails `MAX_CONSECUTIVE_FAILURES` times in a row is switched off for the rest of the run; the last
line of each tracker says how many failures it had.

A tracking URI is a network destination that a request carries: `check_tracking` admits only the http(s)
servers of the operator's `tracking_uris` (compared after `normalize_tracking_uri`), at submit time; nothing is
executed or imported from it (the spec refuses file stores and plugin schemes such as databricks://).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from service.spec import TRACKING_URI_SCHEMES, JobSpec, MlflowSpec, TensorBoardSpec, TrackingSpec

logger = logging.getLogger(__name__)

__all__ = [
    "LAYER_SCALARS",
    "MAX_CONSECUTIVE_FAILURES",
    "TENSORBOARD_DIR",
    "RunTracker",
    "check_tracking",
    "flatten_spec",
    "normalize_tracking_uri",
]

#: Per-layer summary keys (of `syncbn.merge_packed_layer_stats`) logged as scalars on every recorded step.
LAYER_SCALARS = (
    "skew_between_share_mean",
    "skew_between_share_max",
    "skew_max_gap",
    "drift_mean",
    "drift_max",
    "dead_channels",
)
#: Folder of the event files inside a launch's run folder.
TENSORBOARD_DIR = "tensorboard"
#: Failures in a row after which a tracker is switched off for the rest of the run.
MAX_CONSECUTIVE_FAILURES = 3
#: Report rounds waiting for the tracker thread (a layers round of a large model holds ~1 MB); beyond this they are
#: dropped (and counted as a failure).
_QUEUE_SIZE = 256
#: The MLflow client's own retry policy (7 retries with exponential backoff, 120 s per request) would hold one
#: failing call for minutes; the operator's environment still wins (setdefault).
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_STEP_METRICS = ("train_loss", "lr", "samples_per_s", "step_time_s")
_EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s")
_MLFLOW_BATCH = 1000  # metrics per log_batch call (the server's limit)
_PARAM_BATCH = 100  # params per log_batch call (the server's limit)


def normalize_tracking_uri(uri: str, field: str = "tracking.mlflow.tracking_uri") -> str:
    """`scheme://host:port/path` with the scheme and host lower-cased, the default port spelled out and no trailing
    slash: two spellings of one server compare equal.

    Raises:
        ValueError: not an http(s) URI with a host, or one with credentials, a query or a fragment.
    """
    parts = urlsplit(uri.strip())
    scheme = parts.scheme.lower()
    if scheme not in TRACKING_URI_SCHEMES or not parts.hostname:
        raise ValueError(f"{field}: expected an http:// or https:// URI with a host (got {uri!r}).")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError(f"{field}: expected a URI without user:password@, ?query or #fragment (got {uri!r}).")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"{field}: the port of {uri!r} is not a number 0-65535.") from exc
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def check_tracking(tracking: TrackingSpec | None, allowed_uris: Sequence[str]) -> None:
    """Refuse an MLflow tracking URI the operator did not allow (`Settings.tracking_uris`).

    Raises:
        ValueError: a sentence naming `tracking.mlflow.tracking_uri`, what was asked and what is allowed.
    """
    if tracking is None or tracking.mlflow is None:
        return
    uri = tracking.mlflow.tracking_uri
    allowed = {normalize_tracking_uri(entry, "tracking_uris") for entry in allowed_uris}
    if normalize_tracking_uri(uri) in allowed:
        return
    listed = ", ".join(sorted(allowed_uris)) if allowed_uris else "none"
    raise ValueError(
        f"tracking.mlflow.tracking_uri {uri!r} is not a tracking server this service may contact (allowed: "
        f"{listed}): use an allowed server, or ask the operator to add it to tracking_uris (SYNCBN_TRACKING_URIS)."
    )


def flatten_spec(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"optimizer": {"lr": 0.1}}` -> `{"optimizer.lr": "0.1"}`: MLflow params are flat strings.

    Strings stay as they are; numbers, booleans, null and lists are written as JSON (`true`, `null`, `[1, 8, 8]`).
    """
    flat: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_spec(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number, else None (not logged)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Sink:
    """One tracker (MLflow or TensorBoard): its failure accounting; subclasses do the writing."""

    name = "tracker"

    def __init__(self) -> None:
        self.failures = 0
        self.in_a_row = 0
        self.disabled = False

    def start(self) -> str:
        """Open the destination; returns a sentence saying where the run goes."""
        raise NotImplementedError

    def step(self, record: dict[str, Any]) -> None:
        """Write a `step` record."""

    def epoch(self, record: dict[str, Any]) -> None:
        """Write an `epoch` record."""

    def layers(self, record: dict[str, Any]) -> None:
        """Write a `layers` record."""

    def finish(self, status: str, model_file: Path | None) -> None:
        """End the run: `status` is FINISHED, FAILED or KILLED; `model_file` the final model, if any."""


class _MlflowSink(_Sink):
    """Logs to an MLflow tracking server through `mlflow.MlflowClient` (mlflow-skinny suffices)."""

    name = "mlflow"

    def __init__(self, spec: MlflowSpec, job_id: str, job_spec: dict[str, Any], run_name: str) -> None:
        super().__init__()
        self.spec = spec
        self.job_id = job_id
        self.job_spec = job_spec
        self.run_name = run_name
        self.client: Any = None
        self.run_id: str | None = None

    def start(self) -> str:
        for key, value in _MLFLOW_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        client = MlflowClient(tracking_uri=self.spec.tracking_uri)
        experiment_id = self._experiment_id(client)
        # A relaunch of the job (after a service restart) continues the run its first launch created.
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`syncbn.job_id` = '{self.job_id}'", max_results=1
        )
        if found:
            run_id, resumed = found[0].info.run_id, True
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=self.run_name, tags={"syncbn.job_id": self.job_id})
            run_id, resumed = run.info.run_id, False
            params = [Param(key, value[:6000]) for key, value in flatten_spec(self.job_spec).items()]
            for start in range(0, len(params), _PARAM_BATCH):
                client.log_batch(run_id, params=params[start : start + _PARAM_BATCH])
            client.log_batch(run_id, tags=[RunTag("syncbn.model", str(self.job_spec.get("model")))])
        self.client, self.run_id = client, run_id
        how = "continuing" if resumed else "logging to"
        return (
            f"tracking: mlflow: {how} run {run_id} ({self.run_name!r}) of experiment "
            f"{self.spec.experiment_name!r} at {self.spec.tracking_uri}"
        )

    def _experiment_id(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.spec.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(self.spec.experiment_name)
        except Exception:
            experiment = client.get_experiment_by_name(self.spec.experiment_name)  # created meanwhile by another job
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, v, now, step) for key, value in values.items() if (v := _finite(value)) is not None]
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _MLFLOW_BATCH])

    def step(self, record: dict[str, Any]) -> None:
        self._log({f"step/{k}": record.get(k) for k in _STEP_METRICS}, int(record["step"]))

    def epoch(self, record: dict[str, Any]) -> None:
        self._log({f"epoch/{k}": record.get(k) for k in _EPOCH_METRICS}, int(record["epoch"]))

    def layers(self, record: dict[str, Any]) -> None:
        values = {
            f"layer/{name}/{key}": summary.get(key)
            for name, summary in (record.get("layers") or {}).items()
            for key in LAYER_SCALARS
        }
        self._log(values, int(record["step"]))

    def finish(self, status: str, model_file: Path | None) -> None:
        if model_file is not None and self.spec.log_model:
            self.client.log_artifact(self.run_id, str(model_file), artifact_path="model")
        self.client.set_terminated(self.run_id, status=status)


class _TensorBoardSink(_Sink):
    """Writes event files with tensorboardX (small: numpy and protobuf; TensorBoard itself only reads them)."""

    name = "tensorboard"

    def __init__(self, spec: TensorBoardSpec, logdir: str, upload_to: tuple[Any, str] | None) -> None:
        super().__init__()
        self.spec = spec
        self.logdir = logdir
        self.upload_to = upload_to  # (pyarrow filesystem, folder) for a bucket storage, written at the end
        self.writer: Any = None

    def start(self) -> str:
        from tensorboardX import SummaryWriter

        Path(self.logdir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(logdir=self.logdir, flush_secs=10)
        where = self.logdir if self.upload_to is None else f"{self.upload_to[1]} (copied there when the run ends)"
        return f"tracking: tensorboard: event files in {where}"

    def _scalars(self, values: dict[str, Any], step: int) -> None:
        for tag, value in values.items():
            if (v := _finite(value)) is not None:
                self.writer.add_scalar(tag, v, step)

    def step(self, record: dict[str, Any]) -> None:
        self._scalars({f"step/{k}": record.get(k) for k in _STEP_METRICS}, int(record["step"]))

    def epoch(self, record: dict[str, Any]) -> None:
        self._scalars({f"epoch/{k}": record.get(k) for k in _EPOCH_METRICS}, int(record["epoch"]))
        self.writer.flush()

    def layers(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, summary in (record.get("layers") or {}).items():
            self._scalars({f"layer/{name}/{key}": summary.get(key) for key in LAYER_SCALARS}, step)
        if not self.spec.histograms:
            return
        for name, block in (record.get("vectors") or {}).items():
            rows = np.frombuffer(block, dtype="<f4").reshape(4, -1)  # mean, var, running_mean, running_var
            for tag, row in (("batch_mean", rows[0]), ("batch_var", rows[1])):
                values = row[np.isfinite(row)]
                if values.size:
                    self.writer.add_histogram(f"layer/{name}/{tag}", values.astype(np.float64), step)

    def finish(self, status: str, model_file: Path | None) -> None:
        self.writer.close()
        if self.upload_to is not None:
            import pyarrow.fs as pafs

            filesystem, folder = self.upload_to
            pafs.copy_files(self.logdir, folder, pafs.LocalFileSystem(), filesystem)


class RunTracker:
    """Feeds one run's records to its trackers on a background thread; the job never waits for, nor fails by, them.

    Responsibilities:
      - build the trackers the spec asks for, lazily in the process that uses them (the object is created by the
        job's driver and pickled into the Ray Train controller, so it holds plain data until `submit`);
      - take each report round's records without blocking (`submit`); drop records past a bounded queue;
      - turn every tracker failure into a warning `log` record (`take_log_records`), switch a tracker off after
        `MAX_CONSECUTIVE_FAILURES` in a row;
      - end the trackers' runs with the job's outcome and log the final model (`close`), or as KILLED (`abort`).

    Args:
        spec: the job's spec (its `tracking` section says what to do).
        job_id: the job's id (MLflow tag `syncbn.job_id`; the run name when the spec has none).
        storage_uri: the run storage (`service.engine.storage.RunStorage`): where the event files and the final
            model live.
        run_name: the launch's Ray Train run name (its folder in the storage).
    """

    def __init__(self, spec: JobSpec, job_id: str, storage_uri: str, run_name: str) -> None:
        self.spec = spec
        self.job_id = job_id
        self.storage_uri = storage_uri
        self.run_name = run_name
        self._temporary: list[str] = []
        self._state: _TrackerThread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None}  # a thread and its queue belong to one process

    @property
    def active(self) -> bool:
        """Whether the spec asks for any tracker."""
        return self.spec.tracking is not None

    def submit(self, records: list[dict[str, Any]], checkpoint_path: str | None = None) -> None:
        """Queue one report round's records (and the final round's checkpoint folder); never blocks or raises."""
        if not self.active:
            return
        try:
            self._thread().submit(records, checkpoint_path)
        except Exception as exc:  # nothing here may reach the controller's report loop
            logger.exception("tracking: could not queue records")
            if self._state is not None:
                self._state.note_failure(None, f"could not queue records: {type(exc).__name__}: {exc}")

    def take_log_records(self) -> list[dict[str, Any]]:
        """The `log` records written since the last call (failures, where the run goes)."""
        return [] if self._state is None else self._state.take_log_records()

    def close(self, failed: bool, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Drain the queue, log the final model, end the runs; returns the last `log` records.

        Args:
            failed: the run failed (a worker error beyond max_failures); a diverged run counts as failed too.
            timeout_s: how long to wait for the trackers before giving up on them.
        """
        if self._state is None:
            return []
        return self._state.close("FAILED" if failed else None, timeout_s)

    def abort(self, timeout_s: float = 10.0) -> None:
        """End the runs as KILLED (a cancelled job), waiting at most `timeout_s`; no records (the log is closed)."""
        if self._state is not None:
            self._state.close("KILLED", timeout_s)

    def _thread(self) -> _TrackerThread:
        if self._state is None:
            try:
                sinks, problem = self._sinks(), None
            except Exception as exc:  # e.g. a storage URI that cannot be opened here: no tracker, the job goes on
                sinks, problem = [], f"could not set up the trackers: {type(exc).__name__}: {exc}"
            self._state = _TrackerThread(sinks, self._find_model, self._temporary)
            if problem is not None:
                self._state.note_failure(None, problem)
        return self._state

    def _find_model(self, checkpoint_path: str) -> Path | None:
        """The final model of the checkpoint folder as a local file (copied out of a bucket storage)."""
        from service.engine.storage import RunStorage

        storage = RunStorage(self.storage_uri)
        found = storage.find_model(self.job_id, storage.model_location(checkpoint_path))
        if found is None:
            return None
        if storage.is_local:
            return Path(found)
        return storage.copy_to(found, Path(self._temporary_dir("model")) / "model.pt")

    def _temporary_dir(self, what: str) -> str:
        """A local folder for a bucket storage's files, removed when the trackers end (`_TrackerThread.close`)."""
        folder = tempfile.mkdtemp(prefix=f"syncbn-{what}-{self.job_id}-")
        self._temporary.append(folder)
        return folder

    def _sinks(self) -> list[_Sink]:
        from service.engine.storage import RunStorage

        tracking = self.spec.tracking
        sinks: list[_Sink] = []
        if tracking is None:
            return sinks
        if tracking.mlflow is not None:
            run_name = tracking.mlflow.run_name or self.spec.name or self.job_id
            sinks.append(_MlflowSink(tracking.mlflow, self.job_id, self.spec.model_dump(mode="json"), run_name))
        if tracking.tensorboard is not None:
            storage = RunStorage(self.storage_uri)
            if storage.is_local:
                logdir, upload = str(Path(storage.base) / self.run_name / TENSORBOARD_DIR), None
            else:
                logdir = self._temporary_dir("tensorboard")
                upload = (storage.filesystem, f"{storage.base}/{self.run_name}/{TENSORBOARD_DIR}")
            sinks.append(_TensorBoardSink(tracking.tensorboard, logdir, upload))
        return sinks


class _TrackerThread:
    """The process-local half of a `RunTracker`: the queue, the worker thread and the pending log records."""

    def __init__(self, sinks: list[_Sink], find_model: Callable[[str], Path | None], temporary: list[str]) -> None:
        self.sinks = sinks
        self.find_model = find_model
        self.temporary = temporary
        self.last = {"step": -1, "layers": -1, "epoch": 0}  # a restarted worker group reports some rounds again
        self.queue: queue.Queue[tuple[list[dict[str, Any]], str | None] | None] = queue.Queue(_QUEUE_SIZE)
        self.lock = threading.Lock()
        self.logs: list[dict[str, Any]] = []
        self.started: set[str] = set()
        self.summary: dict[str, Any] | None = None
        self.checkpoint_path: str | None = None
        self.dropped = 0
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="syncbn-tracking", daemon=True)
        self.thread.start()

    def submit(self, records: list[dict[str, Any]], checkpoint_path: str | None) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait((records, checkpoint_path))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                self.note_failure(None, f"the tracking queue is full ({_QUEUE_SIZE} rounds): dropping records")

    def note_failure(self, sink: _Sink | None, message: str) -> None:
        """Count a failure of `sink` (None: of the tracking machinery) and queue its warning line."""
        name = sink.name if sink is not None else "tracking"
        logger.warning("tracking: %s: %s", name, message)
        lines = [{"kind": "log", "level": "warning", "message": f"tracking: {name}: {message}", "tracker": name}]
        lines[0]["tracking_failure"] = True  # what the job manager counts (syncbn_tracking_failures_total)
        if sink is not None:
            sink.failures += 1
            sink.in_a_row += 1
            if sink.in_a_row >= MAX_CONSECUTIVE_FAILURES and not sink.disabled:
                sink.disabled = True
                message = f"switched off after {sink.in_a_row} failures in a row; the job goes on without it"
                lines.append({"kind": "log", "level": "warning", "message": f"tracking: {name}: {message}"})
        with self.lock:
            self.logs.extend(lines)

    def note(self, message: str) -> None:
        with self.lock:
            self.logs.append({"kind": "log", "level": "info", "message": message})

    def take_log_records(self) -> list[dict[str, Any]]:
        with self.lock:
            taken, self.logs = self.logs, []
        return taken

    def _call(self, sink: _Sink, what: str, fn: Any, *args: Any) -> None:
        """Run one tracker call; a failure is counted and logged, never raised."""
        if sink.disabled:
            return
        if sink.name not in self.started and what != "starting the run":
            self._call(sink, "starting the run", self._start, sink)
            if sink.name not in self.started:
                return
        try:
            fn(*args)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            self.note_failure(sink, f"{what} failed: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
            return
        sink.in_a_row = 0

    def _start(self, sink: _Sink) -> None:
        self.note(sink.start())
        self.started.add(sink.name)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            records, checkpoint_path = item
            if checkpoint_path is not None:
                self.checkpoint_path = checkpoint_path
            for record in records:
                kind = record.get("kind")
                if kind == "summary":
                    self.summary = record
                    continue
                if kind in self.last:
                    position = int(record["epoch" if kind == "epoch" else "step"])
                    if position <= self.last[kind]:
                        continue
                    self.last[kind] = position
                for sink in self.sinks:
                    if kind == "step":
                        self._call(sink, "logging step metrics", sink.step, record)
                    elif kind == "epoch":
                        self._call(sink, "logging epoch metrics", sink.epoch, record)
                    elif kind == "layers":
                        self._call(sink, "logging layer statistics", sink.layers, record)

    def close(self, status: str | None, timeout_s: float) -> list[dict[str, Any]]:
        if self.closed:
            return self.take_log_records()
        self.closed = True
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout_s)
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            self.note_failure(None, f"the trackers did not finish within {timeout_s:g} s: the last records are missing")
            return self.take_log_records()
        if status is None:
            diverged = (self.summary or {}).get("verdict") == "diverged"
            status = "FAILED" if diverged or self.summary is None else "FINISHED"
        model_file = self._model_file() if status == "FINISHED" else None
        for sink in self.sinks:
            if sink.name in self.started:
                self._call(sink, "ending the run", sink.finish, status, model_file)
                self.note(f"tracking: {sink.name}: run ended {status}; {sink.failures} failure(s)")
            else:
                self.note(f"tracking: {sink.name}: {sink.failures} failure(s); nothing was logged")
        for folder in self.temporary:  # what a bucket storage needed locally (RunTracker._temporary_dir)
            shutil.rmtree(folder, ignore_errors=True)
        return self.take_log_records()

    def _model_file(self) -> Path | None:
        """The final model as a local file, or None when there is none (a failure to find it is counted)."""
        if self.checkpoint_path is None:
            return None
        try:
            return self.find_model(self.checkpoint_path)
        except Exception as exc:
            self.note_failure(None, f"could not read the final model: {type(exc).__name__}: {exc}")
            return None
