"""A job's checkpoints on disk, and where a run that died with the service can resume from.

Every launch of a job is one Ray Train run with its own folder in the run storage (`service.engine.storage`;
`runs_dir` below is that storage's local folder): `syncbn-<job>` for
the first, `syncbn-<job>-r<n>` for the n-th relaunch after a service restart (a fresh name, so Ray Train does not
resume on its own from the newest checkpoint of an earlier launch: the service picks the checkpoint). In each, Ray
Train (V2) keeps a snapshot, `checkpoint_manager_snapshot.json`, listing the run's kept checkpoints with the
metrics reported beside them; ours carry the `epoch` that was checkpointed.

Why the service picks: Ray Train registers a checkpoint before the report's records reach the job's record log,
and the service stores those records a moment later still. After a crash the newest checkpoint may therefore be
ahead of what the database holds; resuming from it would leave a gap in the metric and layer history. The newest
checkpoint at or before the last stored epoch has none.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from service.engine.storage import launch_pattern, next_launch_name

__all__ = ["Checkpoint", "job_checkpoints", "next_run_name", "resume_point"]

logger = logging.getLogger(__name__)

#: The file in which Ray Train (V2) lists a run's checkpoints, in the run's storage folder.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder of a job and the epoch it holds the state after (epoch 0, no path: the start)."""

    epoch: int
    path: Path | None


def _run_folders(runs_dir: Path, job_id: str) -> list[Path]:
    pattern = launch_pattern(job_id)
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and pattern.match(p.name))


def next_run_name(runs_dir: Path, job_id: str) -> str:
    """The Ray Train run name of the next launch of a job: a name none of its earlier launches used."""
    return next_launch_name(job_id, {p.name for p in _run_folders(runs_dir, job_id)})


def job_checkpoints(runs_dir: Path, job_id: str) -> list[Checkpoint]:
    """Every checkpoint of every launch of a job that is still on disk, by epoch (unreadable snapshots skipped)."""
    found: dict[int, Checkpoint] = {}
    for folder in _run_folders(runs_dir, job_id):
        try:
            snapshot = json.loads((folder / SNAPSHOT_FILE).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the checkpoint list %s: %s", folder / SNAPSHOT_FILE, exc)
            continue
        results = snapshot.get("checkpoint_results") if isinstance(snapshot, dict) else None
        for result in results if isinstance(results, list) else []:
            if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
                continue
            name, epoch = result.get("checkpoint_dir_name"), result["metrics"].get("epoch")
            if not isinstance(name, str) or isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
                continue
            path = (folder / name).resolve()
            if path.parent == folder.resolve() and path.is_dir():
                found[epoch] = Checkpoint(epoch, path)  # a later launch's checkpoint of the same epoch wins
    return [found[epoch] for epoch in sorted(found)]


def resume_point(runs_dir: Path, job_id: str, stored_epoch: int) -> Checkpoint | None:
    """The checkpoint to resume a job from, given the last epoch whose records are stored.

    Returns:
        The newest checkpoint at or before `stored_epoch`; `Checkpoint(0, None)` (start over; every record up to
        what is stored is then dropped as a repeat) when the job has checkpoints but all are newer; None when it
        has none.
    """
    checkpoints = job_checkpoints(runs_dir, job_id)
    if not checkpoints:
        return None
    usable = [c for c in checkpoints if c.epoch <= stored_epoch]
    return usable[-1] if usable else Checkpoint(0, None)
