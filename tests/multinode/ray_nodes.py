"""A real Ray cluster of two nodes on this machine: `ray start --head` plus `ray start --address`, each a process
tree of its own that the tests can kill alone, as if its machine had gone away.

Nothing here may disturb other Ray instances on the machine (other engineers' tests run at the same time):

- every port is picked free (GCS, node manager, object manager, agents, metrics, dashboard; workers bind random
  ports), so the default ports (6379 is Redis here, 8265, 10001, 52365) are never touched;
- each node has its own short `--temp-dir` (Unix socket paths must stay under 108 characters, which pytest's
  `tmp_path` would exceed), so `/tmp/ray` and its `ray_current_cluster` file, which `ray.init("auto")` reads,
  are left alone;
- nodes are stopped by process id, never by `ray stop` (which kills every Ray process of the machine);
- the cluster uses Ray's token authentication with its own random token (`RAY_AUTH_MODE=token`,
  `RAY_AUTH_TOKEN`), so a token file another Ray left in `~/.ray` changes nothing and no other driver can join.

Each node runs `ray start --block` in a new session, so its GCS, raylet and agents share one process group.
Ray's worker processes (actors, tasks) put themselves in process groups of their own, so `ProcessTracker` samples
`/proc` in a background thread and remembers every descendant of each node: that tells which node a worker pid ran
on, and lets `kill` take a node's workers down with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ProcessTracker", "RayNode", "TwoNodeCluster", "free_port"]

logger = logging.getLogger(__name__)

#: The `ray` command of the interpreter running the tests (the project's virtualenv).
RAY_COMMAND = str(Path(sys.executable).with_name("ray"))
#: GCS health checks of the raylets: a killed node is declared dead after about period x threshold
#: (Ray's defaults, 3 s x 5, would add ten seconds to the node-loss test).
HEALTH_CHECK_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child SIGKILLed when the test process dies (Linux `PR_SET_PDEATHSIG`).

    A `ray start --block` that dies takes its node down (Ray's reaper kills the node's process group), so even a
    test run killed outright leaves no Ray node behind. `prctl` is looked up here, in the parent: the child of a
    threaded process should do as little as possible before exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_parent_death_signal() -> None:
        prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

    return set_parent_death_signal


def free_port() -> int:
    """A TCP port that was free on this machine a moment ago (Ray binds all interfaces, so check those)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _read_proc_table() -> dict[int, tuple[int, int]]:
    """`{pid: (parent pid, start time in clock ticks)}` of every process visible in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue  # gone between the listing and the read
        # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
        fields = raw[raw.rindex(b")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


@dataclass
class RayNode:
    """One Ray node: its `ray start --block` process (leader of the node's process group) and its files."""

    name: str
    resources: dict[str, float]
    process: subprocess.Popen[bytes]
    log_path: Path
    #: Processes seen under this node: `(pid, start time)`; the start time tells a reused pid apart.
    seen: set[tuple[int, int]] = field(default_factory=set)
    killed: bool = False

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the node's `ray start` output (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def started(self) -> bool:
        """Whether `ray start` reported the node up; raises if it exited instead."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"ray start for node {self.name} exited with code {self.process.returncode}:\n{self.log_tail()}"
            )
        return "Ray runtime started" in self.log_tail(20_000)


class ProcessTracker:
    """Samples /proc every `interval` seconds and records, per node, every process descending from its root.

    A Ray worker lives as long as its actor (a training worker: the whole run), far longer than one interval,
    so `node_of(pid)` answers for any worker pid a run reported.
    """

    def __init__(self, nodes: list[RayNode], interval: float = 0.2) -> None:
        self._nodes = nodes
        self._interval = interval
        self._lock = threading.Lock()
        self._node_of: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-node-process-tracker", daemon=True)

    def add(self, node: RayNode) -> None:
        """Track one more node from the next sample on."""
        with self._lock:
            self._nodes.append(node)

    def start(self) -> ProcessTracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def sample(self) -> dict[int, tuple[int, int]]:
        """Take one sample now; returns the process table it was taken from."""
        table = _read_proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        with self._lock:
            for node in list(self._nodes):
                if node.killed:
                    continue
                stack = [node.process.pid]
                while stack:
                    pid = stack.pop()
                    if pid in table:
                        node.seen.add((pid, table[pid][1]))
                        self._node_of[pid] = node.name
                    stack.extend(children.get(pid, ()))
        return table

    def node_of(self, pid: int) -> str | None:
        """Name of the node the process `pid` ran under, or None if it was never seen under one."""
        with self._lock:
            return self._node_of.get(pid)

    def alive_processes(self, node: RayNode) -> list[int]:
        """Pids of the node's processes that still run (same pid and start time as when seen)."""
        table = self.sample()
        with self._lock:
            return [pid for pid, started in node.seen if table.get(pid, (None, None))[1] == started]

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sample()
            except Exception:  # a sampling hiccup must not end the thread; the next tick tries again
                logger.exception("sampling /proc failed")


class TwoNodeCluster:
    """Node "a" (the head, custom resource `node_a`) and node "b" (a worker, `node_b`), 2 CPUs each.

    Usage::

        cluster = TwoNodeCluster(log_dir).start()
        try:
            ...  # connect with cluster.address and cluster.env()
            cluster.kill("b")
        finally:
            cluster.shutdown()
    """

    def __init__(
        self,
        log_dir: Path,
        cpus_per_node: int = 2,
        object_store_bytes: int = 100_000_000,
        *,
        with_worker_node: bool = True,
    ) -> None:
        self.log_dir = log_dir
        self.with_worker_node = with_worker_node
        #: The head's Ray Client server port (`ray://127.0.0.1:<port>`), when Ray Client (grpcio) is installed.
        self.client_port: int | None = None
        self.cpus_per_node = cpus_per_node
        self.object_store_bytes = object_store_bytes
        self.gcs_port = free_port()
        self.token = secrets.token_hex(32)
        self.temp_root = Path(tempfile.mkdtemp(prefix="sbn-mn-", dir="/tmp"))
        self.nodes: dict[str, RayNode] = {}
        self.tracker = ProcessTracker([])

    @property
    def address(self) -> str:
        """The head's GCS address (what `ray.init(address=...)` and `ray start --address` take)."""
        return f"127.0.0.1:{self.gcs_port}"

    def env(self) -> dict[str, str]:
        """Environment for a process of this cluster: no inherited RAY_* settings, this cluster's token."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        return env

    def start(self, timeout: float = 120.0) -> TwoNodeCluster:
        """Start the head, then the worker once the head's GCS answers; return when both report up."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tracker.start()
        try:
            head_only = [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
            ]
            if importlib.util.find_spec("grpc") is not None:
                # With Ray Client installed, the head would otherwise start its server on the default port 10001.
                self.client_port = free_port()
                head_only.append(f"--ray-client-server-port={self.client_port}")
            self._start_node("a", head_only, {"node_a": 10}, extra_env=HEALTH_CHECK_ENV)
            deadline = time.monotonic() + timeout
            # The worker may join as soon as the head's GCS answers (`started()` raises if the head exited).
            self._wait(lambda: self.nodes["a"].started() or self._port_open(self.gcs_port), deadline)
            if self.with_worker_node:
                self._start_node("b", [f"--address={self.address}"], {"node_b": 10})
            self._wait(lambda: all(node.started() for node in self.nodes.values()), deadline)
        except BaseException:
            self.shutdown()
            raise
        return self

    def process_titles(self, name: str) -> list[str]:
        """Command lines of node `name`'s running processes; Ray workers show `ray::<Actor class>[.<method>]`."""
        titles = []
        for pid in self.tracker.alive_processes(self.nodes[name]):
            with contextlib.suppress(OSError):
                titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        return titles

    def kill(self, name: str) -> float:
        """SIGKILL every process of node `name` at once (its `ray start`, GCS or raylet, agents, workers).

        Returns the monotonic time of the kill.
        """
        node = self.nodes[name]
        victims = self.tracker.alive_processes(node)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        node.killed = True
        node.process.wait(30)
        logger.info("killed node %s (%d processes)", name, len(victims))
        return killed_at

    def shutdown(self) -> None:
        """Stop every process this cluster started (SIGTERM, then SIGKILL after a grace period), remove its files."""
        self.tracker.sample()
        victims = {name: self.tracker.alive_processes(node) for name, node in self.nodes.items()}
        self.tracker.stop()
        for name, node in self.nodes.items():
            for pid in [node.process.pid, *victims[name]]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(max(0.1, deadline - time.monotonic()))
        for name, node in self.nodes.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            for pid in victims[name]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(10)
        shutil.rmtree(self.temp_root, ignore_errors=True)

    # -- internals ----------------------------------------------------------------------------------------

    def _start_node(
        self, name: str, role_args: list[str], resources: dict[str, float], extra_env: dict[str, str] | None = None
    ) -> None:
        command = [
            RAY_COMMAND,
            "start",
            *role_args,
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.temp_root / name}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
            "--block",
        ]
        log_path = self.log_dir / f"ray-node-{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env(), **(extra_env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        node = RayNode(name=name, resources=resources, process=process, log_path=log_path)
        self.nodes[name] = node
        self.tracker.add(node)

    @staticmethod
    def _port_open(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    def _wait(self, predicate: Callable[[], bool], deadline: float) -> None:
        while not predicate():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- node {n.name}:\n{n.log_tail()}" for n in self.nodes.values())
                raise TimeoutError(f"the Ray nodes did not come up in time:\n{tails}")
            time.sleep(0.3)
