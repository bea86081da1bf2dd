#!/usr/bin/env python3
"""Hold N idle Redis client connections for bench/run.sh (standard library only).

Opens N connections to HOST:PORT (at most --parallel handshakes in flight), sends on each an
optional `AUTH user pass` and a `PING`, and reads the replies, so that behind a proxy every
client connection has its upstream connection established. Then it prints
    ready <ok> <failed> <seconds>
and holds the connections, reading commands line by line from stdin:
    ping    PING every connection again and print `pong <ok> <failed> <seconds>`
            (a connection that got no +PONG, or was closed, counts as failed)
    quit    (or end of input) close everything and exit 0
Every connection that fails or is closed by the peer is counted; nothing is retried.
"""

import argparse
import selectors
import socket
import sys
import time

from resp_encode import resp


class Conn:
    __slots__ = ("sock", "out", "inbuf", "want", "ok", "dead")

    def __init__(self, sock):
        self.sock = sock
        self.out = b""
        self.inbuf = b""
        self.want = 0  # replies still expected
        self.ok = True
        self.dead = False


def round_trip(conns, request, replies, parallel, deadline, connect_to=None):
    """Send `request` on every connection (creating them first when connect_to is set) with at
    most `parallel` in flight, and wait for `replies` replies on each. The last reply must be
    +PONG. Returns (ok, failed)."""
    sel = selectors.DefaultSelector()
    todo = list(range(len(conns))) if connect_to is None else None
    total = len(conns) if connect_to is None else connect_to[2]
    started = 0
    inflight = 0
    ok = failed = 0

    def start(i):
        nonlocal inflight
        if connect_to is not None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(s)
            conns.append(c)
            try:
                s.connect((connect_to[0], connect_to[1]))
            except BlockingIOError:
                pass
            except OSError:
                c.dead = True
                c.ok = False
                return False
        else:
            c = conns[i]
            if c.dead:
                return False
        c.out = request
        c.inbuf = b""
        c.want = replies
        c.ok = True
        sel.register(c.sock, selectors.EVENT_WRITE | selectors.EVENT_READ, c)
        inflight += 1
        return True

    def finish(c, good):
        nonlocal inflight, ok, failed
        sel.unregister(c.sock)
        inflight -= 1
        if good:
            ok += 1
        else:
            failed += 1
            c.ok = False
            c.dead = True
            try:
                c.sock.close()
            except OSError:
                pass

    while (started < total or inflight) and time.monotonic() < deadline:
        while started < total and inflight < parallel:
            i = started if todo is None else todo[started]
            started += 1
            if not start(i):
                failed += 1
        if not inflight:
            continue
        for key, ev in sel.select(timeout=0.2):
            c = key.data
            try:
                if ev & selectors.EVENT_WRITE and c.out:
                    n = c.sock.send(c.out)
                    c.out = c.out[n:]
                    if not c.out:
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                if ev & selectors.EVENT_READ:
                    data = c.sock.recv(65536)
                    if not data:
                        finish(c, False)
                        continue
                    c.inbuf += data
                    while c.want and b"\r\n" in c.inbuf:
                        line, c.inbuf = c.inbuf.split(b"\r\n", 1)
                        c.want -= 1
                        if c.want == 0:
                            finish(c, line == b"+PONG")
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                finish(c, False)
    # whatever is still in flight at the deadline failed
    for key in list(sel.get_map().values()):
        finish(key.data, False)
    failed += total - started
    sel.close()
    return ok, failed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=5000)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--parallel", type=int, default=64, help="connections set up at once")
    p.add_argument("--timeout", type=float, default=120, help="seconds for all of them")
    args = p.parse_args()

    first = resp("PING")
    replies = 1
    if args.password:
        auth = ("AUTH", args.user, args.password) if args.user else ("AUTH", args.password)
        first = resp(*auth) + first
        replies = 2
    conns = []
    t0 = time.monotonic()
    ok, failed = round_trip(conns, first, replies, args.parallel, t0 + args.timeout,
                            connect_to=(args.host, args.port, args.n))
    print("ready %d %d %.3f" % (ok, failed, time.monotonic() - t0), flush=True)

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "ping":
            t0 = time.monotonic()
            ok, failed = round_trip(conns, resp("PING"), 1, 256, t0 + args.timeout)
            print("pong %d %d %.3f" % (ok, failed, time.monotonic() - t0), flush=True)
        elif cmd == "quit":
            break
    for c in conns:
        try:
            c.sock.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
