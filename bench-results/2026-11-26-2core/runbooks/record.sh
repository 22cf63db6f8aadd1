#!/usr/bin/env bash
# Records the operations runbooks (docs/operations.md) against deploy/local-cluster.sh: every command and
# its output (and exit status) go to stdout. Run from the repository root:
#   bench-results/2026-11-26-2core/runbooks/record.sh > bench-results/2026-11-26-2core/runbooks/transcript.txt 2>&1
# Uses its own DIR (default /tmp/ktd-runbooks) and the local cluster's fixed ports.
set -uo pipefail
DIR="${1:-/tmp/ktd-runbooks}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ktd-target}"
KTD="$CARGO_TARGET_DIR/release/ktd"
export KTD_SEQUENCERS=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
export KTD_ADDR=http://127.0.0.1:8080
export KTD_EPOCH_INTERVAL=1s

run() { # prints "$ command", runs it, prints its exit status
    echo "\$ $*"
    local started=$(date +%s.%N)
    "$@"
    local code=$?
    printf '(exit %d, %.2f s)\n\n' "$code" "$(echo "$(date +%s.%N) - $started" | bc)"
    return 0
}
ktd() { "$KTD" "$@"; }
wait_check() { # until `ktd admin status --check` passes (bounded)
    for _ in $(seq 1 60); do ktd admin status --check >/dev/null 2>&1 && { echo "(status --check passes)"; return 0; }; sleep 0.5; done
    echo "(status --check still failing after 30 s)"; ktd admin status --check
}
stop_pid() { # SIGTERM and wait for NAME's process
    local pid; pid="$(cat "$DIR/$1.pid")"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$DIR/$1.pid"
}
publisher() { local n=0; while :; do ktd publish "rb-$n" "v-$n" >/dev/null 2>&1 && echo "rb-$n" >>"$DIR/acked.txt"; n=$((n+1)); sleep 0.05; done; }

echo "# ktd operations runbooks against deploy/local-cluster.sh ($(date -u +%FT%TZ), $(nproc) cores)"
rm -rf "$DIR" "$DIR-backup"
run deploy/local-cluster.sh start "$DIR" 2>&1 | grep -v '^\[local-cluster\] started'
publisher & PUBLISHER=$!

echo "## Runbook: cluster status"
sleep 3
run ktd admin status
run ktd admin status --check
run ktd admin status -o json

echo "## Runbook: planned leader transfer"
run ktd admin transfer-leader --to 2
run ktd admin status

echo "## Runbook: rolling restart (followers first, the leader last)"
for name in sequencer-3 sequencer-1 sequencer-2; do
    echo "\$ kill -TERM \$(cat $DIR/$name.pid); wait for exit"
    started=$(date +%s.%N); stop_pid "$name"
    printf '(exited after %.2f s)\n' "$(echo "$(date +%s.%N) - $started" | bc)"
    grep -a "handed over leadership\|could not hand over" "$DIR/$name.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g'
    run deploy/local-cluster.sh relaunch "$name" "$DIR"
    wait_check
done
for name in shard-s1 shard-s2 gateway; do
    echo "\$ kill -TERM \$(cat $DIR/$name.pid); wait for exit"
    stop_pid "$name"
    run deploy/local-cluster.sh relaunch "$name" "$DIR"
    wait_check
done
run ktd admin status

echo "## Runbook: shard failure"
echo "\$ kill -9 \$(cat $DIR/shard-s2.pid)"
kill -9 "$(cat "$DIR/shard-s2.pid")"; rm -f "$DIR/shard-s2.pid"; sleep 1.5
run ktd admin status --check
run deploy/local-cluster.sh relaunch shard-s2 "$DIR"
wait_check
run ktd admin seal
run ktd admin status

echo "## Runbook: backup and restore"
kill "$PUBLISHER"; wait "$PUBLISHER" 2>/dev/null
run ktd admin seal
run ktd admin snapshot
run ktd epoch
LATEST="$(ktd epoch)"; EPOCH="$(echo "$LATEST" | awk '{print $2}')"
run deploy/local-cluster.sh stop "$DIR"
run cp -a "$DIR" "$DIR-backup"
echo "\$ rm -rf $DIR && cp -a $DIR-backup $DIR   # restore"
rm -rf "$DIR" && cp -a "$DIR-backup" "$DIR"
run deploy/local-cluster.sh start "$DIR" 2>&1 | grep -v '^\[local-cluster\] started'
wait_check
run ktd epoch "$EPOCH"
echo "(before the backup: $LATEST)"
run ktd audit 0 "$EPOCH" --verify
lost=0; total=0
while read -r label; do total=$((total+1)); ktd lookup "$label" >/dev/null 2>&1 || lost=$((lost+1)); done <"$DIR/acked.txt"
echo "acknowledged publishes looked up (verified) after the restore: $total, missing: $lost"
echo

echo "## Runbook: replace a failed sequencer"
echo "\$ kill -9 \$(cat $DIR/sequencer-3.pid)"
kill -9 "$(cat "$DIR/sequencer-3.pid")"; rm -f "$DIR/sequencer-3.pid"; sleep 1
run ktd admin status --check
run ktd admin remove-sequencer --id 3
run rm -rf "$DIR/sequencer-3"
echo "\$ ktd sequencer --id 4 --listen 127.0.0.1:7004 --data-dir $DIR/sequencer-4 --epoch-interval 1s &"
"$KTD" sequencer --id 4 --listen 127.0.0.1:7004 --data-dir "$DIR/sequencer-4" --epoch-interval 1s >>"$DIR/sequencer-4.log" 2>&1 &
echo $! >"$DIR/sequencer-4.pid"; sleep 1
run ktd admin add-sequencer --id 3 --address 127.0.0.1:7004
run ktd admin add-sequencer --id 4 --address 127.0.0.1:7004
export KTD_SEQUENCERS=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7004
wait_check
run ktd admin status
run ktd publish after-replace v1 --wait

run deploy/local-cluster.sh stop "$DIR"
