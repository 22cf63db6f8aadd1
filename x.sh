#!/usr/bin/env bash
# ktd's one entry point for humans and CI: checks and installs what the build needs, then runs cargo.
#
#   ./x.sh dev [ktd dev flags]     start a complete single-machine directory (`ktd dev`)
#   ./x.sh test                    the full gate CI runs: fmt, clippy, tests, docs
#   ./x.sh ktd ARGS...             run any `ktd` subcommand (release build)
#   ./x.sh bench NAME [ARGS...]    run a benchmark, e.g. `bench sequencer --seconds 10` (release)
#   ./x.sh chaos ARGS...           failover drills (`ktd-chaos list`, `ktd-chaos run --scenario NAME`)
#   ./x.sh boundaries              check the crate dependency rules (part of `test`)
#
# Everything builds in ONE profile (release): tests, benches and binaries share the RocksDB C++
# build, which takes ~12 minutes cold on 2 cores. CARGO_TARGET_DIR defaults to a directory outside
# the clone so that a second run on the same machine is incremental.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktd-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-auto}"

log() { printf '[x.sh] %s\n' "$*" >&2; }

# The build needs libclang (bindgen for RocksDB's C API) and a C++ compiler. protoc is not needed:
# proto/build.rs uses a vendored protoc binary from crates.io.
# With `test`, also Debian's chromium: the auditor dashboard test renders the page in headless
# Chromium (KTD_CHROMIUM names another binary).
ensure_system_deps() {
    local missing=()
    if [ "${1:-}" = test ] && [ -z "${KTD_CHROMIUM:-}" ] && ! [ -x /usr/bin/chromium ]; then
        missing+=(chromium)
    fi
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    command -v clang >/dev/null 2>&1 || missing+=(clang)
    compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || compgen -G '/usr/lib/*/libclang-[0-9]*.so*' >/dev/null \
        || missing+=(libclang-dev)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing build dependencies: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { log "need root or sudo to install: ${missing[*]}"; exit 2; }
        sudo=(sudo)
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Crate boundaries as build facts (ARCHITECTURE.md, "must not depend on"): each line is a crate
# and a regex of packages that must not appear in its normal (non-dev) dependency tree.
BOUNDARIES=(
    "ktd-core|^(librocksdb-sys|rocksdb|tonic|prost|tokio|openraft|ktd-proto|ktd-rpc|shard|sequencer|gateway) "
    "ktd-proto|^(ktd-(rpc|core|client|auditor)|shard|sequencer|gateway|librocksdb-sys|openraft) "
    "ktd-client|^(librocksdb-sys|rocksdb|openraft|axum|clap|shard|sequencer|gateway) "
    "ktd-auditor|^(librocksdb-sys|rocksdb|openraft|clap|shard|sequencer|gateway) "
    "shard|^(openraft|sequencer|gateway|clap) "
    "sequencer|^(gateway|clap) "
    "gateway|^(clap|ktd-auditor|ktd-client) "
    "ktd-testkit|^(ktd|ktd-(proto|rpc|core|client|auditor)|shard|sequencer|gateway|chaos-tests|librocksdb-sys|openraft) "
)

check_boundaries() {
    local rule crate forbidden tree found failed=0
    for rule in "${BOUNDARIES[@]}"; do
        crate="${rule%%|*}"
        forbidden="${rule#*|}"
        tree=$(cargo tree --locked -p "$crate" -e normal,build --prefix none --format '{p}') || {
            log "cargo tree -p $crate failed"
            return 1
        }
        found=$(grep -E "$forbidden" <<<"$tree" | sort -u || true)
        if [ -n "$found" ]; then
            log "boundary broken: $crate must not depend on: $(echo "$found" | tr '\n' ' ')"
            failed=1
        fi
    done
    [ "$failed" -eq 0 ] && log "crate boundaries hold (${#BOUNDARIES[@]} rules)"
    return "$failed"
}

cmd_test() {
    log "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
    cargo fmt --all -- --check
    check_boundaries
    cargo clippy --release --workspace --all-targets --locked -- -D warnings
    cargo test --release --workspace --locked --no-fail-fast
    RUSTDOCFLAGS="-D warnings" cargo doc --release --workspace --no-deps --locked
}

main() {
    local sub="${1:-help}"
    [ $# -gt 0 ] && shift
    case "$sub" in
        test) ensure_system_deps test; cmd_test "$@" ;;
        dev) ensure_system_deps; exec cargo run --release --locked -p ktd --bin ktd -- dev "$@" ;;
        ktd) ensure_system_deps; exec cargo run --release --locked -p ktd --bin ktd -- "$@" ;;
        chaos)
            ensure_system_deps
            cargo build --release --locked -p ktd --bin ktd
            exec cargo run --release --locked -p chaos-tests --bin ktd-chaos -- "$@"
            ;;
        bench)
            ensure_system_deps
            local name="${1:?usage: ./x.sh bench NAME [ARGS...]}"
            shift
            # cargo's `--` is added here; one written before ARGS (`bench NAME -- ARGS`) is dropped.
            if [ "${1:-}" = -- ]; then shift; fi
            exec cargo bench --locked --bench "$name" -- "$@"
            ;;
        deps) ensure_system_deps ;;
        boundaries) check_boundaries ;;
        help | -h | --help) sed -n '2,14p' "$0" ;;
        *) log "unknown command: $sub"; sed -n '2,14p' "$0"; exit 2 ;;
    esac
}

main "$@"
