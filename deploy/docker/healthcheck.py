#!/usr/bin/env python3
"""Container health probe: exit 0 when an HTTP endpoint answers 2xx, 1 otherwise.

The images ship no curl or wget (they would add size and attack surface), but they all have Python. Docker's
HEALTHCHECK and compose call this script:

    syncbn-healthcheck                      # by role: the service's /healthz at $SYNCBN_PORT, or the Ray node's
    syncbn-healthcheck URL                  # anything else, e.g. a Ray head's dashboard /api/gcs_healthz

Without a URL the probe fits the container's role, read from its main process (`/proc/1/cmdline`, the command
after an init such as `docker run --init` or podman's catatonit): `ray start --head` probes the head's
`/api/gcs_healthz` at its `--dashboard-port` (8265), `ray start` of a worker the raylet's `/api/local_raylet_healthz`
at its `--dashboard-agent-listen-port` (52365), anything else the service's `/healthz`. So the image's one
HEALTHCHECK is right for every role the image's header starts, and a Ray node is never "unhealthy" for lack of a
service. Both Ray endpoints answer without Ray's token.

Standard library only, so it also runs where the project is not importable. The reason for a failure goes to
stderr, which `docker inspect` shows under State.Health.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0
#: Ray's defaults for the ports probed when `ray start` does not name them.
RAY_DASHBOARD_PORT = "8265"
RAY_AGENT_PORT = "52365"


def _option(command: list[str], name: str, default: str) -> str:
    """The value of `--name=value` or `--name value` in `command`, else `default`."""
    for index, word in enumerate(command):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and index + 1 < len(command):
            return command[index + 1]
    return default


def url_for_command(command: list[str]) -> str:
    """The health endpoint of a container whose main process runs `command` (argv, an init's prefix allowed)."""
    names = [os.path.basename(word) for word in command]
    for index, name in enumerate(names):
        if name == "ray" and index + 1 < len(command) and command[index + 1] == "start":
            ray_args = command[index + 2 :]
            if "--head" in ray_args:
                port = _option(ray_args, "--dashboard-port", RAY_DASHBOARD_PORT)
                return f"http://127.0.0.1:{port}/api/gcs_healthz"
            port = _option(ray_args, "--dashboard-agent-listen-port", RAY_AGENT_PORT)
            return f"http://127.0.0.1:{port}/api/local_raylet_healthz"
    return default_url()


def default_url() -> str:
    """The service's liveness endpoint on this container's loopback, at the port the service listens on."""
    port = os.environ.get("SYNCBN_PORT", "8000")
    return f"http://127.0.0.1:{port}/healthz"


def main_process_command(path: str = "/proc/1/cmdline") -> list[str]:
    """argv of the container's main process (empty when it cannot be read, e.g. outside a container)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def probe(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """GET `url`; None when it answered 2xx, else a sentence saying what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        return f"{url} answered HTTP {error.code} (expected 2xx)"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"{url} is unreachable: {reason}"
    if not 200 <= status < 300:
        return f"{url} answered HTTP {status} (expected 2xx)"
    return None


def main(argv: list[str]) -> int:
    """Probe the URL given as the only argument (default: the role's endpoint); return the exit code."""
    if len(argv) > 1:
        sys.stderr.write(f"usage: syncbn-healthcheck [URL] (got {len(argv)} arguments)\n")
        return 2
    url = argv[0] if argv else url_for_command(main_process_command())
    problem = probe(url)
    if problem is not None:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
