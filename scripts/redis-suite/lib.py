#!/usr/bin/env python3
"""Helpers for redis-suite.sh (python3 standard library only).

  freeport N                      print N free 127.0.0.1 TCP ports (space separated)
  config snapshot|restore FILE PORT [CA SNI [USER PASSWORD_FILE]]
                                  save / restore a server's CONFIG GET * (between units)
  baseport                        print a --baseport for runtest (see cmd_baseport)
  parse UNIT LOG RC               turn one runtest log into TSV rows "unit<TAB>status<TAB>test"
                                  on stdout; status is ok | err | skip; RC is runtest's exit
                                  status (124/137 = killed by the per-unit timeout)
  compare OUT_DIR EXPECTED        read OUT_DIR/direct.tsv, OUT_DIR/proxied.tsv and the optional
                                  OUT_DIR/proxied-retry.tsv, print the report, write
                                  OUT_DIR/regressions.txt and OUT_DIR/summary.txt; exit 0 when
                                  every regression is in the allow-list EXPECTED, else 1
  retry-units OUT_DIR             print the units that have regressions (one per line)
  metric HOST:PORT NAME           print one sample of the proxy's /metrics (0 if absent)
  metrics HOST:PORT PREFIX        print every sample of the proxy's /metrics whose name starts
                                  with PREFIX (nothing if none)

The allow-list EXPECTED may tag an entry with the proxy modes it applies to: "[entra] <test
id>  # reason" holds only when the run's tags include entra, "[multiplex] ..." only in the
multiplexed mode, "[entra,multiplex] ..." only when both hold. The run's tags are SUITE_TAGS
(space separated; redis-suite.sh sets it to PROXY_MODE, plus "multiplex" with PROXY_MULTIPLEX),
else SUITE_MODE alone.

Test identity is "unit/<file>: <test title>"; a title repeated inside one unit gets " [#2]",
" [#3]"... in order of appearance. Each unit also gets a synthetic row
"unit/<file>: (unit completed)" that is ok only when runtest reported the unit done, so a unit
that hangs, times out or aborts on an exception shows up as a regression even if the tests it
did not reach cannot be named.
"""
import re
import socket
import sys

OK_RE = re.compile(r"^\[ok\]: (.*) \(\d+ ms\)\s*$")
ERR_RE = re.compile(r"^\[err\]: (.*?)\s*$")
SKIP_RE = re.compile(r"^\[skip\]: (.*?)\s*$")
IGNORE_RE = re.compile(r"^\[ignore\]: (.*?)\s*$")
EXC_RE = re.compile(r"^\[exception\]: (.*?)\s*$")
DONE_RE = re.compile(r"^\[\d+/\d+ done\]: (\S+) \(\d+ seconds\)")
TIMEOUT_RE = re.compile(r"^\[TIMEOUT\]")
IN_FILE_RE = re.compile(r"^(.*) in tests/\S+\.tcl$")
# reasons tags_acceptable() appends to an [ignore] line ("<name>: <reason>")
IGNORE_REASON_RE = re.compile(
    r"^(.*): (Tag: .*|Not supported .*|large memory flag not provided|"
    r"Tag: .* denied|.*not provided)$")
UNIT_DONE = "(unit completed)"


