#!/usr/bin/env bash
# The whole check: formatting, lints, and every test (unit + integration, which start a real
# redis-server: see README "Development"), then the Kubernetes packaging tests (tests/k8s/run.sh:
# Helm chart, deploy/ manifests, Dockerfile; Python in .venv-k8s, no cluster). Uses at most as
# many jobs as the machine has cores (CARGO_BUILD_JOBS overrides).
set -euo pipefail
cd "$(dirname "$0")/.."

cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
jobs="${CARGO_BUILD_JOBS:-$cores}"

echo "==> cargo fmt --all -- --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --jobs "$jobs" -- -D warnings
echo "==> cargo test --all-targets"
cargo test --all-targets --jobs "$jobs" -- --test-threads "${RUST_TEST_THREADS:-$cores}"
echo "==> tests/k8s/run.sh"
./tests/k8s/run.sh
