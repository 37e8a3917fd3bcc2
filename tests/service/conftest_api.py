"""Helpers for the service's tests: a real uvicorn server on a free loopback port, a real `syncbn serve`
process, a throw-away PostgreSQL database, and spec factories.

Nothing here is a stand-in: `LiveServer` runs the application built by `create_app` in uvicorn (in a thread of
the test process, so it uses the session's local Ray), `ServeProcess` runs the `syncbn serve` command with its own
embedded Ray, and `postgres_database` creates a real database on the machine's PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from service.api import create_app
from service.settings import Settings

__all__ = [
    "LiveServer",
    "ServeProcess",
    "free_port",
    "postgres_database",
    "read_events",
    "tiny_spec",
    "wait_for",
]

POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A digits job that trains for a few steps only (a JSON body for POST /v1/jobs)."""
    spec: dict[str, Any] = {
        "name": "tiny-digits",
        "model": "small_resnet",
        "dataset": {"kind": "digits"},
        "workers": 2,
        "cpus_per_worker": 1,
        "epochs": 2,
        "batch_size": 16,
        "steps_per_epoch": 4,
        "stats_every": 2,
        "checkpoint_every": 0,
        "optimizer": {"name": "sgd", "lr": 0.1},
    }
    spec.update(overrides)
    return spec


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def read_events(
    client: httpx.Client, job_id: str, last_event_id: int | None = None, timeout: float = 180.0
) -> list[dict[str, Any]]:
    """Read a job's SSE stream until the server ends it; each event as {id, event, data}."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(timeout, connect=10)
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "":
                if "data" in current:
                    events.append(current)
                current = {}
            elif line.startswith(":") or line.startswith("retry:"):
                continue
            else:
                field, _, value = line.partition(": ")
                if field == "id":
                    current["id"] = int(value)
                elif field == "event":
                    current["event"] = value
                elif field == "data":
                    current["data"] = json.loads(value)
    return events


class LiveServer:
    """The app of `create_app(settings)` served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                timeout_graceful_shutdown=3,
                lifespan="on",
            )
        )
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = 60.0) -> LiveServer:
        self._thread.start()
        wait_for(lambda: self._server.started or not self._thread.is_alive(), timeout, "uvicorn to start")
        if not self._server.started:
            raise RuntimeError("the server did not start (see the log above)")
        return self

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServeProcess:
    """`syncbn serve` in its own process group (so a kill takes its embedded Ray down with it)."""

    def __init__(self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / f"serve-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-c",
            "from service.cli import main; raise SystemExit(main())",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
            *extra_args,
        ]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCBN_", "RAY_ADDRESS"))}
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"syncbn serve exited early:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, f"syncbn serve on port {self.port} to be ready", interval=0.5)
        return self

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """SIGKILL the whole process group: the service and its embedded Ray die at once, like a crash."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM the service (a graceful stop), then make sure its process group is gone."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self._log.close()
        return code

    @property
    def exit_code(self) -> int | None:
        return self.process.returncode


@contextlib.contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh, uniquely named database on the local PostgreSQL server, dropped afterwards.

    Yields its SQLAlchemy URL, or None when the server cannot be reached (callers skip with a reason).
    """
    try:
        import psycopg

        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True)
    except Exception:
        yield None
        return
    name = f"syncbn_test_{uuid.uuid4().hex[:12]}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with contextlib.suppress(Exception):
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
