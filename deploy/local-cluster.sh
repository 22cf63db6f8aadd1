#!/usr/bin/env bash
# A full ktd cluster on loopback: 3 sequencers, 3 shard servers (16 partitions, each held by all
# three: replication factor 3), 1 gateway.
#
#   deploy/local-cluster.sh start [DIR]   build ktd (release), start everything, wait for health
#   deploy/local-cluster.sh stop  [DIR]   SIGTERM every process (graceful), then wait
#   deploy/local-cluster.sh status [DIR]  which processes run; `ktd admin status` (sequencers, epochs, shards)
#   deploy/local-cluster.sh relaunch NAME [DIR]  start one process again with the arguments it was
#                                         first started with (e.g. after `kill -9`; drill hooks)
#
# DIR (default /tmp/ktd-local) holds the data directories, the VRF seed, logs and pid files; a
# second `start` on the same DIR restarts the cluster from its data. Addresses:
#   sequencers 127.0.0.1:7001-7003, shards 127.0.0.1:7101-7103, gateway 127.0.0.1:8080
# Then: ktd publish alice key-1 --wait && ktd lookup alice --verify   (gateway on :8080)
# Environment (optional; the CI test sets all of them): KTD_BIN=/path/to/ktd (use this binary,
# skip the dependency check and the build), KTD_LOCAL_SEQUENCERS="1=HOST:PORT 2=.. 3=..",
# KTD_LOCAL_SHARDS="s1=HOST:PORT s2=..", KTD_LOCAL_GATEWAY=HOST:PORT, KTD_EPOCH_INTERVAL=2s,
# KTD_REPLICATION_FACTOR=3 (voting replicas per partition; at most the number of shards).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = relaunch ]; then DIR="${3:-/tmp/ktd-local}"; else DIR="${2:-/tmp/ktd-local}"; fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktd-target}"
KTD="${KTD_BIN:-$CARGO_TARGET_DIR/release/ktd}"
read -r -a SEQUENCERS <<<"${KTD_LOCAL_SEQUENCERS:-1=127.0.0.1:7001 2=127.0.0.1:7002 3=127.0.0.1:7003}"
read -r -a SHARDS <<<"${KTD_LOCAL_SHARDS:-s1=127.0.0.1:7101 s2=127.0.0.1:7102 s3=127.0.0.1:7103}"
GATEWAY="${KTD_LOCAL_GATEWAY:-127.0.0.1:8080}"
BITS=4

log() { printf '[local-cluster] %s\n' "$*" >&2; }

alive() { # PID : running (a zombie that nobody reaped yet counts as stopped)
    local state
    state="$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

launch() { # NAME ARGS... : start `ktd ARGS...` in the background, logging to DIR/NAME.log
    local name="$1"
    shift
    if [ -f "$DIR/$name.pid" ] && alive "$(cat "$DIR/$name.pid")"; then
        log "$name already runs (pid $(cat "$DIR/$name.pid"))"
        return
    fi
    # Remembered for `relaunch NAME`, NUL-separated: the binary, then the arguments.
    printf '%s\0' "$KTD" "$@" >"$DIR/$name.args"
    "$KTD" "$@" >>"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
    log "started $name (pid $!, log $DIR/$name.log)"
}

relaunch() { # NAME : start NAME again with the binary and arguments of its first start
    local name="$1" saved=()
    [ -f "$DIR/$name.args" ] || { log "no $DIR/$name.args: start the cluster with this script first"; exit 1; }
    mapfile -d '' saved <"$DIR/$name.args"
    KTD="${saved[0]}"
    launch "$name" "${saved[@]:1}"
}

start() {
    if [ -z "${KTD_BIN:-}" ]; then
        "$ROOT/x.sh" deps
        (cd "$ROOT" && cargo build --release --locked -p ktd --bin ktd)
    fi
    mkdir -p "$DIR"
    local seed="$DIR/vrf-seed.hex"
    [ -f "$seed" ] || "$KTD" keygen --out "$seed" >/dev/null
    local public_key
    public_key="$("$KTD" keygen --public-key-of "$seed")"

    local addrs=() entry
    for entry in "${SEQUENCERS[@]}"; do addrs+=("${entry#*=}"); done
    local sequencer_list
    sequencer_list="$(IFS=,; echo "${addrs[*]}")"
    local shard_map=()
    for entry in "${SHARDS[@]}"; do
        local id="${entry%%=*}" addr="${entry#*=}"
        shard_map+=("$id=http://$addr")
        launch "shard-$id" shard --id "$id" --listen "$addr" --data-dir "$DIR/shard-$id" \
            --vrf-seed-file "$seed" --partition-bits "$BITS" --sequencers "$sequencer_list"
    done
    local peers
    peers="$(IFS=,; echo "${SEQUENCERS[*]}")"
    for entry in "${SEQUENCERS[@]}"; do
        local id="${entry%%=*}" addr="${entry#*=}" init=(--join)
        if [ "$id" = 1 ]; then
            init=(--init --vrf-public-key "$public_key" --partition-bits "$BITS"
                --shards "$(IFS=,; echo "${shard_map[*]}")"
                --replication-factor "${KTD_REPLICATION_FACTOR:-$(( ${#SHARDS[@]} < 3 ? ${#SHARDS[@]} : 3 ))}")
        fi
        launch "sequencer-$id" sequencer --id "$id" --listen "$addr" --data-dir "$DIR/sequencer-$id" \
            --peers "$peers" --epoch-interval "${KTD_EPOCH_INTERVAL:-2s}" "${init[@]}"
    done
    launch gateway gateway --listen "$GATEWAY" --sequencers "$sequencer_list"

    log "waiting for the gateway to answer"
    for _ in $(seq 1 150); do
        if "$KTD" --addr "http://$GATEWAY" epoch >/dev/null 2>&1; then
            "$KTD" --addr "http://$GATEWAY" status
            log "ready: ktd --addr http://$GATEWAY publish alice key-1 --wait && ktd --addr http://$GATEWAY lookup alice --verify"
            return 0
        fi
        sleep 0.2
    done
    log "the gateway did not answer within 30 s; see the logs in $DIR"
    exit 1
}

stop() {
    local pidfile pids=()
    for pidfile in "$DIR"/*.pid; do
        [ -e "$pidfile" ] || continue
        local pid
        pid="$(cat "$pidfile")"
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            log "pid $pid did not stop within 10 s of SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    log "stopped ${#pids[@]} processes (data kept in $DIR)"
}

status() {
    local pidfile
    for pidfile in "$DIR"/*.pid; do
        [ -e "$pidfile" ] || continue
        local name
        name="$(basename "$pidfile" .pid)"
        if kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "$name: running"; else echo "$name: NOT running"; fi
    done
    local addrs=() entry
    for entry in "${SEQUENCERS[@]}"; do addrs+=("${entry#*=}"); done
    # The operator CLI asks the sequencers and shards directly (works with the gateway down).
    KTD_SEQUENCERS="$(IFS=,; echo "${addrs[*]}")" "$KTD" admin status
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    relaunch) [ -n "${2:-}" ] || { sed -n '2,17p' "$0"; exit 2; }; relaunch "$2" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
