"""A run's timeline: when its start-up and wrap-up steps happened, so that their cost can be seen and measured.

Each part of the engine marks what it just did with the wall-clock time (`time.time()` on its own machine) and
sends the mark to the run's record log (`service.engine.recorder.RecordLog.mark`, or a `timeline` report of the
train loop). The record log keeps the marks and puts them in the `end` record as `timeline`, with a log line that
says how long each part took (`describe`). `bench/bench_engine.py` reads them.

Marks, in the order they happen:

- `launched`: `launch_run` was called (by `syncbn train`, or by the service's scheduler);
- `driver_started`: the job's driver actor runs (a Ray worker process was found or started for it);
- `data_ready`: the driver loaded and checked the data set;
- `fit_started`: the driver called `TorchTrainer.fit()`;
- `controller_started`: Ray Train's controller actor runs the run's callbacks;
- `workers_requested`: the controller asks for the worker group (placement group, then the worker actors);
- `workers_ready`: the worker group is up: placement group, worker processes, train context, process group;
- `loop_started` / `model_ready`: rank 0 entered the train loop / has its data, model, optimizer and DDP wrap;
- `first_step` / `last_step`: rank 0 finished the first / the last optimizer step of the run;
- `final_reported`: the controller has the final report, whose checkpoint (with the model) is in the storage;
- `fit_returned`: `fit()` returned in the driver (worker group and controller are gone);
- `ended`: the record log wrote the `end` record.

`epochs` lists `[epoch, started, trained, ended]` per epoch of the run (trained: after its last step; ended:
after its validation, report and checkpoint). A mark that an attempt after a worker failure sends again keeps its
first time, except `last_step`, `final_reported` and `fit_returned`, which keep the latest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LATEST_WINS", "MARKS", "STARTUP_PHASES", "WRAPUP_PHASES", "describe", "merge", "phase_seconds"]

MARKS = (
    "launched",
    "driver_started",
    "data_ready",
    "fit_started",
    "controller_started",
    "workers_requested",
    "workers_ready",
    "loop_started",
    "model_ready",
    "first_step",
    "last_step",
    "final_reported",
    "fit_returned",
    "ended",
)
#: Marks whose latest time counts (a later attempt's end replaces an earlier one's).
LATEST_WINS = frozenset({"last_step", "final_reported", "fit_returned"})

#: The parts of the start-up, from launch to the first step: (name, from mark, to mark).
STARTUP_PHASES = (
    ("driver start", "launched", "driver_started"),
    ("data", "driver_started", "data_ready"),
    ("controller start", "data_ready", "controller_started"),
    ("placement, worker start, process group", "controller_started", "workers_ready"),
    ("train function start", "workers_ready", "loop_started"),
    ("model build", "loop_started", "model_ready"),
    ("first step", "model_ready", "first_step"),
)
#: The parts of the wrap-up, from the last step to the end record.
WRAPUP_PHASES = (
    ("last validation and report", "last_step", "last_epoch_ended"),
    ("final checkpoint upload and report", "last_epoch_ended", "final_reported"),
    ("worker group and controller shutdown", "final_reported", "fit_returned"),
    ("end record", "fit_returned", "ended"),
)


def merge(timeline: dict[str, Any], marks: dict[str, Any]) -> None:
    """Add `marks` (mark name -> Unix time, and optionally `epochs`) to `timeline` in place."""
    for name, value in marks.items():
        if name == "epochs":
            known = {entry[0] for entry in timeline.get("epochs", [])}
            timeline.setdefault("epochs", []).extend(e for e in value if e[0] not in known)
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (name in LATEST_WINS or name not in timeline)
        ):
            timeline[name] = float(value)


def _points(timeline: dict[str, Any]) -> dict[str, float]:
    points = {k: v for k, v in timeline.items() if isinstance(v, float)}
    epochs = timeline.get("epochs") or []
    if epochs and epochs[-1][3] is not None:
        points["last_epoch_ended"] = float(epochs[-1][3])
    return points


def phase_seconds(timeline: dict[str, Any]) -> dict[str, float | None]:
    """Seconds spent in each start-up and wrap-up phase (None when a mark is missing, e.g. a failed run)."""
    points = _points(timeline)
    seconds: dict[str, float | None] = {}
    for name, start, end in STARTUP_PHASES + WRAPUP_PHASES:
        seconds[name] = points[end] - points[start] if start in points and end in points else None
    return seconds


def describe(timeline: dict[str, Any]) -> str:
    """One sentence: the start-up and wrap-up times and their parts, e.g. for the job's log."""
    points = _points(timeline)
    seconds = phase_seconds(timeline)

    def part(phases: tuple[tuple[str, str, str], ...], start: str, end: str, what: str) -> str | None:
        if start not in points or end not in points:
            return None
        inner = ", ".join(f"{name} {seconds[name]:.2f}" for name, *_ in phases if seconds[name] is not None)
        return f"{what} {points[end] - points[start]:.2f} s ({inner})"

    parts = [
        part(STARTUP_PHASES, "launched", "first_step", "start-up to the first step"),
        part(WRAPUP_PHASES, "last_step", "ended", "wrap-up from the last step"),
    ]
    shown = [p for p in parts if p is not None]
    return "timing: " + ("; ".join(shown) if shown else "no training step ran")
