#!/usr/bin/env bash
# The differential fuzzer (tests/differential.rs) for longer than CI runs it: DIFF_CASES cases
# (default 500) per mode, Entra and access key, each a random script of state-changing commands
# played against redis-server directly and through the proxy, replies compared. A failure
# prints its seed; replay it with DIFF_SEED=<seed> (and DIFF_SHRINK=1 for the shortest script
# that still fails). Extra arguments go to the test binary (e.g. a test name to run one mode).
set -euo pipefail
cd "$(dirname "$0")/.."
export DIFF_CASES="${DIFF_CASES:-500}"
exec cargo test --release --test differential -- --nocapture "$@"
