"""Who may join which Ray: `syncbn serve`'s own guards and its embedded Ray's token, with real processes.

Proves that `syncbn serve --ray-address` refuses, with a sentence and before any connection, a cluster on another
machine reached without Ray's token; that `--ray-allow-insecure` lets it try anyway and that the join then ends at
its deadline with the last error (`--ray-join-timeout-s`); which environments count as sending a token; and that
the embedded Ray of `syncbn serve` refuses a driver started from another HOME (no token: "InvalidAuthToken") while
accepting one given the token `syncbn serve` left in its own HOME.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.engine.cluster import ray_address_host, sends_ray_token
from tests.service.conftest_api import ServeProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: TEST-NET-1 (RFC 5737): never a machine of ours, and not loopback.
REMOTE = "192.0.2.1"


def _serve(data_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`syncbn serve` run to its end, with no RAY_* or SYNCBN_* from the test's own environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SYNCBN_"))}
    env["HOME"] = str(data_dir)  # no ~/.ray/auth_token of whoever runs the tests
    command = [sys.executable, "-c", "from service.cli import main; raise SystemExit(main())", "serve"]
    command += ["--port", str(free_port()), "--data-dir", str(data_dir / "data"), "--log-level", "warning", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_refuses_a_remote_cluster_without_a_token(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--ray-address", f"ray://{REMOTE}:10001")
    assert result.returncode == 1, result
    assert f"refusing to join the Ray cluster at ray://{REMOTE}:10001 without a token" in result.stderr, result.stderr
    assert "RAY_AUTH_TOKEN" in result.stderr and "SYNCBN_RAY_ALLOW_INSECURE=true" in result.stderr, result.stderr
    assert "could not join" not in result.stderr, "refused before any attempt to connect"


def test_allow_insecure_tries_and_the_join_ends_at_its_deadline(tmp_path: Path) -> None:
    result = _serve(
        tmp_path, "--ray-address", f"ray://{REMOTE}:10001", "--ray-allow-insecure", "--ray-join-timeout-s", "0"
    )
    assert result.returncode == 1, result
    assert "refusing" not in result.stderr, result.stderr
    assert f"could not join the Ray cluster at ray://{REMOTE}:10001 within 0 s (1 attempt, without a token)" in (
        result.stderr
    ), result.stderr


def test_which_environments_send_a_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a" * 64, encoding="utf-8")
    empty = tmp_path / "empty"
    empty.write_text("", encoding="utf-8")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert sends_ray_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "secret"})
    assert sends_ray_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert not sends_ray_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(empty)})
    assert not sends_ray_token({"RAY_AUTH_MODE": "token", "HOME": str(home)}), "no ~/.ray/auth_token yet"
    (home / ".ray" / "auth_token").write_text("b" * 64, encoding="utf-8")
    assert sends_ray_token({"RAY_AUTH_MODE": "token", "HOME": str(home)})
    # Ray sends no token outside token mode, whatever lies around.
    assert not sends_ray_token({"RAY_AUTH_TOKEN": "secret", "HOME": str(home)})
    assert not sends_ray_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "secret"})


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("ray://ray-head:10001", "ray-head"),
        ("ray-head:6379", "ray-head"),
        ("127.0.0.1:6379", "127.0.0.1"),
        ("ray://[::1]:10001", "::1"),
        ("auto", None),
    ],
)
def test_ray_address_host(address: str, host: str | None) -> None:
    assert ray_address_host(address) == host


def _descendants(root: int) -> list[int]:
    """Pids of every process below `root`, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            parents[int(entry.name)] = int(raw[raw.rindex(b")") + 2 :].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _gcs_port(service: ServeProcess) -> int:
    for pid in _descendants(service.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # The embedded GCS listens on a port of its choosing (--gcs_server_port=0) and writes it to its session dir.
        if "gcs_server" in cmdline and (match := re.search(r"--session-dir=(\S+)", cmdline)):
            (port_file,) = Path(match.group(1)).glob("gcs_server_port_*")
            return int(port_file.read_text(encoding="utf-8").strip())
    raise AssertionError(f"no gcs_server below syncbn serve (pid {service.process.pid}):\n{service.log()}")


_DRIVER = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("JOINED", ray.cluster_resources().get("CPU"))
except Exception as error:
    print("REFUSED", type(error).__name__, error)
"""


def _driver(address: str, home: Path, **ray_env: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home), **ray_env}
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, address], capture_output=True, text=True, timeout=180, env=env
    )
    return result.stdout + result.stderr


def test_embedded_ray_refuses_a_client_from_another_home(tmp_path: Path) -> None:
    service_home, other_home = tmp_path / "service-home", tmp_path / "other-home"
    service_home.mkdir()
    other_home.mkdir()
    service = ServeProcess(tmp_path / "data", "--ray-num-cpus", "1", env={"HOME": str(service_home)})
    try:
        service.wait_ready(timeout=180)
        address = f"127.0.0.1:{_gcs_port(service)}"
        token_file = service_home / ".ray" / "auth_token"
        assert token_file.is_file(), "the embedded Ray keeps its token in the service's HOME"

        refused = _driver(address, other_home)
        assert "JOINED" not in refused and "REFUSED" in refused, refused[-3000:]
        assert "InvalidAuthToken" in refused, refused[-3000:]

        # The same driver with the service's token joins: the refusal above is the token's doing.
        joined = _driver(address, other_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        assert "JOINED 1.0" in joined, joined[-3000:]
    finally:
        if service.process.poll() is None:
            service.terminate(timeout=60)
