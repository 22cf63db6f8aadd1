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
pub = {rf: report(f"rf{rf}-publish") for rf in (1, 3)}
look = {rf: report(f"rf{rf}-lookup") for rf in (1, 3)}


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


row("100k-update epochs measured (into ≥ 1M entries)", lambda rf: len(full_epochs(pub[rf])))
row("seal → committed root, median of those, ms",
    lambda rf: statistics.median(e["seal_ms"] for e in full_epochs(pub[rf])))
row("committed updates/s (those epochs' updates / their seal time)",
    lambda rf: sum(e["updates"] for e in full_epochs(pub[rf])) / (sum(e["seal_ms"] for e in full_epochs(pub[rf])) / 1000))
row("acknowledged publishes, updates/s offered 20,000", lambda rf: pub[rf]["updates_per_second"])
for rf in (1, 3):
    if pub[rf]:
        shards = cpu(pub[rf], "shard")
        seqs = cpu(pub[rf], "sequencer")
        lines.append("")
        lines.append(f"RF{rf} publish phase, CPU % of one core (mean / max) and RSS max MiB: " + ", ".join(
            f"{k} {v['cpu_percent_mean']:.0f}/{v['cpu_percent_max']:.0f}% {v['rss_max_mib']:.0f} MiB"
            for k, v in {**shards, **seqs, **cpu(pub[rf], 'gateway')}.items()))
lines.append("")
akd = (pub[1] or {}).get("compare_akd")
if akd:
    lines.append(
        f"Stock akd 0.13 in the same run (RF1 run's batches replayed in process): {akd['epochs']} epochs, "
        f"akd publish median {akd['akd_publish_median_ms']:.0f} ms vs ktd RF1 seal median "
        f"{akd['ktd_seal_median_ms']:.0f} ms (ratio {akd['seal_ratio']:.2f}); akd {akd['akd_updates_per_second']:.0f} "
        f"updates/s vs ktd {akd['ktd_updates_per_second']:.0f}; roots compared {akd['roots_compared']}, equal {akd['roots_equal']}. "
        f"Notes: {'; '.join(akd.get('notes', [])) or 'none'}")
    lines.append("")
lines.append("| verified lookups (2,000/s offered, 8 clients, 30 s) | RF1 | RF3 | RF3 / RF1 |")
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
        f"RF3, s2 SIGKILLed 10 s into the same lookup run: {l['ok_per_second']:.0f} lookups/s ok, "
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
