"""Persistence of jobs, metric points, layer statistics, logs, events and idempotency keys (SQLAlchemy)."""

from service.store.repository import IdempotencyKeyReusedError, IngestResult, JobStore, json_safe, utcnow

__all__ = ["IdempotencyKeyReusedError", "IngestResult", "JobStore", "json_safe", "utcnow"]
