"""The parts of restart recovery that need no service: which checkpoint a run resumes from (the newest one whose
epoch is stored, so the history has no gap), fresh Ray Train run names per launch, the record log that drops what
the store already holds, and the stopper of an earlier service's leftover processes (real processes, stopped by
recorded pid and start time only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from service.engine.checkpoints import SNAPSHOT_FILE, Checkpoint, job_checkpoints, next_run_name, resume_point
from service.engine.ray_leftovers import PROCESS_FILE, record_processes, stop_leftover_processes
from service.engine.recorder import RecordLog

JOB = "0123456789abcdef0123456789abcdef"


def _write_run(output_dir: Path, name: str, epochs: list[int]) -> Path:
    """A run folder as Ray Train leaves it: one checkpoint folder per epoch and the snapshot listing them."""
    folder = output_dir / "ray" / name
    results = []
    for epoch in epochs:
        (folder / f"checkpoint_{epoch:03d}").mkdir(parents=True)
        results.append({"checkpoint_dir_name": f"checkpoint_{epoch:03d}", "metrics": {"kind": "epoch", "epoch": epoch}})
    (folder / SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": results}))
    return folder


def test_resume_point_is_the_newest_checkpoint_whose_epoch_is_stored(tmp_path: Path) -> None:
    assert resume_point(tmp_path / "ray", JOB, 5) is None, "no checkpoint: nothing to resume"
    first = _write_run(tmp_path, f"syncbn-{JOB}", [4, 5])
    assert [c.epoch for c in job_checkpoints(tmp_path / "ray", JOB)] == [4, 5]
    assert resume_point(tmp_path / "ray", JOB, 5) == Checkpoint(5, (first / "checkpoint_005").resolve())
    assert resume_point(tmp_path / "ray", JOB, 4) == Checkpoint(4, (first / "checkpoint_004").resolve()), (
        "the newest checkpoint is ahead of the stored records: resuming from it would leave epoch 5 out"
    )
    assert resume_point(tmp_path / "ray", JOB, 3) == Checkpoint(0, None), "all ahead: start over, repeats are dropped"

    assert next_run_name(tmp_path / "ray", JOB) == f"syncbn-{JOB}-r1"
    second = _write_run(tmp_path, f"syncbn-{JOB}-r1", [7])
    (second / "checkpoint_007").rename(second / "gone")  # listed, but its folder was removed
    _write_run(tmp_path, f"syncbn-{JOB}-r2", [6])
    _write_run(tmp_path, "syncbn-another-job", [9])
    assert [c.epoch for c in job_checkpoints(tmp_path / "ray", JOB)] == [4, 5, 6]
    assert resume_point(tmp_path / "ray", JOB, 10).epoch == 6
    assert next_run_name(tmp_path / "ray", JOB) == f"syncbn-{JOB}-r3"
    (tmp_path / "ray" / f"syncbn-{JOB}-r2" / SNAPSHOT_FILE).write_text("{not json")
    assert [c.epoch for c in job_checkpoints(tmp_path / "ray", JOB)] == [4, 5]


def test_record_log_of_a_resumed_run_drops_what_is_stored() -> None:
    log = RecordLog(JOB, resume_after={"step": 12, "layers": 10, "epoch": 3})
    log.push(
        [
            {"kind": "step", "step": 10, "epoch": 3},
            {"kind": "layers", "step": 10, "epoch": 3, "layers": {}},
            {"kind": "epoch", "epoch": 3, "step": 12},
            {"kind": "step", "step": 12, "epoch": 3},
            {"kind": "layers", "step": 12, "epoch": 3, "layers": {}},
            {"kind": "step", "step": 14, "epoch": 4},
            {"kind": "epoch", "epoch": 4, "step": 16},
        ]
    )
    kept = [(r["kind"], r.get("step"), r.get("epoch")) for r in log.poll()]
    assert kept == [("layers", 12, 3), ("step", 14, 4), ("epoch", 16, 4)]
    assert [r["seq"] for r in log.poll()] == [1, 2, 3]


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def test_leftover_processes_are_stopped_by_recorded_pid_only(tmp_path: Path) -> None:
    child = _sleeper()  # stands for an agent of the embedded Ray
    stranger = _sleeper()  # its pid is listed with another start time: a pid reused by someone else
    try:
        # The list as a service writes it (built here by hand: recording this test process's children would
        # list the session's own Ray, which the stop below must not touch).
        me = psutil.Process()
        entry = {"pid": child.pid, "create_time": psutil.Process(child.pid).create_time(), "name": "python"}
        recorded = {
            "service": {"pid": me.pid, "create_time": me.create_time(), "name": "python"},
            "processes": [entry, {"pid": stranger.pid, "create_time": 1.0, "name": "python"}],
        }
        (tmp_path / PROCESS_FILE).write_text(json.dumps(recorded))
        assert stop_leftover_processes(tmp_path) == [], "the service that wrote the list runs: nothing is stopped"
        assert child.poll() is None

        recorded["service"] = {"pid": 2**22 + 7, "create_time": 1.0, "name": "python"}  # a service that is gone
        (tmp_path / PROCESS_FILE).write_text(json.dumps(recorded))
        stopped = stop_leftover_processes(tmp_path, timeout=5)
        assert child.pid in stopped and stranger.pid not in stopped
        assert child.wait(10) is not None
        assert stranger.poll() is None, "a pid whose start time differs belongs to someone else"
        assert not (tmp_path / PROCESS_FILE).exists()
        assert stop_leftover_processes(tmp_path) == []
    finally:
        for process in (child, stranger):
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_record_processes_lists_grandchildren(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)
        record_processes(tmp_path)
        pids = {p["pid"] for p in json.loads((tmp_path / PROCESS_FILE).read_text())["processes"]}
        grandchildren = {c.pid for c in psutil.Process(parent.pid).children()}
        assert parent.pid in pids and grandchildren and grandchildren <= pids
        assert os.getpid() not in pids
    finally:
        for process in [*psutil.Process(parent.pid).children(recursive=True), psutil.Process(parent.pid)]:
            process.kill()
        parent.wait(10)
