#!/usr/bin/env bash
# Build the CPU image where no registry can be reached: a base image made with debootstrap
# from a Debian mirror, and torch served from a local wheel. Used by `make image` and by
# tests/deploy/test_docker_engine.py.
#
# Usage: scripts/docker-local.sh base [BASE]         make the base image (once; kept)
#        scripts/docker-local.sh build [TAG [BASE]]  the base if missing, then the image
#        scripts/docker-local.sh prometheus [NAME]   Prometheus from Debian's package, for
#                     the compose stack (PROMETHEUS_IMAGE=NAME; default
#                     exitserve-prometheus:bookworm)
#   BASE         the base image's name (default: exitserve-base:bookworm)
#   TAG          the image's tag (default: exitserve:cpu)
#   MIRROR       (environment) the Debian mirror (default: the first deb.debian.org-style
#                URI in /etc/apt/sources.list{,.d/*}, else http://deb.debian.org/debian)
#   TORCH_WHEEL  (environment) a torch wheel file to serve to the build (default: what
#                `pip download torch==2.13.0` finds through this machine's pip settings)
# Needs root (debootstrap, chroot), a running Docker engine and debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."

# What to undo on any exit, a failed step included: temporary folders, the index server.
cleanup=()
trap 'for c in "${cleanup[@]}"; do $c 2>/dev/null || true; done' EXIT

usage() { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }

mirror() {
    if [[ -n "${MIRROR:-}" ]]; then echo "$MIRROR"; return; fi
    local uri
    uri=$(grep -hoE '^(deb |URIs:) *https?://[^ ]+/debian/?( |$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | head -n1 |
        grep -oE 'https?://[^ ]+' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

make_base() {
    local base="$1" packages="${2:-python3,python3-venv,ca-certificates}"
    if docker image inspect "$base" >/dev/null 2>&1; then
        echo "docker-local: $base exists"
        return
    fi
    local root
    root=$(mktemp -d)
    cleanup+=("rm -rf $root")
    echo "docker-local: debootstrap bookworm from $(mirror)"
    debootstrap --variant=minbase --include="$packages" \
        bookworm "$root/rootfs" "$(mirror)" >"$root/debootstrap.log" 2>&1 ||
        { tail -n 20 "$root/debootstrap.log" >&2; return 1; }
    # pip inside the build must trust what this machine trusts (a proxy's own CA, say).
    if [[ -d "$root/rootfs/usr/local/share/ca-certificates" ]] &&
        compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/rootfs/usr/local/share/ca-certificates/"
        chroot "$root/rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$root/rootfs/var/cache/apt/archives/"*.deb "$root/rootfs/var/lib/apt/lists/"*
    tar -C "$root/rootfs" -c . | docker import - "$base" >/dev/null
    echo "docker-local: imported $base"
}

build_image() {
    local tag="$1" base="$2"
    make_base "$base"
    local index
    index=$(mktemp -d)
    cleanup+=("rm -rf $index")
    # A simple index (PEP 503) of torch and what it depends on: the Dockerfile installs
    # torch with --index-url, so its dependencies must come from the same index.
    python3 -m pip download --quiet --dest "$index/wheels" ${TORCH_WHEEL:+"$TORCH_WHEEL"} torch==2.13.0
    local wheel name project
    for wheel in "$index"/wheels/*.whl; do
        name=$(basename "$wheel")
        project=$(echo "${name%%-*}" | tr 'A-Z' 'a-z' | sed 's/[_.]/-/g')
        mkdir -p "$index/simple/$project"
        mv "$wheel" "$index/simple/$project/"
        printf '<a href="%s">%s</a>\n' "${name//+/%2B}" "$name" >>"$index/simple/$project/index.html"
    done
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$index" "$port" >/dev/null 2>&1 &
    cleanup+=("kill $!")
    docker build --quiet --network host \
        --build-arg PYTHON_IMAGE="$base" \
        --build-arg TORCH_INDEX="http://127.0.0.1:$port/simple" \
        -f docker/Dockerfile -t "$tag" . >/dev/null
    # Each rebuild leaves the build stage and the image the tag named before, untagged:
    # 1.5 GB each, enough to fill a disk over a day of builds.
    docker image prune --force --filter dangling=true --filter label=io.exitserve.image >/dev/null
    echo "docker-local: built $tag"
}

case "${1:-}" in
    base) make_base "${2:-exitserve-base:bookworm}" ;;
    prometheus) make_base "${2:-exitserve-prometheus:bookworm}" prometheus ;;
    build) build_image "${2:-exitserve:cpu}" "${3:-exitserve-base:bookworm}" ;;
    *) usage ;;
esac
