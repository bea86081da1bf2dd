#!/usr/bin/env python3
"""Analysis of the re-authentication part of bench/run.sh (standard library only).

Inputs (all written by run.sh and its helpers):
  --tokens   token_issuer.py's log: `<unix time> <n> <exp>` per token served. A token served
             after the first one is a refresh; its time is the moment of the refresh (the
             issuer writes the line just before the HTTP answer).
  --metrics  metrics_poll.py's output: `<unix time> <client_connections> <refresh_success>
             <reauth_success> <reauth_failure> <upstream_connections>` every 25 ms.
  --windows  the load's windows: `<start> <end> GET,rps,avg,min,p50,p95,p99,max` (one
             redis-benchmark --csv run each).
  --after, --until  unix times the load started and stopped: only refreshes in between are
             reported (the others still keep their windows out of the quiet ones).
  --idle     how many idle connections were held.

For each refresh R at time T: the re-auth is complete at the first poll at which
redis_proxy_reauth_total{result="success"} has grown by at least --idle since the last poll
before T (the load's connections come and go with every window, so they are not waited for).
A load window "has a rotation" when it overlaps [T, completion]; it is "quiet" when it is at
least 0.5 s away from every refresh's [T, completion]. Prints shell assignments (for run.sh)
and writes a markdown table to --md.
"""

import argparse
import statistics
import sys


def read_rows(path, min_fields):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= min_fields:
                    rows.append(parts)
    except FileNotFoundError:
        pass
    return rows


def fmt(x, nd=3):
    return "n/a" if x is None else ("%.*f" % (nd, x))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--after", type=float, required=True)
    p.add_argument("--until", type=float, required=True,
                   help="unix time the load stopped: later refreshes are not reported")
    p.add_argument("--idle", type=int, required=True)
    p.add_argument("--md", required=True)
    args = p.parse_args()

    tokens = [(float(r[0]), int(r[1])) for r in read_rows(args.tokens, 3)]
    polls = [tuple(float(x) for x in r[:6]) for r in read_rows(args.metrics, 6)]
    windows = []
    for r in read_rows(args.windows, 3):
        csv = r[2].split(",")
        if len(csv) >= 8:
            windows.append((float(r[0]), float(r[1]), float(csv[4]), float(csv[6]), float(csv[1])))
    if not polls:
        print("no /metrics samples (is the admin endpoint up?)", file=sys.stderr)
        return 1
    if polls[0][3] < 0:
        print("redis_proxy_reauth_total{result=\"success\"} not in /metrics", file=sys.stderr)
        return 1

    refreshes = [t for t, n in tokens if n > 1]  # the first token is the start-up fetch
    rotations = []  # (T, done_or_None, first, delta_final, failures, clients)
    for t in refreshes:
        before = [s for s in polls if s[0] <= t]
        if not before:
            continue
        base = before[-1]
        done = first = None
        delta = 0
        fails = 0
        for s in polls:
            if s[0] < t:
                continue
            delta = s[3] - base[3]
            fails = s[4] - base[4]
            if first is None and delta > 0:
                first = s[0]
            if delta >= args.idle:
                done = s[0]
                break
        rotations.append((t, done, first, delta, fails, base[1]))

    def interval(r):
        t, done = r[0], r[1]
        return t, (done if done is not None else t + 10.0)

    reported = [r for r in rotations if args.after <= r[0] <= args.until]
    rot_win, quiet_win = [], []
    for w in windows:
        if w[0] < args.after:
            continue
        if any(w[0] <= b and w[1] >= a for a, b in map(interval, reported)):
            rot_win.append(w)
        elif all(w[1] < a - 0.5 or w[0] > b + 0.5 for a, b in map(interval, rotations)):
            quiet_win.append(w)

    times = [(r[1] - r[0]) * 1000 for r in reported if r[1] is not None]
    all_ms = max(times) if times and len(times) == len(reported) else None
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    p99_rot = med([w[3] for w in rot_win])
    p99_quiet = med([w[3] for w in quiet_win])
    p50_rot = med([w[2] for w in rot_win])
    p50_quiet = med([w[2] for w in quiet_win])
    diff = None if p99_rot is None or p99_quiet is None else p99_rot - p99_quiet

    with open(args.md, "w") as md:
        md.write("| refresh | re-auths until all %d done | time to the first re-auth | time to re-authenticate all | re-auth failures | clients connected |\n" % args.idle)
        md.write("| --- | ---: | ---: | ---: | ---: | ---: |\n")
        for i, (t, done, first, delta, fails, clients) in enumerate(reported, 1):
            md.write("| %d | %d | %s | %s | %d | %d |\n" % (
                i, delta, "none" if first is None else "%.0f ms" % ((first - t) * 1000),
                "not complete" if done is None else "%.0f ms" % ((done - t) * 1000),
                fails, clients))
        md.write("\n| load windows (redis-benchmark -c 10 GET) | windows | median p50 ms | median p99 ms | max p99 ms |\n")
        md.write("| --- | ---: | ---: | ---: | ---: |\n")
        for name, ws in (("with a rotation", rot_win), ("quiet", quiet_win)):
            md.write("| %s | %d | %s | %s | %s |\n" % (
                name, len(ws), fmt(med([w[2] for w in ws])), fmt(med([w[3] for w in ws])),
                fmt(max([w[3] for w in ws]) if ws else None)))
        md.write("\np99 difference (median of windows with a rotation - median of quiet windows): %s ms. "
                 "Window length: median %s s. Re-auth completion is seen by polling /metrics every 25 ms.\n"
                 % (fmt(diff), fmt(med([w[1] - w[0] for w in windows]), 2)))

    print("ROTATIONS_SEEN=%d" % len(reported))
    print("REAUTH_ALL_MS=%s" % ("not-complete" if all_ms is None else "%.0f" % all_ms))
    print("P99_ROT=%s" % fmt(p99_rot))
    print("P99_QUIET=%s" % fmt(p99_quiet))
    print("P50_ROT=%s" % fmt(p50_rot))
    print("P50_QUIET=%s" % fmt(p50_quiet))
    print("P99_DIFF=%s" % ("n/a" if diff is None else "%+.3f" % diff))
    if not reported:
        print("no token refresh after the load started", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
