#!/usr/bin/env bash
# Makes podman usable for syncbn's images on a Debian machine without an image registry (run as root).
#
#   deploy/podman/setup-podman.sh        # idempotent: each step is skipped when already done
#
# What it does, and why (each was needed on Debian 12 with cgroup v1/hybrid and no registry reachable):
#  1. apt-get install podman, runc, iptables (podman's network backend needs it) and debootstrap.
#  2. /etc/containers/containers.conf: runc as the OCI runtime (crun refuses hybrid cgroup hierarchies) and
#     container ulimits Ray can live with (its workers open many files and threads).
#  3. A base image built with debootstrap (Debian bookworm: Python 3.11, the Python of the machine's torch wheel)
#     plus python-is-python3 and this machine's CA certificates, imported as $BASE_IMAGE. `make images` passes it
#     as the build argument PYTHON_IMAGE (see deploy/podman/build-flags.sh), in place of docker.io's python image.
# The torch wheel and the pip configuration are NOT copied anywhere: build-flags.sh bind-mounts them into the
# build (podman build -v), so none of them ends up in an image layer.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-localhost/syncbn-python:3.11-bookworm}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
CONTAINERS_CONF=/etc/containers/containers.conf

log() { echo "setup-podman: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "expected to run as root (apt-get, /etc/containers, debootstrap), got uid $(id -u)"
    exit 1
fi

# 1. Packages.
missing=()
for cmd in podman runc iptables debootstrap; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc iptables debootstrap >/dev/null
fi

# 2. Engine configuration (kept when it already exists: an operator's own settings win).
if [ ! -e "$CONTAINERS_CONF" ]; then
    log "writing $CONTAINERS_CONF"
    install -d /etc/containers
    cat >"$CONTAINERS_CONF" <<'CONF'
# Written by syncbn's deploy/podman/setup-podman.sh.
[containers]
# Ray opens many files and threads per worker; the defaults inherited here were too low.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun refuses hybrid cgroup hierarchies (cgroup v1 with a v2 mount), runc runs on them.
runtime = "runc"
CONF
else
    log "$CONTAINERS_CONF exists: left as it is"
fi

# 3. The base image.
if podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE exists"
else
    rootfs="$(mktemp -d /tmp/syncbn-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap $SUITE into $rootfs (a few minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" >/dev/null
    # The machine's CA bundle: TLS to the package registries may go through a proxy with its own CA.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "importing $BASE_IMAGE"
    tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
fi
podman image inspect --format '{{.Id}} {{.Size}}' "$BASE_IMAGE" >&2
log "ready: make images"
