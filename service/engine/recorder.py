"""The per-job record log: where a run's records wait until the service (or the CLI) reads them.

It runs as a detached, named Ray actor (`syncbn-recorder-{job_id}` in namespace `syncbn`, no CPU reserved), so
it outlives both the Ray Train controller that writes into it and a service restart that reads from it.

Records are dicts with `seq` (1-based, increasing) and `kind`: `step`, `epoch`, `layers`, `log` and, last, `end`.
Three kinds pushed by the controller are kept as state instead of being published: `info` (the current attempt's
workers and step counts), `summary` (the train loop's final report, from which the `end` record is built) and
`timeline` (marks of the run's start-up and wrap-up, `service.engine.timeline`, which the `end` record carries).

After a worker-group restart, the train loop resumes from its last checkpoint and reports some steps and epochs
again; the log keeps the first record of each step and epoch, so consumers see increasing step numbers. A run
resumed after a restart of the service starts a new log told what the store already holds (`resume_after`), so
the steps and epochs stored before the crash are not published twice either.


A `layers` record's payload, its per-layer `layers` summaries and per-channel `vectors` (float32 bytes), is
released once a reader polls past it: `poll(after_seq)` means everything up to `after_seq` has been consumed (the
service stores it before it asks for more), and the record keeps only its `seq`, `kind`, `step` and `epoch`. A
long run then holds a few hundred bytes per record in this actor, not its statistics: summaries alone are ~1.6 KB
per layer as Python dicts (measured), which for a ResNet-50 (53 layers) recorded 45,000 times would be ~3.8 GB.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from service.engine import timeline as run_timeline
from service.engine.running_lag import LAG_WINDOW, lag_warning

__all__ = ["END_STATUSES", "RECORDER_NAMESPACE", "RecordLog", "recorder_name"]

#: Ray namespace of the job and recorder actors.
RECORDER_NAMESPACE = "syncbn"
END_STATUSES = ("succeeded", "failed", "cancelled")


def recorder_name(job_id: str) -> str:
    """Name of the recorder actor of a job."""
    return f"syncbn-recorder-{job_id}"


class RecordLog:
    """Ordered, append-only records of one run (plain class; `runner` wraps it in a Ray actor).

    Responsibilities:
      - number records (`seq`) in arrival order and serve them by `poll(after_seq)`;
      - drop steps and epochs a resumed attempt reports a second time;
      - keep the latest worker info and the final summary;
      - write exactly one `end` record (the first `finish` wins) and refuse records after it.

    Args:
        job_id: the job's id.
        resume_after: for a run resumed after a service restart, the last `step`, `layers` step and `epoch`
            the store already holds: records up to them are dropped as repeats.
        launched_at: when the run was launched (Unix time; default: now), the timeline's first mark.
    """

    def __init__(
        self, job_id: str, resume_after: dict[str, int] | None = None, launched_at: float | None = None
    ) -> None:
        after = resume_after or {}
        self.job_id = job_id
        self._records: list[dict[str, Any]] = []
        self._last_step = {"step": int(after.get("step", 0)), "layers": int(after.get("layers", 0))}
        self._last_epoch = int(after.get("epoch", 0))
        self._best_val_acc: float | None = None
        self._last_epoch_record: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._summary: dict[str, Any] | None = None
        self._end: dict[str, Any] | None = None
        self._controller: Any = None
        self._released = 0  # records up to this seq no longer hold their per-channel vectors
        self._placement_groups: list[str] = []
        self._timeline: dict[str, Any] = {"launched": time.time() if launched_at is None else float(launched_at)}
        # The last recorded steps' layer summaries (drift and count only): the lag check at the end.
        self._recent_layers: collections.deque[dict[str, dict[str, Any]]] = collections.deque(maxlen=LAG_WINDOW)

    # ------------------------------------------------------------ writing

    def push(self, records: list[dict[str, Any]]) -> int:
        """Append records (without `seq`); returns the last `seq` written."""
        for record in records:
            if self._end is not None:
                break
            kind = record.get("kind")
            if kind == "info":
                self._info = {k: v for k, v in record.items() if k != "kind"}
                continue
            if kind == "timeline":
                run_timeline.merge(self._timeline, {k: v for k, v in record.items() if k != "kind"})
                continue
            if kind == "summary":
                self._summary = {k: v for k, v in record.items() if k != "kind"}
                self._append({"kind": "log", "level": "info", "message": _summary_line(self._summary)})
                continue
            if kind in ("step", "layers"):
                if record["step"] <= self._last_step[kind]:
                    continue
                self._last_step[kind] = record["step"]
                if kind == "layers":
                    self._recent_layers.append(
                        {
                            name: {"drift_mean": stats.get("drift_mean"), "count": stats.get("count")}
                            for name, stats in (record.get("layers") or {}).items()
                        }
                    )
            elif kind == "epoch":
                if record["epoch"] <= self._last_epoch:
                    continue
                self._last_epoch = record["epoch"]
                self._last_epoch_record = record
                val_acc = record.get("val_acc")
                if val_acc is not None and (self._best_val_acc is None or val_acc > self._best_val_acc):
                    self._best_val_acc = val_acc
            self._append(dict(record))
        return len(self._records)

    def set_controller(self, handle: Any) -> None:
        """Keep the Ray Train controller's actor handle (for cancelling) until the run ends."""
        if self._end is None:
            self._controller = handle
            run_timeline.merge(self._timeline, {"controller_started": time.time()})

    def mark(self, name: str, at: float) -> None:
        """Add a mark of the run's timeline (`service.engine.timeline`): `name` happened at Unix time `at`."""
        if self._end is None:
            run_timeline.merge(self._timeline, {name: at})

    def timeline(self) -> dict[str, Any]:
        """The run's timeline so far (mark name -> Unix time, and `epochs`)."""
        return dict(self._timeline)

    def controller(self) -> Any:
        """The Ray Train controller's actor handle, or None before it starts or after the run ended."""
        return self._controller

    def add_placement_group(self, placement_group_id: str) -> None:
        """Remember a placement group (hex id) reserved for the run's workers, so it can be removed at the end."""
        if placement_group_id not in self._placement_groups:
            self._placement_groups.append(placement_group_id)

    def placement_groups(self) -> list[str]:
        """Hex ids of every placement group reserved for the run's workers, oldest first."""
        return list(self._placement_groups)

    def log(self, level: str, message: str) -> int:
        """Append a `log` record; returns its `seq`."""
        return self.push([{"kind": "log", "level": level, "message": message}])

    def finish(self, status: str, error: str | None = None, model_path: str | None = None) -> dict[str, Any]:
        """Write the `end` record (only the first call counts) and return it.

        Args:
            status: "succeeded", "failed" or "cancelled".
            error: why the run failed (with rank and message for worker errors), or None.
            model_path: where the final model was written, or None.
        """
        if self._end is not None:
            return self._end
        if status not in END_STATUSES:
            raise ValueError(f"expected status in {END_STATUSES}, got {status!r}")
        summary = self._summary or {}
        last = self._last_epoch_record or {}
        precise_ran = summary.get("final_val_acc_precise") is not None
        warning = lag_warning(self._recent_layers, precise_ran) if status == "succeeded" else None
        if warning is not None:
            self._append({"kind": "log", "level": "warning", "message": warning})
        run_timeline.merge(self._timeline, {"ended": time.time()})
        self._append({"kind": "log", "level": "debug", "message": run_timeline.describe(self._timeline)})
        self._end = {
            "kind": "end",
            "status": status,
            "verdict": summary.get("verdict") if status != "cancelled" else None,
            "error": error,
            "epochs_done": summary.get("epochs_done", self._last_epoch),
            "best_val_acc": summary.get("best_val_acc", self._best_val_acc),
            "final_val_acc": summary.get("final_val_acc", last.get("val_acc")),
            "final_val_acc_precise": summary.get("final_val_acc_precise", last.get("val_acc_precise")),
            "final_train_loss": summary.get("final_train_loss", last.get("train_loss")),
            "warning": warning,
            "model_path": model_path,
            "finished_at": self._timeline["ended"],
            "timeline": dict(self._timeline),
        }
        self._append(self._end)
        self._controller = None  # a borrowed handle would keep the (finished) controller actor alive
        return self._end

    def _append(self, record: dict[str, Any]) -> None:
        record["seq"] = len(self._records) + 1
        self._records.append(record)

    # ------------------------------------------------------------ reading

    def poll(self, after_seq: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Records with `seq > after_seq`, in order (at most `limit` of them).

        The payload (`layers`, `vectors`) of `layers` records up to `after_seq` is released (already consumed).
        """
        start = max(0, int(after_seq))
        for record in self._records[self._released : min(start, len(self._records))]:
            if record["kind"] == "layers":
                record.pop("vectors", None)
                record.pop("layers", None)
        self._released = max(self._released, min(start, len(self._records)))
        end = len(self._records) if limit is None else min(len(self._records), start + max(0, limit))
        return self._records[start:end]

    def info(self) -> dict[str, Any]:
        """The current attempt's `world_size`, `device`, `steps_per_epoch`, `total_steps`,
        `resumed_from_epoch` and `workers` (rank, pid, hostname); empty before the workers start."""
        return dict(self._info)

    def summary(self) -> dict[str, Any] | None:
        """The train loop's final report (verdict, reason, epochs_done, ...), or None before it."""
        return None if self._summary is None else dict(self._summary)

    def end(self) -> dict[str, Any] | None:
        """The `end` record, or None while the run goes on."""
        return self._end

    def done(self) -> bool:
        """Whether the `end` record has been written."""
        return self._end is not None

    def last_seq(self) -> int:
        """`seq` of the newest record (0 when empty)."""
        return len(self._records)


def _summary_line(summary: dict[str, Any]) -> str:
    verdict = summary.get("verdict")
    parts = [f"training finished after {summary.get('epochs_done')} epochs: verdict {verdict}"]
    if summary.get("final_val_acc") is not None:
        parts.append(f"final val acc {summary['final_val_acc']:.4f}")
    if summary.get("final_val_acc_precise") is not None:
        parts.append(f"with precise BatchNorm {summary['final_val_acc_precise']:.4f}")
    if summary.get("reason"):
        parts.append(str(summary["reason"]))
    return "; ".join(parts)
