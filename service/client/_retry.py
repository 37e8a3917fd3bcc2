"""When the client tries a request again, and how long it waits first.

Only two failures are retried, because only they say the service did not act on the request:
- a connection error: the connection could not be opened (refused, connect timeout), or, for requests that are
  safe to repeat (GET, and a submit, whose Idempotency-Key makes a repeat return the first job), it was lost
  before the answer came;
- a 503: the service could not reach its Ray cluster (it sends `Retry-After`).
Every other 4xx/5xx, and a read timeout (the caller chose the timeout), is raised at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

__all__ = ["RetryPolicy", "is_retryable_error"]

#: Errors that happen before the request reaches the service: always safe to retry.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Errors that mean the connection was lost after the request was sent (the service may have acted on it).
_LOST = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def is_retryable_error(error: Exception, *, repeatable: bool) -> bool:
    """Whether a request that failed with `error` may be sent again (`repeatable`: repeating it is harmless)."""
    if isinstance(error, _NOT_SENT):
        return True
    return repeatable and isinstance(error, _LOST)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently the client retries connection errors and 503 answers.

    Args:
        retries: attempts after the first one (0: never retry). Default 5.
        backoff_s: the wait before the first retry; it doubles at each further retry. Default 0.5.
        max_backoff_s: the longest single wait, also the cap on a server's `Retry-After`. Default 8.
        jitter: waits are drawn between (1 - jitter) and 1 times the computed wait, so many clients that failed
            together do not come back together. Default 0.5.

    With the defaults a request is tried 6 times over 8-16 s.
    """

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0 (got {self.retries}).")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"backoff_s and max_backoff_s must be >= 0 (got {self.backoff_s}, {self.max_backoff_s}).")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1 (got {self.jitter}).")

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based); a numeric `Retry-After` header is honoured
        up to `max_backoff_s`."""
        wait = min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s) * (1 - self.jitter * random.random())
        if retry_after is not None and retry_after.strip().isdigit():
            wait = max(wait, min(float(retry_after), self.max_backoff_s))
        return wait
