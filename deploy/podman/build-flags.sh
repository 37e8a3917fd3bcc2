#!/usr/bin/env bash
# Prints the extra `build` flags of this machine for ENGINE (docker or podman): `make images` appends them.
#
#   deploy/podman/build-flags.sh podman
#
# - podman: `--format docker` (the OCI format drops SHELL, and with it the pipefail of the Dockerfiles' RUNs).
# - When the base image of deploy/podman/setup-podman.sh exists: `--build-arg PYTHON_IMAGE=<it>` (no registry).
# - podman: every pip configuration file of this machine and every local folder it points at (find-links,
#   file:// indexes: the torch wheel lives there when the PyTorch index is out of reach), bind-mounted read-only
#   at the same path with `-v`, so pip inside the build sees what pip outside it sees and nothing of it is
#   copied into a layer. docker build has no -v; there the build reaches the indexes itself.
# On a machine with a registry and no local pip configuration this prints `--format docker` for podman, nothing
# for docker.
set -euo pipefail

ENGINE="$(basename "${1:?usage: build-flags.sh docker|podman}")"
BASE_IMAGE="${BASE_IMAGE:-localhost/syncbn-python:3.11-bookworm}"
flags=()

if [ "$ENGINE" = podman ]; then
    flags+=(--format docker)
    if podman image exists "$BASE_IMAGE" 2>/dev/null; then
        flags+=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE")
    fi
    mounts=()
    # Configuration files pip reads as root (the build stage runs as root), mounted where root's pip looks.
    for conf in /etc/pip.conf /etc/xdg/pip; do
        [ -e "$conf" ] && mounts+=("$conf:$conf")
    done
    if [ -f "$HOME/.config/pip/pip.conf" ]; then
        mounts+=("$HOME/.config/pip/pip.conf:/root/.config/pip/pip.conf")
    fi
    # Local folders the configuration (or PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL) names.
    if command -v pip >/dev/null 2>&1; then
        values="$(pip config list 2>/dev/null | sed -n -E "s/^[^=]*\.(find-links|extra-index-url|index-url|constraint)='(.*)'$/\2/p")"
        values="$values ${PIP_FIND_LINKS:-} ${PIP_EXTRA_INDEX_URL:-}"
        for value in $values; do
            path="${value#file://}"
            case "$path" in
                /*) ;;
                *) continue ;;  # a remote index: reachable (or not) from the build itself
            esac
            [ -f "$path" ] && path="$(dirname "$path")"
            [ -d "$path" ] || continue
            # /opt/pypi/simple -> mount /opt/pypi: the index pages link to files beside the simple/ folder.
            [ "$(basename "$path")" = simple ] && path="$(dirname "$path")"
            mounts+=("$path:$path")
        done
    fi
    seen=" "
    for mount in "${mounts[@]}"; do
        case "$seen" in *" $mount "*) continue ;; esac
        seen="$seen$mount "
        flags+=(-v "$mount:ro")
    done
fi
echo "${flags[*]}"
