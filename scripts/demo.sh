#!/usr/bin/env bash
# The local demo: a real redis-server behind a fake Azure front, a fake managed identity endpoint
# handing out 10-second tokens, the real proxy in between, and a client that keeps one connection
# busy across several token rotations. No Azure needed. Options go to the demo, e.g.
#   ./scripts/demo.sh --token-lifetime 6s --duration 1m
# (./scripts/demo.sh --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ -z "${REDIS_SERVER:-}" ] && ! command -v redis-server >/dev/null 2>&1 \
    && [ ! -x /usr/bin/redis-server ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "demo.sh: redis-server is missing and there is no apt-get: install redis-server" \
             "(6.0 or later, built with TLS) or set REDIS_SERVER=/path/to/redis-server" >&2
        exit 1
    fi
    echo "demo.sh: installing redis-server (apt-get)"
    sudo_if_needed apt-get update
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi
if ! type -P kill >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    # The demo stops the proxy with kill(1), which slim images lack.
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y procps
fi

# The demo runs the proxy binary that `cargo build` puts next to it (target/debug).
cargo build
exec cargo run --example demo -- "$@"
