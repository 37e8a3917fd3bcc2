"""Finding and stopping the processes an embedded Ray left behind when the service was killed.

An embedded Ray's GCS and raylet share the service's fate (Ray kills them when their parent dies), but processes
the raylet starts, such as its dashboard and runtime-env agents, outlive a SIGKILL of the service: about 170 MB
after every crash. So while it runs, `syncbn serve` writes the ids of every process below it to a file in its data
folder (`ray-processes.json`: pid and start time of each, and of the service itself); the next start on the same
data folder stops the ones of that list that still run.

Only processes named in that file are touched, never processes found by name, and each only when its start time
is still the recorded one (so a pid reused by an unrelated process is left alone). When the service that wrote
the file is itself still alive, nothing is stopped: its Ray is in use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import psutil

__all__ = ["PROCESS_FILE", "ProcessFileWriter", "record_processes", "stop_leftover_processes"]

logger = logging.getLogger(__name__)

#: Name of the file, in the data folder, listing the processes of the running service's embedded Ray.
PROCESS_FILE = "ray-processes.json"
#: Start times are floats read from the kernel; two reads of the same process agree far closer than this.
_SAME_START_S = 0.05


def _identity(process: psutil.Process) -> dict[str, Any]:
    return {"pid": process.pid, "create_time": process.create_time(), "name": process.name()}


def record_processes(data_dir: Path) -> int:
    """Write this process and every process below it to `data_dir/ray-processes.json`; returns how many.

    Processes that end while they are being listed are skipped. The file is replaced atomically.
    """
    me = psutil.Process(os.getpid())
    below = []
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            below.append(_identity(child))
    path = Path(data_dir) / PROCESS_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"service": _identity(me), "processes": below}))
    partial.replace(path)
    return len(below)


def _still_running(entry: Any) -> psutil.Process | None:
    """The process of a recorded entry if it still runs with the recorded start time, else None."""
    if not isinstance(entry, dict):
        return None
    pid, started = entry.get("pid"), entry.get("create_time")
    if isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(started, int | float):
        return None
    if pid <= 1:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - float(started)) > _SAME_START_S or process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return process


def stop_leftover_processes(data_dir: Path, timeout: float = 10.0) -> list[int]:
    """Stop the processes recorded by an earlier service on `data_dir` that still run; returns their pids.

    Each gets SIGTERM, and SIGKILL after `timeout` seconds. Nothing is stopped when the service that wrote
    the file still runs. The file is removed afterwards.
    """
    path = Path(data_dir) / PROCESS_FILE
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s: it cannot be read (%s)", path, exc)
        return []
    if not isinstance(recorded, dict):
        return []
    service = _still_running(recorded.get("service"))
    if service is not None:
        logger.warning(
            "the service that wrote %s (pid %d) still runs: its Ray processes are left alone", path, service.pid
        )
        return []
    entries = recorded.get("processes")
    found = (_still_running(entry) for entry in entries or [])
    leftovers = [p for p in found if p is not None and p.pid != os.getpid()]
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout)
    if leftovers:
        names = ", ".join(f"{p.pid}" for p in leftovers)
        logger.warning("stopped %d process(es) an earlier service's Ray left behind: pids %s", len(leftovers), names)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return [p.pid for p in leftovers]


class ProcessFileWriter:
    """Keeps `ray-processes.json` up to date while the service runs (Ray starts worker processes as it goes).

    Args:
        data_dir: the service's data folder.
        interval_s: seconds between two writes.
    """

    def __init__(self, data_dir: Path, interval_s: float = 5.0) -> None:
        self.data_dir = Path(data_dir)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="syncbn-ray-processes", daemon=True)

    def start(self) -> ProcessFileWriter:
        """Write the file now, then keep it current in a background thread."""
        record_processes(self.data_dir)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop updating and remove the file (a clean stop leaves nothing to clean up)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 5)
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / PROCESS_FILE).unlink()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                record_processes(self.data_dir)
            except Exception as exc:  # a full disk must not take the service down
                logger.warning("could not record the embedded Ray's processes: %s", exc)
