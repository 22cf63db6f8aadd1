#!/usr/bin/env bash
set -u
K=/root/.cache/ktd-target-main/release/ktd
cd /tmp/lag && rm -rf dev aud blobs *.pid
$K keygen --out auditor.key >/dev/null 2>&1 || true
# ktd keygen writes a VRF seed; any 32-byte hex file works as an Ed25519 key too
$K dev --listen 127.0.0.1:18080 --data-dir dev --epoch-interval 2s > dev.log 2>&1 &
echo $! > dev.pid
sleep 3
if [ "${6:-with}" = with ]; then
$K --addr http://127.0.0.1:18080 auditor --data-dir aud --signing-key-file auditor.key --gateway http://127.0.0.1:18080 --listen 127.0.0.1:19090 --http-listen 127.0.0.1:19091 --poll 100ms > auditor.log 2>&1 &
echo $! > auditor.pid
$K --addr http://127.0.0.1:18080 audit-blobs --out blobs --follow --keep 20 > blobs.log 2>&1 &
echo $! > blobs.pid
fi
sleep 1
$K --addr http://127.0.0.1:18080 bench --rate $1 --duration $2 --mix publish=1,lookup=9 --batch $3 --preload $4 --report report-$5 ${AUD:-} > bench-$5.log 2>&1
kill $(cat blobs.pid 2>/dev/null) $(cat auditor.pid 2>/dev/null) $(cat dev.pid) 2>/dev/null
wait
