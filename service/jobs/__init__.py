"""Job lifecycle: the manager (`service.jobs.manager`) runs jobs through the states of `service.status`.

Import the manager from its module; this package re-exports the status enum for callers that read it from here.
The enum itself lives in `service.status`, below both the store and the manager, so the store never imports
from this package.
"""

from service.status import JobStatus

__all__ = ["JobStatus"]
