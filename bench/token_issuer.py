#!/usr/bin/env python3
"""A local token issuer for bench/run.sh: the App Service / Container Apps managed identity
protocol, backed by a real redis-server's ACL.

redis-entra-proxy, run with `--auth entra --credential managed-identity` and
IDENTITY_ENDPOINT=http://127.0.0.1:PORT/msi/token IDENTITY_HEADER=<secret>, sends
    GET /msi/token?api-version=2019-08-01&resource=https://redis.azure.com
    x-identity-header: <secret>
and expects {"access_token", "expires_on": "<unix seconds>", "resource", "token_type"}
(what tests/support/token_endpoints.rs does). Each answer carries a fresh JWT-shaped token
(header.payload.signature, base64url; payload with a fixed `oid`, `exp`, `iat`, `nbf`, a unique
`jti`, padded to the size of a real Entra token). Before the token is returned it is added as a
password of the Redis ACL user named by the `oid` (`ACL SETUSER <oid> on >TOKEN ~* &* +@all`,
over the plaintext port with an admin user), so `AUTH <oid> <token>` works; passwords of tokens
that expired are removed again (`<TOKEN`), so the ACL stays small.

With --per-token-user (what scripts/redis-suite.sh's Entra mode uses), every token instead
gets an `oid` of its own (`<oid>-<n>`), hence a Redis user of its own, which is deleted when the
token expires: Redis then closes every connection still authenticated with it, as Azure closes
a connection whose token expired. --redis-tls-ca/--redis-tls-name reach a TLS-only server.

It binds port 0 and writes the chosen port to --port-file, and it appends one line per token
served, `<unix time with ms> <n> <exp>`, to --log-file: the exact moments of the refreshes.
Standard library only.
"""

