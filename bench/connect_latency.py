#!/usr/bin/env python3
"""Paced connection-setup latency for bench/run.sh (standard library only).

N times: connect to HOST:PORT (optionally TLS), send `AUTH user pass` (if given) and `PING` in
one write, read the replies (the last must be +PONG), close, then sleep --gap-ms. Each sample is
the time from before connect() to the PONG. Unlike back-to-back reconnects (redis-benchmark
-k 0), the gap leaves a proxy's warm pool time to refill, so this is the latency an application
sees when it opens a connection now and then. Prints
    <median ms> <p90 ms> <p99 ms> <min ms> <n>
"""

import argparse
import socket
import ssl
import statistics
import sys
import time

from resp_encode import resp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=25)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--cafile")
    p.add_argument("--sni", default="localhost")
    args = p.parse_args()

    req = resp("PING")
    replies = 1
    if args.password:
        req = resp("AUTH", args.user, args.password) + req
        replies = 2
    ctx = None
    if args.tls:
        ctx = ssl.create_default_context(cafile=args.cafile)
        # one full handshake per connection, like redis-benchmark (no session reuse)
    samples = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        s = socket.create_connection((args.host, args.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            s = ctx.wrap_socket(s, server_hostname=args.sni)
        s.sendall(req)
        buf = b""
        while buf.count(b"\r\n") < replies:
            chunk = s.recv(4096)
            if not chunk:
                print("connection closed before the reply", file=sys.stderr)
                return 1
            buf += chunk
        t1 = time.perf_counter()
        s.close()
        last = buf.split(b"\r\n")[replies - 1]
        if last != b"+PONG":
            print("unexpected reply: %r" % buf[:200], file=sys.stderr)
            return 1
        samples.append((t1 - t0) * 1000)
        time.sleep(args.gap_ms / 1000)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    print("%.3f %.3f %.3f %.3f %d" % (statistics.median(samples), q(0.9), q(0.99), samples[0], len(samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
