"""Connecting to Ray and asking what the cluster holds.

`ensure_ray(None)` starts an embedded single-node Ray (`address="local"`, so it never joins by accident a cluster
someone else started with `ray start` on the same machine); `ensure_ray("ray://...")` or `ensure_ray("auto")`
joins an existing cluster instead. `cluster_capacity()` tells the job manager what can ever fit.

An embedded Ray starts with `TRAIN_ENV_VARS` in its environment, which every worker process inherits: a job's
driver actor then needs no `runtime_env` of its own, so Ray runs it in one of the worker processes it keeps
started and idle (a `runtime_env` asks for a new process: a second or more of start-up per job). A joined cluster's
workers do not inherit this process's environment, so there the driver carries them in its `runtime_env`
(`train_env_inherited()` tells which).

Joining is guarded twice:

- A cluster on another machine is joined only with Ray's token authentication (`RAY_AUTH_MODE=token` and the
  cluster's token in `RAY_AUTH_TOKEN`, a file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`): a Ray
  cluster without it runs any code sent by whoever reaches its ports. `allow_insecure=True`
  (`SYNCBN_RAY_ALLOW_INSECURE=true`) joins one anyway. Loopback addresses and `auto` (a cluster of this machine)
  are not checked.
- A cluster that is still starting (a head whose Ray Client server is not up yet, next to a service started at the
  same time) is retried with backoff until `join_timeout_s` runs out, then a `RayJoinError` says what failed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray

from service.settings import is_loopback_host

logger = logging.getLogger(__name__)

__all__ = [
    "TRAIN_ENV_VARS",
    "InsecureRayClusterError",
    "RayJoinError",
    "cluster_capacity",
    "ensure_ray",
    "ray_address_host",
    "sends_ray_token",
    "train_env_inherited",
]

#: The environment variable that allows joining a remote cluster without a token (Settings.ray_allow_insecure).
ALLOW_INSECURE_ENV = "SYNCBN_RAY_ALLOW_INSECURE"
#: Longest pause between two attempts to join a cluster that is still starting.
MAX_JOIN_BACKOFF_S = 15.0
#: The environment of a job's driver, hence of its Ray Train controller: Train V2, and how often the controller
#: collects reports (Ray's default is 2 s; a worker reporting faster than the controller collects would block,
#: since each worker's report queue holds one entry). `bench/bench_layer_stats.py` runs under the same.
TRAIN_ENV_VARS = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
# The node id of the embedded Ray that ensure_ray started with TRAIN_ENV_VARS in its environment.
_train_env_node: str | None = None


class InsecureRayClusterError(ValueError):
    """A cluster on another machine would be joined without a token (see the module docstring)."""


class RayJoinError(RuntimeError):
    """The cluster could not be joined before the deadline; the message holds the last error."""


def ray_address_host(address: str) -> str | None:
    """The host of a Ray address (`ray://host:10001`, `host:6379`, `[::1]:6379`); None for `auto`/`local`."""
    if address.strip().lower() in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    return parts.hostname or address


def sends_ray_token(environ: dict[str, str] | None = None) -> bool:
    """Whether a Ray driver started with this environment authenticates with a token.

    Ray sends a token only in `RAY_AUTH_MODE=token`, read from `RAY_AUTH_TOKEN`, else the file at
    `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (Ray 2.60's order); a driver joining an explicit address never
    turns token mode on by itself.
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return False
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = env.get("RAY_AUTH_TOKEN_PATH") or str(Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token")
    try:
        return bool(Path(path).read_text(encoding="utf-8").strip())
    except OSError:
        return False


def _check_token_auth(address: str, allow_insecure: bool | None) -> None:
    """Refuse to join a cluster on another machine without a token, unless insecure joining is allowed."""
    host = ray_address_host(address)
    if host is None or is_loopback_host(host) or sends_ray_token():
        return
    if allow_insecure is None:
        allow_insecure = os.environ.get(ALLOW_INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
    if allow_insecure:
        logger.warning("joining the Ray cluster at %s without a token (%s is set)", address, ALLOW_INSECURE_ENV)
        return
    mode = os.environ.get("RAY_AUTH_MODE") or "unset"
    raise InsecureRayClusterError(
        f"refusing to join the Ray cluster at {address} without a token: {host} is another machine, and a Ray "
        "cluster reached without token authentication runs any code sent by whoever reaches its ports. Expected "
        f"RAY_AUTH_MODE=token with the cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, got "
        f"RAY_AUTH_MODE={mode} and no token; set {ALLOW_INSECURE_ENV}=true to join it anyway."
    )


def _join(address: str, log_to_driver: bool, join_timeout_s: float) -> None:
    """`ray.init(address)`, retried with backoff (1 s doubling up to 15 s) until `join_timeout_s` has passed."""
    deadline = time.monotonic() + join_timeout_s
    delay = 1.0
    attempt = 0
    while True:
        attempt += 1
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
            return
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, grpc errors... all worth a retry
            try:
                ray.shutdown()  # a half-made client connection would make the next ray.init a no-op
            except Exception:
                logger.debug("ray.shutdown after a failed join raised", exc_info=True)
            left = deadline - time.monotonic()
            if left <= 0:
                token = "with" if sends_ray_token() else "without"
                raise RayJoinError(
                    f"could not join the Ray cluster at {address} within {join_timeout_s:g} s ({attempt} "
                    f"attempt{'s' if attempt > 1 else ''}, {token} a token); last error: {type(exc).__name__}: "
                    f"{exc}. Check that the head is up and its port reachable, and that RAY_AUTH_TOKEN holds the "
                    "cluster's token when it uses token authentication."
                ) from exc
            pause = min(delay, left)
            logger.warning(
                "joining the Ray cluster at %s failed (attempt %d: %s: %s); next try in %.0f s, giving up in %.0f s",
                address,
                attempt,
                type(exc).__name__,
                exc,
                pause,
                left,
            )
            time.sleep(pause)
            delay = min(delay * 2, MAX_JOIN_BACKOFF_S)


def ensure_ray(
    address: str | None,
    num_cpus: int | None = None,
    *,
    log_to_driver: bool = True,
    join_timeout_s: float = 0.0,
    allow_insecure: bool | None = None,
) -> None:
    """Initialise Ray once in this process (a no-op when it already is).

    Args:
        address: None for an embedded local Ray; otherwise an address to join (`auto`, `host:port`,
            `ray://host:10001`), e.g. the value of `RAY_ADDRESS`.
        num_cpus: logical CPUs of the embedded Ray (default: the machine's count). Ignored when joining: a
            cluster's size is set where it was started.
        log_to_driver: forward the workers' stdout/stderr to this process (the CLI turns it off to keep its
            progress bar readable; worker errors still arrive as records).
        join_timeout_s: how long to keep retrying to join `address` (0: one attempt).
        allow_insecure: join a cluster on another machine without a token; None reads SYNCBN_RAY_ALLOW_INSECURE.

    Raises:
        InsecureRayClusterError: `address` is another machine and this process has no Ray token.
        RayJoinError: the cluster could not be joined within `join_timeout_s`.
    """
    if ray.is_initialized():
        return
    if address:
        if num_cpus is not None:
            logger.info("joining the Ray cluster at %s: num_cpus=%s is ignored", address, num_cpus)
        _check_token_auth(address, allow_insecure)
        _join(address, log_to_driver, join_timeout_s)
        logger.info("joined the Ray cluster at %s", address)
        return
    global _train_env_node
    os.environ.update(TRAIN_ENV_VARS)  # inherited by the raylet, hence by every worker process it starts
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    _train_env_node = ray.get_runtime_context().get_node_id()
    logger.info("started an embedded Ray with %s CPUs", ray.cluster_resources().get("CPU"))


def train_env_inherited() -> bool:
    """Whether the Ray workers of this process's cluster have `TRAIN_ENV_VARS` in their environment: true for the
    embedded Ray that `ensure_ray` started (while this environment still holds them), false for a joined one."""
    return (
        _train_env_node is not None
        and ray.is_initialized()
        and ray.get_runtime_context().get_node_id() == _train_env_node
        and all(os.environ.get(name) == value for name, value in TRAIN_ENV_VARS.items())
    )


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
