#!/usr/bin/env bash
# Replication factor 1 vs 3 on one 2-core machine, same run, same binary: the local cluster
# (3 sequencers, 3 shard servers, 1 gateway; 16 partitions) with KTD_REPLICATION_FACTOR=1, then 3.
#
#   bench-results/2026-12-02-2core/replicas/run.sh [OUT_DIR]
#
# Per replication factor:
#   A. pre-load 1,000,000 users through the gateway (batches of 5,000, 4 in flight; the
#      sequencer seals them as 10 epochs of 100,000, its cap): wall time until the last one is
#      committed (sustained committed updates/s), each epoch's coordinator pass (prepare → build
#      → committed root, from the leader's log; epochs 6–10 build into 0.5M–1M entries), and
#      the CPU seconds of every process.
#   B. verified lookups only, 250/s offered by 8 clients for 20 s (about what one verifying client process sustains here): lookups/s, p50/p99, and the
#      CPU of each shard server (how reads spread over replicas).
# RF3 only:
#   C. the same lookups with shard server s2 SIGKILLed 7 s in (and restarted at the end):
#      failed lookups and p99 against B.
#   D. shard server s3 loses its disk (SIGKILL, data directory deleted, restarted empty): time
#      until every partition is copied back, bytes and MiB/s (from the leader's log).
# Run on a quiet machine (no build or test beside it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
OUT="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktd-target}"
KTD="${KTD_BIN:-$CARGO_TARGET_DIR/release/ktd}"
export KTD_BIN="$KTD"
export KTD_SEQUENCERS=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
GATEWAY=http://127.0.0.1:8080
mkdir -p "$OUT"
log() { printf '[replicas-bench] %s %s\n' "$(date +%T)" "$*" | tee -a "$OUT/run.log" >&2; }

for rf in 1 3; do
    DIR="/tmp/ktd-bench-rf$rf"
    rm -rf "$DIR"
    log "RF$rf: starting the local cluster in $DIR"
    KTD_REPLICATION_FACTOR=$rf KTD_EPOCH_INTERVAL=5s "$ROOT/deploy/local-cluster.sh" start "$DIR" >>"$OUT/run.log" 2>&1
    log "RF$rf: A. pre-load 1M users through the gateway (10 epochs of 100,000: the sequencer's cap)"
    start_ns=$(date +%s%N)
    "$KTD" --addr "$GATEWAY" bench --mix publish-only --preload 1000000 --rate 1 --batch 1 \
        --duration 1s --seed "$rf" --report "$OUT/rf$rf-preload" >>"$OUT/run.log" 2>&1
    end_ns=$(date +%s%N)
    echo "$(( (end_ns - start_ns) / 1000000 ))" >"$OUT/rf$rf-preload-ms.txt"
    # CPU seconds each process used since it started (the pre-load is nearly all of it).
    for pidfile in "$DIR"/*.pid; do
        name="$(basename "$pidfile" .pid)"
        ticks="$(awk '{print $14 + $15}' "/proc/$(cat "$pidfile")/stat")"
        echo "$name $ticks"
    done >"$OUT/rf$rf-cpu-ticks.txt"
    sed 's/\x1b\[[0-9;]*m//g' "$DIR"/sequencer-*.log | grep 'epoch committed' >"$OUT/rf$rf-commits.log" || true
    log "RF$rf: B. verified lookups, 250/s offered, 8 clients, 20 s"
    "$KTD" --addr "$GATEWAY" bench --mix lookup-only --loaded 1000000 --verify --rate 250 --concurrency 8 --duration 20s \
        --seed "$rf" --server-pid-dir "$DIR" --report "$OUT/rf$rf-lookup" >>"$OUT/run.log" 2>&1
    if [ "$rf" = 3 ]; then
        log "RF3: C. the same lookups, s2 SIGKILLed 7 s in"
        ( sleep 7; kill -KILL "$(cat "$DIR/shard-s2.pid")"; echo "killed s2 at $(date +%T.%N)" >>"$OUT/run.log" ) &
        "$KTD" --addr "$GATEWAY" bench --mix lookup-only --loaded 1000000 --verify --rate 250 --concurrency 8 --duration 20s \
            --seed "$rf" --server-pid-dir "$DIR" --report "$OUT/rf3-lookup-s2-killed" >>"$OUT/run.log" 2>&1
        wait
        "$ROOT/deploy/local-cluster.sh" relaunch shard-s2 "$DIR" >>"$OUT/run.log" 2>&1
        until "$KTD" admin status --check >/dev/null 2>&1; do sleep 1; done
        log "RF3: D. s3's disk lost: SIGKILL, wipe, restart empty"
        "$KTD" admin status >"$OUT/rf3-status-before-wipe.txt" 2>&1 || true
        du -sb "$DIR/shard-s3" | cut -f1 >"$OUT/rf3-s3-bytes-before-wipe.txt"
        s3="$(cat "$DIR/shard-s3.pid")"
        kill -KILL "$s3"
        while kill -0 "$s3" 2>/dev/null; do sleep 0.1; done   # gone before its disk is
        rm -rf "$DIR/shard-s3"
        start_ns=$(date +%s%N)
        "$ROOT/deploy/local-cluster.sh" relaunch shard-s3 "$DIR" >>"$OUT/run.log" 2>&1
        until "$KTD" admin status --check >/dev/null 2>&1; do sleep 0.5; done
        end_ns=$(date +%s%N)
        echo "$(( (end_ns - start_ns) / 1000000 ))" >"$OUT/rf3-rebuild-ms.txt"
        "$KTD" admin status >"$OUT/rf3-status-after-rebuild.txt" 2>&1 || true
        cat "$DIR"/sequencer-*.log | sed 's/\x1b\[[0-9;]*m//g' | grep 'partition copied' >"$OUT/rf3-copies.log" || true
    fi
    "$KTD" admin status >"$OUT/rf$rf-status.txt" 2>&1 || true
    "$ROOT/deploy/local-cluster.sh" stop "$DIR" >>"$OUT/run.log" 2>&1
    du -sb "$DIR"/shard-s* >"$OUT/rf$rf-shard-bytes.txt" || true
done
python3 "$(dirname "${BASH_SOURCE[0]}")/summarize.py" "$OUT" | tee "$OUT/summary.md"
