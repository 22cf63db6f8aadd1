#!/usr/bin/env bash
# Builds the `ktd:local` image without a registry (route 1 of the deployment notes): a Debian
# bookworm root made with debootstrap and `docker import`ed as ktd-base:bookworm, then
# deploy/images/Dockerfile adds the release binary and a `ktd` user (uid 10001).
#
#   deploy/images/build.sh --check   check the binary and list the shared libraries it needs; no docker
#   deploy/images/build.sh           the checks, then the base (once) and the image
#
# Environment: CARGO_TARGET_DIR (where the release `ktd` is; default ~/.cache/ktd-target),
# KTD_BIN (another binary), KTD_IMAGE (default ktd:local), KTD_BASE_IMAGE (default
# ktd-base:bookworm), DEBIAN_MIRROR (default http://deb.debian.org/debian).
# Needs: docker with a reachable engine; for the base, root and debootstrap (apt-get install
# debootstrap). Nothing is pulled: the base is imported, and compose/Kubernetes use
# `pull_policy: never` / `imagePullPolicy: Never` (load the image on each node: `docker save
# ktd:local | ssh node docker load`, or `kind load docker-image ktd:local`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/ktd-target}"
KTD="${KTD_BIN:-$TARGET/release/ktd}"
IMAGE="${KTD_IMAGE:-ktd:local}"
BASE="${KTD_BASE_IMAGE:-ktd-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# glibc of Debian bookworm: the binary must not need a newer one.
BASE_GLIBC=2.36

log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

check_binary() {
    [ -x "$KTD" ] || die "no release binary at $KTD: cargo build --release --locked -p ktd --bin ktd"
    [ "$(head -c 4 "$KTD" | od -An -c | tr -d ' ')" = '177ELF' ] || die "$KTD is not an ELF binary"
    log "binary: $KTD ($(du -h "$KTD" | cut -f1))"
    log "shared libraries (all from the base's libc6, libstdc++6, libgcc-s1):"
    ldd "$KTD" | sed 's/^/    /' >&2
    if ldd "$KTD" | grep -q 'not found'; then die "a shared library is missing"; fi
    local needed
    needed="$(objdump -T "$KTD" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)"
    log "newest glibc symbol version needed: $needed (bookworm has $BASE_GLIBC)"
    [ "$(printf '%s\n%s\n' "$needed" "$BASE_GLIBC" | sort -V | tail -1)" = "$BASE_GLIBC" ] \
        || die "the binary needs glibc $needed: build it on bookworm (or an older release)"
    "$KTD" --version >&2
}

build_base() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        log "base image $BASE exists"
        return
    fi
    command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    ROOTFS="$(mktemp -d)"
    trap 'rm -rf "$ROOTFS"' EXIT
    log "debootstrap --variant=minbase bookworm $ROOTFS $MIRROR"
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | docker import - "$BASE"
    log "imported $BASE"
}

build_image() {
    local context
    context="$(mktemp -d)"
    cp "$HERE/Dockerfile" "$context/Dockerfile"
    cp "$KTD" "$context/ktd"
    docker build --build-arg "BASE=$BASE" --tag "$IMAGE" "$context"
    rm -rf "$context"
    log "built $IMAGE: docker compose -f deploy/compose/docker-compose.yml up -d"
}

check_binary
if [ "${1:-}" = --check ]; then
    log "checks passed (no docker used)"
    exit 0
fi
command -v docker >/dev/null || die "docker (client) missing"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker engine reachable (docker version shows the client only)"
build_base
build_image
