"""Liveness and readiness probes (no authentication: orchestrators call them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import ray
from fastapi import APIRouter, Response, status
from fastapi.concurrency import run_in_threadpool

from service.api.deps import ManagerDep, StoreDep
from service.api.models import ReadinessPublic

__all__ = ["router"]

router = APIRouter(tags=["health"])

#: Seconds each readiness check may take before it counts as failed.
CHECK_TIMEOUT_S = 5.0


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """The process answers HTTP."""
    return {"status": "ok"}


def _ray_check() -> None:
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised")
    if not ray.cluster_resources():
        raise RuntimeError("the Ray cluster reports no resources")


async def _check(function: Callable[[], object]) -> str:
    """'ok', or why `function` raised or did not return within CHECK_TIMEOUT_S (it runs in a worker thread)."""
    try:
        await asyncio.wait_for(run_in_threadpool(function), CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


@router.get(
    "/readyz",
    response_model=ReadinessPublic,
    summary="Readiness",
    responses={503: {"model": ReadinessPublic, "description": "The database or Ray does not answer."}},
)
async def readyz(store: StoreDep, manager: ManagerDep, response: Response) -> ReadinessPublic:
    """The database answers `SELECT 1` and Ray reports its resources; 503 otherwise. Says which replica answers
    and which one leads (every replica is ready to serve the API; only the leader schedules)."""
    database, ray_state = await asyncio.gather(_check(store.ping), _check(_ray_check))
    ready = database == "ok" and ray_state == "ok"
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    try:
        leader = await asyncio.wait_for(run_in_threadpool(manager.leader), CHECK_TIMEOUT_S)
    except TimeoutError:
        leader = None
    return ReadinessPublic(
        ready=ready, database=database, ray=ray_state, replica=manager.replica, leader=leader, leading=manager.leading
    )
