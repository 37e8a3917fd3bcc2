#!/usr/bin/env bash
# Prints the container engine usable here, docker or podman, or says on stderr why there is none (exit 1).
# A docker CLI without a reachable daemon does not count (`docker info` must answer).
set -uo pipefail
if command -v docker >/dev/null 2>&1 && timeout 30 docker info >/dev/null 2>&1; then
    echo docker
elif command -v podman >/dev/null 2>&1 && timeout 60 podman info >/dev/null 2>&1; then
    echo podman
else
    echo "no usable container engine: docker is missing or its daemon unreachable, podman is missing or" \
         "cannot start (as root on Debian: deploy/podman/setup-podman.sh)" >&2
    exit 1
fi
