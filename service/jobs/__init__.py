"""Job lifecycle: the state machine (`service.jobs.status`) and the manager (`service.jobs.manager`).

Import the manager from its module; this package only re-exports the status enum, so the store can use it
without importing the manager (which depends on the store and on Ray).
"""

from service.jobs.status import JobStatus

__all__ = ["JobStatus"]
