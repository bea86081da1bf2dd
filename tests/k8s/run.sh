#!/usr/bin/env bash
# The Kubernetes packaging tests (chart, deploy/ manifests, Dockerfile, golden injected pods),
# without a cluster: creates the virtual environment .venv-k8s at the repository top when it is
# missing, installs tests/k8s/requirements.txt into it when they changed since the last install
# (so reruns are fast), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=.venv-k8s
python="${PYTHON:-python3}"
requirements=tests/k8s/requirements.txt

# A venv whose interpreter no longer runs (e.g. the system Python was upgraded) is made anew.
if [ -d "$venv" ] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    echo "==> $venv is broken: recreating it"
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "==> $python -m venv $venv"
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "tests/k8s/run.sh: '$python -m venv' failed: install the venv module (Debian: apt-get install python3-venv; .ci/run does it)" >&2
        exit 1
    fi
fi

# Reinstall only when requirements.txt changed since the last successful install.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "==> pip install -r $requirements"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$want" >"$stamp"
else
    echo "==> $requirements already installed in $venv"
fi

echo "==> pytest tests/k8s -q"
exec "$venv/bin/python" -m pytest tests/k8s -q -p no:cacheprovider "$@"