import argparse
import base64
import json
import os
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MSI_PATH = "/msi/token"
API_VERSION = "2019-08-01"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Redis:
    """One RESP2 connection to the server (plaintext, or TLS), shared by the handler threads."""

    def __init__(self, host, port, user, password, tls_ca=None, tls_name=None):
        self.addr = (host, port)
        self.user, self.password = user, password
        self.tls_ca, self.tls_name = tls_ca, tls_name
        self.lock = threading.Lock()
        self.sock = None
        self.buf = b""

    def _connect(self):
        self.sock = socket.create_connection(self.addr, timeout=10)
        if self.tls_ca:
            import ssl
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            self.sock = ctx.wrap_socket(self.sock, server_hostname=self.tls_name)
        self.buf = b""
        self._call_locked("AUTH", self.user, self.password)

    def _read_line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _call_locked(self, *args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a.encode() if isinstance(a, str) else a
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.sock.sendall(out)
        line = self._read_line()
        if line.startswith(b"-"):
            raise RuntimeError("redis: " + line[1:].decode(errors="replace"))
        return line

    def call(self, *args):
        with self.lock:
            for attempt in (1, 2):
                try:
                    if self.sock is None:
                        self._connect()
                    return self._call_locked(*args)
                except (OSError, ConnectionError):
                    self.sock = None
                    if attempt == 2:
                        raise


class Issuer:
    def __init__(self, args):
        self.args = args
        self.redis = Redis("127.0.0.1", args.redis_port, args.redis_user, args.redis_password,
                           args.redis_tls_ca, args.redis_tls_name)
        self.lock = threading.Lock()
        self.n = 0
        self.live = []  # (exp, token) still in the ACL
        self.nonce = uuid.uuid4().hex[:8]
        self.log = open(args.log_file, "a", buffering=1) if args.log_file else None
        self.lifetime = args.lifetime
        # Start from a clean user (a previous run on the same server may have left one).
        if not args.per_token_user:
            self.redis.call("ACL", "SETUSER", args.oid, "reset", "on", "~*", "&*", "+@all")

    def mint(self):
        now = time.time()
        with self.lock:
            self.n += 1
            n = self.n
        exp = int(now + self.lifetime + 0.999)  # whole seconds, rounded up like real tokens
        oid = "%s-%d" % (self.args.oid, n) if self.args.per_token_user else self.args.oid
        header = {"typ": "JWT", "alg": "RS256", "kid": "bench"}
        claims = {
            "aud": "https://redis.azure.com",
            "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
            "iat": int(now),
            "nbf": int(now),
            "exp": exp,
            "oid": oid,
            "sub": oid,
            "tid": "00000000-0000-0000-0000-000000000000",
            "jti": "%s-%d-%s" % (self.nonce, n, uuid.uuid4().hex),
        }
        def encode():
            return ".".join([
                b64url(json.dumps(header, separators=(",", ":")).encode()),
                b64url(json.dumps(claims, separators=(",", ":")).encode()),
                b64url(signature),
            ])

        signature = os.urandom(256)  # an RS256 signature is 256 bytes
        # Real Entra access tokens are 1.5-2.5 KB; pad so that AUTH costs about the same.
        claims["xms_pad"] = ""
        claims["xms_pad"] = "x" * max(0, (self.args.token_bytes - len(encode())) * 3 // 4)
        token = encode()
        if self.args.per_token_user:
            self.redis.call("ACL", "SETUSER", oid, "reset", "on", ">" + token, "~*", "&*", "+@all")
            delay = max(0.0, exp - time.time())
            timer = threading.Timer(delay, self.expire, args=(oid,))
            timer.daemon = True  # the process may exit with users still to delete
            timer.start()
            if self.log:
                self.log.write("%.3f %d %d\n" % (time.time(), n, exp))
            return token, exp
        # Add the token as a password first, then drop the passwords of expired tokens.
        self.redis.call("ACL", "SETUSER", self.args.oid, "on", ">" + token)
        with self.lock:
            self.live.append((exp, token))
            expired = [t for e, t in self.live if e < now - 5]
            self.live = [(e, t) for e, t in self.live if e >= now - 5]
        for t in expired:
            self.redis.call("ACL", "SETUSER", self.args.oid, "<" + t)
        if self.log:
            self.log.write("%.3f %d %d\n" % (time.time(), n, exp))
        return token, exp

    def expire(self, oid):
        """The token's user goes, and with it every connection still authenticated as it."""
        try:
            self.redis.call("ACL", "DELUSER", oid)
        except Exception as e:  # noqa: BLE001 - a failed deletion only weakens the check
            print("token_issuer: ACL DELUSER %s: %s" % (oid, e), file=sys.stderr, flush=True)


def make_handler(issuer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet
            pass

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path != MSI_PATH:
                return self.reply(404, {"statusCode": 404, "message": "not found"})
            if self.headers.get("x-identity-header") != issuer.args.identity_header:
                return self.reply(401, {"statusCode": 401, "message": "missing or wrong x-identity-header"})
            if q.get("api-version") != API_VERSION:
                return self.reply(400, {"statusCode": 400, "message": "missing or unsupported api-version"})
            resource = q.get("resource")
            if not resource:
                return self.reply(400, {"statusCode": 400, "message": "missing resource"})
            try:
                token, exp = issuer.mint()
            except Exception as e:  # noqa: BLE001 - report, the proxy retries
                print("token_issuer: %s" % e, file=sys.stderr, flush=True)
                return self.reply(500, {"statusCode": 500, "message": "issuer failed"})
            self.reply(200, {
                "access_token": token,
                "expires_on": str(exp),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": "00000000-0000-0000-0000-00000000c11d",
            })

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis-port", type=int, required=True, help="plaintext port of redis-server")
    p.add_argument("--redis-user", required=True, help="an admin user for ACL SETUSER")
    p.add_argument("--redis-password", required=True)
    p.add_argument("--redis-tls-ca", help="CA file: reach redis-server over TLS")
    p.add_argument("--redis-tls-name", default="localhost", help="TLS server name")
    p.add_argument("--per-token-user", action="store_true",
                   help="one Redis user per token, deleted when the token expires")
    p.add_argument("--oid", default="9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d")
    p.add_argument("--lifetime", type=float, default=3600, help="token lifetime, seconds")
    p.add_argument("--identity-header", default="secret")
    p.add_argument("--token-bytes", type=int, default=1800, help="token size (approximately)")
    p.add_argument("--port-file", required=True)
    p.add_argument("--log-file")
    args = p.parse_args()

    issuer = Issuer(args)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(issuer))
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % server.server_address[1])
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
