"""The lifecycle of a job: five states, which of them are final, and which moves between them are allowed.

The vocabulary shared by the store (which enforces the moves in the database) and the job manager (which makes
them): it lives here, below both, so neither imports the other to name a state.

```
queued ──► running ──► succeeded
   │          ├──────► failed
   │          └──────► cancelled
   ├─────────────────► cancelled   (cancelled before it started)
   └─────────────────► failed      (could not be launched)
```

A terminal job never changes again; the store enforces the allowed moves with a conditional update, so a
cancel request racing the scheduler can never resurrect a finished job.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["JobStatus"]


class JobStatus(str, Enum):
    """Where a job is in its life; members know whether they are final and what may follow them."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended (nothing will change it any more)."""
        return self in _TERMINAL

    def can_become(self, target: JobStatus) -> bool:
        """Whether moving from this state to `target` is an allowed transition."""
        return target in _NEXT[self]

    @classmethod
    def predecessors(cls, target: JobStatus) -> tuple[JobStatus, ...]:
        """The states from which `target` may be reached."""
        return tuple(state for state in cls if target in _NEXT[state])

    @classmethod
    def terminal(cls) -> tuple[JobStatus, ...]:
        """The final states, in declaration order."""
        return tuple(state for state in cls if state.is_terminal)


_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
_NEXT: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
