"""Moved to `service.status` (the store and the manager both import it from there).

Kept only so that code written against the old path keeps importing; new code imports `service.status`.
"""

from service.status import JobStatus

__all__ = ["JobStatus"]