def cmd_freeport(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


class Resp:
    """A minimal RESP2 client (plaintext or TLS) for the config snapshot/restore below."""

    def __init__(self, port, ca=None, sni=None, user=None, password=None):
        import ssl
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if ca:
            ctx = ssl.create_default_context(cafile=ca)
            sock = ctx.wrap_socket(sock, server_hostname=sni)
        self.f = sock.makefile("rwb")
        if password:
            self.call(*(["AUTH", user, password] if user else ["AUTH", password]))

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.f.write(b"".join(out))
        self.f.flush()
        return self.read()

    def read(self):
        line = self.f.readline()
        if not line:
            raise ConnectionError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RuntimeError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ValueError(f"unexpected reply {line!r}")


def cmd_config(args):
    """config snapshot|restore FILE PORT [CA SNI [USER PASSWORD_FILE]]: save CONFIG GET * to FILE,
    or CONFIG SET every parameter that differs from FILE (tests in external mode do not always
    restore what they change, e.g. when they fail half-way); prints what it restored."""
    import json
    action, path, port = args[0], args[1], int(args[2])
    ca = args[3] if len(args) > 3 else None
    sni = args[4] if len(args) > 4 else None
    user = args[5] if len(args) > 5 else None
    password = open(args[6]).read().strip() if len(args) > 6 else None
    r = Resp(port, ca, sni, user, password)
    flat = r.call("CONFIG", "GET", "*")
    now = {flat[i].decode(): flat[i + 1].decode(errors="surrogateescape")
           for i in range(0, len(flat), 2)}
    if action == "snapshot":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(now, f)
        return
    with open(path, encoding="utf-8") as f:
        snap = json.load(f)
    changed = []
    for k, v in sorted(snap.items()):
        if now.get(k) != v:
            res = r.call("CONFIG", "SET", k, v.encode(errors="surrogateescape"))
            changed.append(f"{k}={v!r} (was {now.get(k)!r}{', ' + str(res) if isinstance(res, Exception) else ''})")
    # a failed test can leave clients paused or a script busy; undo what can be undone
    r.call("CLIENT", "UNPAUSE")
    if changed:
        print("restored config: " + "; ".join(changed))


def cmd_baseport():
    """A --baseport for runtest: its test server listens on the first free port of
    baseport-32 .. baseport-1 (and probes port+10000 as well), so pick a random block of 32
    whose first port is free on 127.0.0.1 and 0.0.0.0, together with that port + 10000."""
    import random
    for _ in range(200):
        base = random.randrange(22000, 31000)
        try:
            for port in (base, base + 10000):
                for host in ("127.0.0.1", "0.0.0.0"):
                    s = socket.socket()
                    try:
                        s.bind((host, port))
                    finally:
                        s.close()
        except OSError:
            continue
        print(base + 32)
        return
    sys.exit("no free port block for runtest's test server")


def parse(unit, log_path, rc):
    rows, seen = [], {}

    def add(status, name):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} [#{seen[name]}]"
        rows.append((unit, status, f"{unit}: {name}"))

    done = False
    notes = []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = OK_RE.match(line)
            if m:
                add("ok", m.group(1))
                continue
            m = ERR_RE.match(line)
            if m:
                what = m.group(1)
                m2 = IN_FILE_RE.match(what)
                if m2:
                    add("err", m2.group(1))
                else:  # an error outside any test (e.g. start_server failed under --durable)
                    notes.append(f"error outside a test: {what[:200]}")
                continue
            m = SKIP_RE.match(line)
            if m:
                add("skip", m.group(1))
                continue
            m = IGNORE_RE.match(line)
            if m:
                what = m.group(1)
                m2 = IGNORE_REASON_RE.match(what)
                if m2:
                    add("skip", m2.group(1))
                else:  # a whole start_server block skipped by its tags: no test name
                    add("skip", f"(server block skipped: {what})")
                continue
            m = EXC_RE.match(line)
            if m:
                notes.append(f"exception: {m.group(1)[:200]}")
                continue
            if TIMEOUT_RE.match(line):
                notes.append("runtest --timeout: no progress")
                continue
            m = DONE_RE.match(line)
            if m and m.group(1) == unit:
                done = True
    if rc in (124, 137):
        notes.append(f"killed by the per-unit timeout (rc {rc})")
    rows.append((unit, "ok" if done and rc in (0, 1) else "err", f"{unit}: {UNIT_DONE}"))
    for unit_, status, name in rows:
        print(f"{unit_}\t{status}\t{name}")
    for n in notes:
        print(f"# {unit}: {n}", file=sys.stderr)


def read_tsv(path):
    res = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t", 2)
                if len(parts) == 3:
                    res[parts[2]] = parts[1]
    except FileNotFoundError:
        pass
    return res


def read_expected(path):
    import os
    tags_on = set(os.environ.get("SUITE_TAGS", "").split()) or \
        {os.environ.get("SUITE_MODE", "access-key")}
    names = set()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                # "[tag] " / "[tag,tag] " restricts an entry to runs with all of those tags
                tag = re.match(r"^\[([a-z-]+(?:,[a-z-]+)*)\]\s+", line)
                if tag:
                    if not set(tag.group(1).split(",")) <= tags_on:
                        continue
                    line = line[tag.end():]
                # "<test id>    # reason": the reason is after two or more spaces and '#'
                names.add(re.split(r"\s{2,}#", line, maxsplit=1)[0].strip())
    except FileNotFoundError:
        pass
    return names


def counts(res):
    c = {"ok": 0, "err": 0, "skip": 0}
    for name, st in res.items():
        if name.endswith(UNIT_DONE):
            continue
        c[st] = c.get(st, 0) + 1
    return c


def regressions_of(direct, proxied):
    regs = []
    for name, st in direct.items():
        if st != "ok":
            continue
        p = proxied.get(name)
        if p != "ok":
            regs.append((name, p or "not run"))
    return sorted(regs)


def cmd_compare(out_dir, expected_path):
    direct = read_tsv(f"{out_dir}/direct.tsv")
    proxied = read_tsv(f"{out_dir}/proxied.tsv")
    retry = read_tsv(f"{out_dir}/proxied-retry.tsv")
    expected = read_expected(expected_path)

    def allowed_name(n):
        return n in expected or re.sub(r" \[#\d+\]$", "", n) in expected

    regs = regressions_of(direct, proxied)
    flaky = [(n, s) for n, s in regs if retry.get(n) == "ok"]
    regs = [(n, s) for n, s in regs if retry.get(n) != "ok"]
    allowed = [(n, s) for n, s in regs if allowed_name(n)]
    unexpected = [(n, s) for n, s in regs if not allowed_name(n)]
    improvements = sorted(n for n, st in proxied.items()
                          if st == "ok" and direct.get(n) != "ok")
    stale = sorted(n for n in expected if proxied.get(n) == "ok" and direct.get(n) == "ok")

    cd, cp = counts(direct), counts(proxied)
    units = sorted({n.split(": ", 1)[0] for n in direct} | {n.split(": ", 1)[0] for n in proxied})
    lines = []
    lines.append("## redis-suite results")
    lines.append("")
    lines.append(f"units: {len(units)}")
    lines.append(f"{'':10}{'pass':>7}{'fail':>7}{'skip':>7}")
    lines.append(f"{'direct':10}{cd['ok']:>7}{cd['err']:>7}{cd['skip']:>7}")
    lines.append(f"{'proxied':10}{cp['ok']:>7}{cp['err']:>7}{cp['skip']:>7}")
    lines.append("")
    lines.append(f"regressions (pass directly, not through the proxy): {len(regs)}"
                 f" ({len(allowed)} allowed by the expected list, {len(unexpected)} not)")
    for n, s in unexpected:
        lines.append(f"  REGRESSION  {n}   [proxied: {s}]")
    for n, s in allowed:
        lines.append(f"  allowed     {n}   [proxied: {s}]")
    if flaky:
        lines.append(f"failed through the proxy but passed when the unit was re-run: {len(flaky)}")
        for n, s in flaky:
            lines.append(f"  flaky       {n}")
    lines.append(f"pass through the proxy but not directly: {len(improvements)}")
    for n in improvements:
        lines.append(f"  {n}   [direct: {direct.get(n, 'not run')}]")
    if stale:
        lines.append(f"allow-list entries that passed both ways this time: {len(stale)}")
        for n in stale:
            lines.append(f"  {n}")
    lines.append("")
    lines.append("verdict: " + ("PASS (no regressions beyond the allow-list)" if not unexpected
                                else f"FAIL ({len(unexpected)} unexpected regressions)"))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    with open(f"{out_dir}/summary.txt", "w", encoding="utf-8") as f:
        f.write(text)
    with open(f"{out_dir}/regressions.txt", "w", encoding="utf-8") as f:
        for n, s in regs:
            f.write(f"{n}\t{s}\t{'allowed' if allowed_name(n) else 'unexpected'}\n")
    return 0 if not unexpected else 1


def cmd_retry_units(out_dir):
    direct = read_tsv(f"{out_dir}/direct.tsv")
    proxied = read_tsv(f"{out_dir}/proxied.tsv")
    units = sorted({n.split(": ", 1)[0] for n, _ in regressions_of(direct, proxied)})
    for u in units:
        print(u)


def cmd_metric(addr, name):
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    print(line.split()[-1])
                    return 0
    except OSError:
        pass
    print(0)
    return 0


def cmd_metrics(addr, prefix):
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(prefix):
                    print(line)
    except OSError as e:
        print(f"(no /metrics: {e})")
    return 0


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "freeport":
        cmd_freeport(int(args[0]))
    elif cmd == "config":
        cmd_config(args)
    elif cmd == "baseport":
        cmd_baseport()
    elif cmd == "parse":
        parse(args[0], args[1], int(args[2]))
    elif cmd == "compare":
        sys.exit(cmd_compare(args[0], args[1]))
    elif cmd == "retry-units":
        cmd_retry_units(args[0])
    elif cmd == "metric":
        sys.exit(cmd_metric(args[0], args[1]))
    elif cmd == "metrics":
        sys.exit(cmd_metrics(args[0], args[1]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
