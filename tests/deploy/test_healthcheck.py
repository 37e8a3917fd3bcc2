"""deploy/docker/healthcheck.py, the images' health probe, against a real HTTP server on loopback.

Proves the exit codes Docker and compose act on: 0 for a 2xx answer, 1 for an error status or a closed port
(with the reason on stderr), 2 for a wrong call, and that without an argument it probes the service's /healthz
at SYNCBN_PORT.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.deploy.manifests import DOCKER_DIR

SCRIPT = DOCKER_DIR / "healthcheck.py"

pytestmark = pytest.mark.timeout(60)


class _Handler(BaseHTTPRequestHandler):
    """/healthz answers 200, /down answers 503, anything else 404."""

    def do_GET(self) -> None:
        status = {"/healthz": 200, "/down": 503}.get(self.path, 404)
        body = b'{"status": "ok"}' if status == 200 else b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""


@pytest.fixture()
def server_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_healthy_endpoint_exits_zero(server_port: int) -> None:
    result = _probe(f"http://127.0.0.1:{server_port}/healthz")
    assert (result.returncode, result.stderr) == (0, "")


def test_error_status_exits_one_with_the_reason(server_port: int) -> None:
    result = _probe(f"http://127.0.0.1:{server_port}/down")
    assert result.returncode == 1
    assert "HTTP 503" in result.stderr


def test_closed_port_exits_one_with_the_reason() -> None:
    result = _probe(f"http://127.0.0.1:{_closed_port()}/healthz")
    assert result.returncode == 1
    assert "unreachable" in result.stderr


def test_default_probes_the_service_healthz_at_syncbn_port(server_port: int) -> None:
    assert _probe(env={"SYNCBN_PORT": str(server_port)}).returncode == 0
    assert _probe(env={"SYNCBN_PORT": str(_closed_port())}).returncode == 1


def test_wrong_call_exits_two() -> None:
    result = _probe("http://a", "http://b")
    assert result.returncode == 2 and "usage" in result.stderr
