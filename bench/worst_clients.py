#!/usr/bin/env python3
"""Hold N client connections in the state that costs the proxy the most memory, for
bench/run.sh's `worst` part (standard library only). The figure it yields is what the chart and
the injector divide the sidecar's memory limit by to get a default --max-connections.

Each connection:
  1. asks for a large value several times (GET of a --value-kib value, pipelined) and never
     reads the replies, so the proxy's buffer towards the client fills up to its high-water mark
     and the upstream side is back-pressured (its TLS and read buffers full);
  2. pipelines --pings PINGs behind them (the proxy tracks every reply still due, up to 16,384);
  3. then sends a command the proxy must hold whole before it can forward it (CLIENT SETNAME
     with an argument just under the proxy's 1 MiB inspection limit), all of it but the last
     bytes, so the proxy keeps it buffered, waiting for the rest.
After setting up every connection it prints
    ready <ok> <failed> <seconds>
and holds them until stdin says `quit` (or ends). The value is SET once, first, through the
proxy on a connection of its own.
"""

import argparse
import socket
import sys
import time

from resp_encode import resp

# Just under the proxy's MAX_HELD_COMMAND (1 MiB, src/relay/session.rs) with the command's own
# framing, so it is held, not refused as too large.
HELD_ARG = 1024 * 1024 - 1024


def read_reply_line(sock):
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--value-kib", type=int, default=1024, help="size of the value asked for")
    p.add_argument("--gets", type=int, default=4, help="unread GETs per connection")
    p.add_argument("--pings", type=int, default=16384, help="pipelined PINGs per connection")
    args = p.parse_args()

    setup = socket.create_connection((args.host, args.port), timeout=30)
    setup.sendall(resp("SET", "worst:big", "v" * (args.value_kib * 1024)))
    if read_reply_line(setup) != b"+OK\r\n":
        sys.exit("SET worst:big failed")
    setup.close()

    held = resp("CLIENT", "SETNAME", "n" * HELD_ARG)
    conns, ok, failed = [], 0, 0
    t0 = time.monotonic()
    for _ in range(args.n):
        try:
            s = socket.create_connection((args.host, args.port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(resp("GET", "worst:big") * args.gets)
            s.sendall(resp("PING") * args.pings)
            s.sendall(held[:-2])
            conns.append(s)
            ok += 1
        except OSError:
            failed += 1
    # Let the proxy read what was sent and fill its buffers.
    time.sleep(2)
    print("ready %d %d %.3f" % (ok, failed, time.monotonic() - t0), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
    for s in conns:
        try:
            s.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
