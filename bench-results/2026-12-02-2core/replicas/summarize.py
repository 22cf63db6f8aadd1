#!/usr/bin/env python3
"""Summarises run.sh's reports (report.json per phase) as Markdown: RF1 vs RF3 side by side."""
import json
import os
import re
import statistics
import sys

out = sys.argv[1]


def report(name):
    path = os.path.join(out, name, "report.json")
    return json.load(open(path)) if os.path.exists(path) else None


def full_epochs(r):
    """Epochs committed in the measured phase that hit the 100,000-update cap (±10%)."""
    return [e for e in r.get("epochs", []) if e["updates"] >= 90_000 and e["seal_ms"] > 0]


def cpu(r, prefix):
    return {k: v for k, v in sorted(r.get("servers", {}).items()) if k.startswith(prefix)}


lines = ["# Replication factor 1 vs 3 (same machine, same run)", ""]
lines.append("| measure | RF1 | RF3 | RF3 / RF1 |")
lines.append("|---|---|---|---|")
look = {rf: report(f"rf{rf}-lookup") for rf in (1, 3)}


def commits(rf):
    """Coordinator pass (s) of each pre-load epoch, from the leader's 'epoch committed' lines."""
    path = os.path.join(out, f"rf{rf}-commits.log")
    found = {}
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        e = re.search(r"epoch=(\d+)", line)
        t = re.search(r"seconds=([0-9.]+)", line)
        if e and t:
            found[int(e.group(1))] = float(t.group(1))
    return found


def preload_s(rf):
    return int(open(os.path.join(out, f"rf{rf}-preload-ms.txt")).read()) / 1000


def ticks(rf):
    path = os.path.join(out, f"rf{rf}-cpu-ticks.txt")
    return {n: int(t) / 100 for n, t in (l.split() for l in open(path).read().splitlines())}


def row(what, f, fmt="{:.0f}"):
    vals = {}
    for rf in (1, 3):
        try:
            vals[rf] = f(rf)
        except Exception:
            vals[rf] = None
    cells = [fmt.format(vals[rf]) if vals[rf] is not None else "–" for rf in (1, 3)]
    ratio = f"{vals[3] / vals[1]:.2f}×" if vals[1] and vals[3] is not None else "–"
    lines.append(f"| {what} | {cells[0]} | {cells[1]} | {ratio} |")


row("pre-load of 1,000,000 users, publish → last epoch committed, s", preload_s, "{:.1f}")
row("sustained committed updates/s over the pre-load", lambda rf: 1_000_000 / preload_s(rf))
row("100k-update epochs building into 0.5M–1M entries (epochs 6–10): median coordinator pass, ms",
    lambda rf: 1000 * statistics.median(v for e, v in commits(rf).items() if 6 <= e <= 10))
row("the same, epoch 10 (900k → 1M entries), ms", lambda rf: 1000 * commits(rf)[10])
row("all shard servers: CPU s during the pre-load", lambda rf: sum(v for n, v in ticks(rf).items() if n.startswith("shard")))
row("per shard server: CPU s (mean of 3)", lambda rf: sum(v for n, v in ticks(rf).items() if n.startswith("shard")) / 3)
row("sequencers: CPU s (sum of 3)", lambda rf: sum(v for n, v in ticks(rf).items() if n.startswith("sequencer")))
row("gateway: CPU s", lambda rf: ticks(rf)["gateway"])
lines.append("")
lines.append("| verified lookups (250/s offered, 8 clients, 20 s) | RF1 | RF3 | RF3 / RF1 |")
lines.append("|---|---|---|---|")
row("lookups/s ok", lambda rf: look[rf]["calls"]["lookup"]["ok_per_second"])
row("p50 ms", lambda rf: look[rf]["calls"]["lookup"]["p50_ms"], "{:.1f}")
row("p99 ms", lambda rf: look[rf]["calls"]["lookup"]["p99_ms"], "{:.1f}")
row("errors", lambda rf: sum(look[rf]["calls"]["lookup"]["errors"].values()))
for rf in (1, 3):
    if look[rf]:
        lines.append("")
        lines.append(f"RF{rf} lookups, shard CPU % mean: " + ", ".join(
            f"{k} {v['cpu_percent_mean']:.0f}%" for k, v in cpu(look[rf], "shard").items()))
killed = report("rf3-lookup-s2-killed")
if killed and look[3]:
    l = killed["calls"]["lookup"]
    base = look[3]["calls"]["lookup"]
    lines.append("")
    lines.append(
        f"RF3, s2 SIGKILLed 7 s into the same lookup run: {l['ok_per_second']:.0f} lookups/s ok, "
        f"errors {sum(l['errors'].values())} {dict(l['errors'])}, p50 {l['p50_ms']:.1f} ms, p99 {l['p99_ms']:.1f} ms "
        f"(without the kill: p99 {base['p99_ms']:.1f} ms; extra p99 {l['p99_ms'] - base['p99_ms']:+.1f} ms).")
path = os.path.join(out, "rf3-rebuild-ms.txt")
if os.path.exists(path):
    ms = int(open(path).read().strip())
    copies = open(os.path.join(out, "rf3-copies.log")).read().splitlines()
    copies = [c for c in copies if re.search(r'server="?s3\b', c)]
    total = 0
    for c in copies:
        m = re.search(r"bytes=(\d+)", c)
        if m:
            total += int(m.group(1))
    before = open(os.path.join(out, "rf3-s3-bytes-before-wipe.txt")).read().strip()
    lines.append("")
    lines.append(
        f"RF3, s3's disk lost and rebuilt: {len(copies)} partition copies, {total / 2**20:.1f} MiB copied "
        f"(its data directory held {int(before) / 2**20:.1f} MiB before the wipe), restart → `status --check` "
        f"passes in {ms / 1000:.1f} s = {total / 2**20 / (ms / 1000):.1f} MiB/s overall "
        f"(per-copy rate limit 64 MiB/s, at most 2 copies at a time).")
print("\n".join(lines))
