"""The Ray cluster jobs run on: its resources, what is free, and the queue."""

from __future__ import annotations

import ray
from fastapi import APIRouter

from service.api.deps import ManagerDep, PrincipalDep
from service.api.models import ClusterPublic
from service.api.routes.responses import errors
from service.status import JobStatus

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["cluster"])


@router.get(
    "/cluster", response_model=ClusterPublic, summary="Read the cluster's capacity", responses=errors(401, 422, 503)
)
def read_cluster(manager: ManagerDep, principal: PrincipalDep) -> ClusterPublic:
    """Total and currently free CPUs/GPUs (free ones come back when a job ends or is cancelled), how many of
    your jobs (an admin's: everyone's) run and wait, which replica answered and which one leads."""
    capacity = manager.cluster_capacity(fresh=True)
    available = ray.available_resources()
    counts = manager.store.count_by_status(owner=principal.owner_filter())
    return ClusterPublic(
        cpus=float(capacity.get("cpus", 0.0)),
        gpus=float(capacity.get("gpus", 0.0)),
        available_cpus=float(available.get("CPU", 0.0)),
        available_gpus=float(available.get("GPU", 0.0)),
        nodes=list(capacity.get("nodes") or []),
        max_concurrent_jobs=manager.concurrency_limit(),
        running_jobs=counts[JobStatus.RUNNING],
        queued_jobs=counts[JobStatus.QUEUED],
        replica=manager.replica,
        leader=manager.leader(),
    )
