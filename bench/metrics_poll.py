#!/usr/bin/env python3
"""Poll a redis-entra-proxy /metrics endpoint for bench/run.sh (standard library only).

Every --interval seconds it GETs http://ADDR/metrics (one keep-alive connection) and prints
    <unix time, ms precision> <client_connections> <token_refresh_success> <reauth_success>
        <reauth_failure> <upstream_connections>
(a metric that is missing prints as -1). It runs until it is killed or --duration has passed.
"""

import argparse
import http.client
import sys
import time

WANT = [
    "redis_proxy_client_connections",
    'redis_proxy_token_refresh_total{result="success"}',
    'redis_proxy_reauth_total{result="success"}',
    'redis_proxy_reauth_total{result="failure"}',
    "redis_proxy_upstream_connections",
]


def parse(text):
    vals = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.rpartition(" ")
        vals[name] = value
    out = []
    for w in WANT:
        v = vals.get(w)
        try:
            out.append(str(int(float(v))) if v is not None else "-1")
        except ValueError:
            out.append("-1")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("addr", help="host:port of --admin-listen")
    p.add_argument("--interval", type=float, default=0.025)
    p.add_argument("--duration", type=float, default=600)
    args = p.parse_args()
    host, port = args.addr.rsplit(":", 1)
    conn = None
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        t = time.time()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            if r.status == 200:
                print("%.3f %s" % (t, " ".join(parse(body))), flush=True)
        except (OSError, http.client.HTTPException):
            conn = None
        time.sleep(max(0.0, args.interval - (time.time() - t)))


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
