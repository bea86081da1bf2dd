#!/usr/bin/env python3
"""Do commands sent on two connections microseconds apart reach Redis in the order sent?

The "Blocking XREADGROUP" tests of Redis's suite send a blocking command on one connection and,
right after, the command that should wake it on another; through a proxy they sometimes fail.
This measures why: for N rounds, connection A writes `RPUSH <key> a<i>` and connection B, at
once from the same thread, `RPUSH <key> b<i>`; both replies are read; then the list says in
which order Redis ran them. Directly, the kernel hands Redis both sockets' data in the order it
arrived; through a proxy, each connection is a separate path (its own task, TLS session and
socket), so B's command can overtake A's.

  python3 bench/ordering.py --port PORT [--rounds 2000] [--gap-us 0]

prints: rounds, reordered (B before A), the share, and the gap between the two writes.
Standard library only.
"""

import argparse
import socket
import time


def enc(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def read_line(sock, buf):
    while b"\r\n" not in buf[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf[0] += chunk
    line, buf[0] = buf[0].split(b"\r\n", 1)
    return line


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--gap-us", type=float, default=0, help="busy-wait between the two writes")
    p.add_argument("--key", default="bench:ordering")
    args = p.parse_args()

    a = socket.create_connection((args.host, args.port))
    b = socket.create_connection((args.host, args.port))
    c = socket.create_connection((args.host, args.port))
    for s in (a, b, c):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bufs = {s: [b""] for s in (a, b, c)}
    c.sendall(enc("DEL", args.key))
    read_line(c, bufs[c])
    reordered = 0
    for i in range(args.rounds):
        a.sendall(enc("RPUSH", args.key, "a%d" % i))
        if args.gap_us:
            end = time.perf_counter() + args.gap_us / 1e6
            while time.perf_counter() < end:
                pass
        b.sendall(enc("RPUSH", args.key, "b%d" % i))
        read_line(a, bufs[a])
        read_line(b, bufs[b])
        c.sendall(enc("LPOP", args.key))
        first = read_line(c, bufs[c])
        first = read_line(c, bufs[c]) if first.startswith(b"$") else first
        c.sendall(enc("LPOP", args.key))
        second = read_line(c, bufs[c])
        if second.startswith(b"$"):
            read_line(c, bufs[c])
        if first.startswith(b"b"):
            reordered += 1
    share = reordered / args.rounds
    print("rounds=%d reordered=%d share=%.4f gap_us=%g" % (args.rounds, reordered, share, args.gap_us))


if __name__ == "__main__":
    main()
