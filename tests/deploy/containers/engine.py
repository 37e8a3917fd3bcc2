"""A container engine (docker or podman) driven through its CLI, and the compose stack started as plain run commands.

`ContainerEngine.find()` returns the engine `deploy/podman/engine.sh` names (a docker CLI without a daemon does not
count), or None with the reason. `ComposeStack` starts the services of `deploy/compose.yaml` the way compose would
(the same commands, environments, shm sizes and shared volume, on one network where each service resolves by its
compose name), but with `docker run`/`podman run`: podman-compose and the compose plugin are not available
everywhere, and running each container by hand lets a test kill one. Every container, the network and the volume
carry one random prefix, are labelled, and are removed by name at the end.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.deploy.manifests import COMPOSE_FILE, DEPLOY_DIR, interpolate, load_documents

__all__ = ["ComposeStack", "ContainerEngine"]

logger = logging.getLogger(__name__)

ENGINE_SCRIPT = DEPLOY_DIR / "podman" / "engine.sh"
#: Label on everything a test creates, so leftovers of a killed run can be found by hand (`... ps -a --filter`).
LABEL = "org.syncbn.test=containers"


@dataclass
class ContainerEngine:
    """The `docker` or `podman` command."""

    name: str

    @classmethod
    def find(cls) -> tuple[ContainerEngine | None, str]:
        """The usable engine, or None and why there is none."""
        result = subprocess.run([str(ENGINE_SCRIPT)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            return None, result.stderr.strip() or f"{ENGINE_SCRIPT.name} exited with {result.returncode}"
        return cls(result.stdout.strip()), ""

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`<engine> args...`; raises with the engine's stderr when it fails and `check` is set."""
        result = subprocess.run([self.name, *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{self.name} {' '.join(args[:3])}... exited with {result.returncode}: {result.stderr.strip()[-2000:]}"
            )
        return result

    def image_exists(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False).returncode == 0

    def logs(self, container: str, tail: int = 60) -> str:
        result = self.run("logs", "--tail", str(tail), container, check=False)
        return (result.stdout + result.stderr)[-6000:]

    def healthy(self, container: str) -> tuple[bool, str]:
        """Run the image's HEALTHCHECK in `container` now: (healthy, what it said)."""
        if self.name == "podman":
            # Podman schedules health checks through systemd timers, absent in many CI containers: run it now.
            result = self.run("healthcheck", "run", container, check=False, timeout=60)
            return result.returncode == 0, (result.stdout + result.stderr).strip()
        result = self.run("inspect", "--format", "{{json .State.Health}}", container, check=False)
        return '"Status":"healthy"' in result.stdout, result.stdout.strip()


@dataclass
class ComposeStack:
    """The compose file's services as containers: `start("ray-head", name="head")` and so on."""

    engine: ContainerEngine
    image: str
    env: dict[str, str]
    prefix: str = field(default_factory=lambda: f"sbn-ct-{secrets.token_hex(3)}")
    containers: list[str] = field(default_factory=list)
    created_network: bool = False
    created_volume: bool = False

    @property
    def network(self) -> str:
        return f"{self.prefix}-net"

    @property
    def volume(self) -> str:
        return f"{self.prefix}-shared"

    def compose_service(self, service: str) -> dict[str, Any]:
        (compose,) = load_documents(COMPOSE_FILE)
        return compose["services"][service]

    def create(self) -> ComposeStack:
        self.engine.run("network", "create", "--label", LABEL, self.network)
        self.created_network = True
        self.engine.run("volume", "create", "--label", LABEL, self.volume)
        self.created_volume = True
        return self

    def start(
        self,
        service: str,
        name: str,
        *,
        drop_env: tuple[str, ...] = (),
        publish: str | None = None,
        extra_env: dict[str, str] | None = None,
        restart: bool = False,
    ) -> str:
        """Start compose's `service` as the container `<prefix>-<name>` (hostname `name`); returns its name.

        `restart`: with compose's restart policy (left out by default, so that a crash shows).
        """
        spec = self.compose_service(service)
        container = f"{self.prefix}-{name}"
        command = [interpolate(str(word), self.env) for word in spec.get("command", [])]
        environment = {k: interpolate(str(v), self.env) for k, v in spec.get("environment", {}).items()}
        environment = {k: v for k, v in environment.items() if k not in drop_env} | (extra_env or {})
        args = ["run", "--detach", "--name", container, "--hostname", name, "--label", LABEL]
        args += ["--network", self.network, "--network-alias", service]
        if "shm_size" in spec:
            args += ["--shm-size", interpolate(str(spec["shm_size"]), self.env)]
        for volume in spec.get("volumes", []):
            source, _, target = str(volume).partition(":")
            args += ["--volume", f"{self.volume if source == 'shared' else source}:{target}"]
        for key, value in environment.items():
            args += ["--env", f"{key}={value}"]
        if publish:
            args += ["--publish", publish]
        if restart and "restart" in spec:
            args += ["--restart", str(spec["restart"])]
        self.containers.append(container)
        self.engine.run(*args, self.image, *command)
        return container

    def exec(self, container: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.engine.run("exec", container, *command, timeout=timeout, check=False)

    def run_once(self, *command: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
        """A throwaway container of the image on the stack's network; returns its stdout and stderr together."""
        args = ["run", "--rm", "--label", LABEL, "--network", self.network]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        result = self.engine.run(*args, self.image, *command, timeout=timeout, check=False)
        return result.stdout + result.stderr

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{self.diagnostics()}")
            time.sleep(interval)

    def running(self, container: str) -> bool:
        result = self.engine.run("inspect", "--format", "{{.State.Running}}", container, check=False)
        return result.stdout.strip() == "true"

    def diagnostics(self) -> str:
        """The tail of every container's log (for failure messages)."""
        return "\n".join(f"--- {c}:\n{self.engine.logs(c, tail=25)}" for c in self.containers)

    def remove(self) -> None:
        """Remove every container (by name), then the network and the volume; never raises."""
        for container in reversed(self.containers):
            with contextlib.suppress(Exception):
                self.engine.run("rm", "--force", "--volumes", container, timeout=120, check=False)
        if self.created_network:
            with contextlib.suppress(Exception):
                self.engine.run("network", "rm", self.network, check=False)
        if self.created_volume:
            with contextlib.suppress(Exception):
                self.engine.run("volume", "rm", "--force", self.volume, check=False)
