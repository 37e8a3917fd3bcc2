"""Servers a test owns, so that it may stop and start them: a PostgreSQL server and a Ray head node.

- `OwnPostgres`: `initdb` in a temporary folder and the `postgres` server on a free loopback port (the machine's
  shared server on 5432 is never touched). `stop()` is a fast shutdown of that server's postmaster by its pid,
  `start()` starts it again on the same folder and port, so a test can take the database away and bring it back.
  As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root).
- `RayHead`: `ray start --head --block` on free ports with its own temporary folder; `stop()` ends that process
  and then, by pid, every process that was below it (GCS, raylet, workers, agents).
- `replica()`: a `syncbn serve` replica on a shared database and Ray cluster.

Every process is stopped by the pid this module started or found below it, never by name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.service.conftest_api import ServeProcess, free_port, wait_for

__all__ = ["OwnPostgres", "RayHead", "postgres_binaries", "replica"]


def postgres_binaries() -> Path | None:
    """The folder of `initdb` and `postgres` (the newest under /usr/lib/postgresql, else on PATH), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _stop_tree(process: psutil.Process, timeout: float = 20.0) -> None:
    """SIGTERM `process`, wait, then SIGKILL it and whatever was below it, each by pid."""
    try:
        below = process.children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(psutil.NoSuchProcess):
        process.terminate()
    _, alive = psutil.wait_procs([process], timeout=timeout)
    for leftover in [*alive, *below]:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs([process, *below], timeout=timeout)


class OwnPostgres:
    """A PostgreSQL server of the test's own, in a temporary folder, on a free port."""

    def __init__(self) -> None:
        binaries = postgres_binaries()
        if binaries is None:
            raise FileNotFoundError("initdb was not found (install the PostgreSQL server package)")
        self.binaries = binaries
        self.port = free_port()
        # A short path: the server's Unix socket lives here too, and socket paths are limited to ~100 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="syncbn-pg-"))
        self.data = self.folder / "data"
        self.log_path = self.folder / "server.log"
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self._user = {"user": account.pw_uid, "group": account.pw_gid}
        subprocess.run(
            [str(binaries / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
            **self._user,
        )
        self.process: subprocess.Popen | None = None

    @property
    def dsn(self) -> str:
        """libpq connection string of the server's `postgres` database."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> OwnPostgres:
        """Start the server (again) and wait until it accepts connections."""
        import psycopg

        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(self.binaries / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.folder),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._user,
        )
        log.close()

        def accepts() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"postgres exited early:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
            except psycopg.OperationalError:
                return False
            return True

        wait_for(accepts, timeout, f"PostgreSQL on port {self.port} to accept connections", interval=0.2)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster: sessions are ended, nothing is lost), waited for."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop_tree(psutil.Process(self.process.pid))
        # Its backends end with it; wait for them so the port is free for the next start.
        wait_for(lambda: not _listening(self.port), timeout, f"port {self.port} to be released")

    def remove(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RayHead:
    """`ray start --head --block` on free ports: a real Ray cluster outside every service replica."""

    def __init__(self, num_cpus: int = 4) -> None:
        self.port = free_port()
        self.temp = Path(tempfile.mkdtemp(prefix="syncbn-ray-"))
        self.log_path = self.temp / "ray-start.log"
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--ray-client-server-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        command = [
            sys.executable,
            "-c",
            "from ray.scripts.scripts import main; main()",
            "start",
            "--head",
            "--block",
            "--port",
            str(self.port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(num_cpus),
            "--temp-dir",
            str(self.temp),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            *[str(part) for pair in ports.items() for part in pair],
        ]
        # Token authentication with a token of this cluster's own (Ray's default would share ~/.ray/auth_token with
        # every other cluster started on the machine): whoever joins needs `env`.
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))} | self.env
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.address = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> RayHead:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"ray start exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            return _listening(self.port) and "Ray runtime started" in self.log_path.read_text(errors="replace")

        wait_for(up, timeout, f"the Ray head on port {self.port}", interval=0.5)
        return self

    def stop(self) -> None:
        """End `ray start` (which stops its node), then every process that was below it, by pid."""
        if self.process.poll() is None:
            _stop_tree(psutil.Process(self.process.pid))
        self.process.wait(30)
        shutil.rmtree(self.temp, ignore_errors=True)


def replica(data_dir: Path, database_url: str, ray: RayHead, name: str, *extra: str) -> ServeProcess:
    """A `syncbn serve` replica (not yet waited for) on the shared database and Ray cluster."""
    return ServeProcess(
        data_dir,
        "--database-url",
        database_url,
        "--ray-address",
        ray.address,
        "--replica-name",
        name,
        *extra,
        env=ray.env,
    )


def wait_gone(process: subprocess.Popen, timeout: float) -> int:
    """The exit code of `process` once it exited (within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"process {process.pid} still runs after {timeout:g} s")
        time.sleep(0.1)
    return process.returncode
