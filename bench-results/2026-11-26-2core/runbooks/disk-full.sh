#!/usr/bin/env bash
# Records the runbook "Disk full or slow" (docs/operations.md) against deploy/local-cluster.sh: shard s1's data
# directory is a 48 MiB tmpfs, publishes fill it, then the volume is grown and the shard
# restarted. Needs root (mount). Run from the repository root:
#   sudo bench-results/2026-11-26-2core/runbooks/disk-full.sh > bench-results/2026-11-26-2core/runbooks/disk-full.txt 2>&1
set -uo pipefail
DIR="${1:-/tmp/ktd-diskfull}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktd-target}"
export KTD_BIN="${KTD_BIN:-$CARGO_TARGET_DIR/release/ktd}"
export KTD_LOCAL_SEQUENCERS="1=127.0.0.91:7001 2=127.0.0.91:7002 3=127.0.0.91:7003"
export KTD_LOCAL_SHARDS="s1=127.0.0.91:7101 s2=127.0.0.91:7102"
export KTD_LOCAL_GATEWAY=127.0.0.91:8080
export KTD_EPOCH_INTERVAL=1s
export KTD_SEQUENCERS=127.0.0.91:7001,127.0.0.91:7002,127.0.0.91:7003
export KTD_ADDR=http://127.0.0.91:8080

run() { # prints "$ command", runs it, prints its exit status
    echo "\$ $*"
    "$@"
    printf '(exit %d)\n\n' "$?"
}
ktd() { "$KTD_BIN" "$@"; }

deploy/local-cluster.sh stop "$DIR" >/dev/null 2>&1
umount "$DIR/shard-s1" 2>/dev/null
rm -rf "$DIR" && mkdir -p "$DIR/shard-s1"
run mount -t tmpfs -o size=48m tmpfs "$DIR/shard-s1"
run deploy/local-cluster.sh start "$DIR"
run ktd publish alice key-1 --wait

echo "## Fill shard s1's disk: publishes of 16 KiB values"
run ktd bench --rate 100 --duration 20s --mix publish-only --batch 10 --value-bytes 16384 \
    --preload 0 --report "$DIR/bench"
echo "## Symptoms"
run df -h "$DIR/shard-s1"
# The shard answers the coordinator with the error; the sequencer leader logs it.
run bash -c "grep -h -m 1 'No space left' $DIR/sequencer-*.log | cut -c1-400"
run ktd admin status --check --max-commit-delay 20s
run ktd epoch

echo "## Mitigate: grow the volume (here: remount the tmpfs larger), restart the shard"
run mount -o remount,size=1g "$DIR/shard-s1"
run df -h "$DIR/shard-s1"
pid="$(cat "$DIR/shard-s1.pid")"
kill -TERM "$pid" 2>/dev/null; for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -9 "$pid" 2>/dev/null
run deploy/local-cluster.sh relaunch shard-s1 "$DIR"

echo "## Verify: the backlog of sealed epochs commits, then --check passes"
sealed="$(ktd admin status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["epochs"]["last_sealed_epoch"])')"
run ktd epoch "$sealed" --wait
for _ in $(seq 1 60); do ktd admin status --check >/dev/null 2>&1 && break; sleep 1; done
run ktd admin status --check
run ktd publish bob key-2 --wait
run ktd lookup alice --verify
run ktd lookup bob --verify
run ktd epoch

run deploy/local-cluster.sh stop "$DIR"
run umount "$DIR/shard-s1"
