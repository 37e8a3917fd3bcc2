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


#: (the container's main command, the URL its probe must hit)
ROLE_COMMANDS = [
    (["ray", "start", "--head", "--port=6379", "--dashboard-port=8265", "--block"], "8265/api/gcs_healthz"),
    (["/opt/syncbn/bin/ray", "start", "--head", "--dashboard-port", "9265"], "9265/api/gcs_healthz"),
    (["ray", "start", "--head"], "8265/api/gcs_healthz"),
    (["ray", "start", "--address=ray-head:6379", "--block"], "52365/api/local_raylet_healthz"),
    # Behind an init (docker run --init, podman's catatonit): the command after it counts.
    (["/run/podman-init", "--", "ray", "start", "--address=h:6379"], "52365/api/local_raylet_healthz"),
    (["ray", "start", "--address=h:6379", "--dashboard-agent-listen-port=6000"], "6000/api/local_raylet_healthz"),
    (["syncbn", "serve"], "8000/healthz"),
    ([], "8000/healthz"),
]


@pytest.mark.parametrize(
    ("command", "expected"), ROLE_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_default_url_fits_the_containers_role(command: list[str], expected: str) -> None:
    """The image's one HEALTHCHECK probes what the container runs: a Ray head is never probed for a service."""
    from tests.deploy.manifests import load_healthcheck

    assert load_healthcheck().url_for_command(command) == f"http://127.0.0.1:{expected}"


def test_main_process_command_reads_a_nul_separated_cmdline(tmp_path) -> None:
    from tests.deploy.manifests import load_healthcheck

    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"ray\0start\0--head\0")
    module = load_healthcheck()
    assert module.main_process_command(str(cmdline)) == ["ray", "start", "--head"]
    assert module.main_process_command(str(tmp_path / "missing")) == []
