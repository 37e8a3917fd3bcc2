#!/usr/bin/env python3
"""Container health probe: exit 0 when an HTTP endpoint answers 2xx, 1 otherwise.

The images ship no curl or wget (they would add size and attack surface), but they all have Python. Docker's
HEALTHCHECK and compose call this script:

    syncbn-healthcheck                      # the service: http://127.0.0.1:$SYNCBN_PORT/healthz (port 8000)
    syncbn-healthcheck URL                  # anything else, e.g. a Ray head's dashboard /api/gcs_healthz

Standard library only, so it also runs where the project is not importable. The reason for a failure goes to
stderr, which `docker inspect` shows under State.Health.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def default_url() -> str:
    """The service's liveness endpoint on this container's loopback, at the port the service listens on."""
    port = os.environ.get("SYNCBN_PORT", "8000")
    return f"http://127.0.0.1:{port}/healthz"


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
    """Probe the URL given as the only argument (default: the service's /healthz); return the exit code."""
    if len(argv) > 1:
        sys.stderr.write(f"usage: syncbn-healthcheck [URL] (got {len(argv)} arguments)\n")
        return 2
    url = argv[0] if argv else default_url()
    problem = probe(url)
    if problem is not None:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
