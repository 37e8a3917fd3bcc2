"""Connecting to Ray and asking what the cluster holds.

`ensure_ray(None)` starts an embedded single-node Ray (`address="local"`, so it never joins by accident a cluster
someone else started with `ray start` on the same machine); `ensure_ray("ray://...")` or `ensure_ray("auto")`
joins an existing cluster instead. `cluster_capacity()` tells the job manager what can ever fit.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

logger = logging.getLogger(__name__)

__all__ = ["cluster_capacity", "ensure_ray"]


def ensure_ray(address: str | None, num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Initialise Ray once in this process (a no-op when it already is).

    Args:
        address: None for an embedded local Ray; otherwise an address to join (`auto`, `host:port`,
            `ray://host:10001`), e.g. the value of `RAY_ADDRESS`.
        num_cpus: logical CPUs of the embedded Ray (default: the machine's count). Ignored when joining: a
            cluster's size is set where it was started.
        log_to_driver: forward the workers' stdout/stderr to this process (the CLI turns it off to keep its
            progress bar readable; worker errors still arrive as records).
    """
    if ray.is_initialized():
        return
    if address:
        if num_cpus is not None:
            logger.info("joining the Ray cluster at %s: num_cpus=%s is ignored", address, num_cpus)
        ray.init(address=address, log_to_driver=log_to_driver)
        logger.info("joined the Ray cluster at %s", address)
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    logger.info("started an embedded Ray with %s CPUs", ray.cluster_resources().get("CPU"))


def cluster_capacity() -> dict[str, Any]:
    """Total logical CPUs and GPUs of the alive nodes, plus one entry per node.

    Returns:
        `{"cpus": float, "gpus": float, "nodes": [{"node_id", "hostname", "cpus", "gpus"}, ...]}`; a job whose
        `JobSpec.resources()` exceeds these totals can never run on this cluster.

    Raises:
        RuntimeError: Ray is not initialised.
    """
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ensure_ray() first")
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        nodes.append(
            {
                "node_id": node.get("NodeID"),
                "hostname": node.get("NodeManagerHostname"),
                "cpus": float(resources.get("CPU", 0.0)),
                "gpus": float(resources.get("GPU", 0.0)),
            }
        )
    return {
        "cpus": sum(n["cpus"] for n in nodes),
        "gpus": sum(n["gpus"] for n in nodes),
        "nodes": nodes,
    }
