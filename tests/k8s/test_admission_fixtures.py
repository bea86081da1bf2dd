"""The golden injected pods of the injector's Rust tests (tests/fixtures/admission/expected/
*.pod.json): each must be a valid v1 Pod (strict) with the sidecar as the contract says.

There must be at least one: this test fails when the directory is empty or missing, so that a
change that stops producing the golden files can't pass unnoticed."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, validate_strict

EXPECTED = REPO / "tests" / "fixtures" / "admission" / "expected"
FILES = sorted(EXPECTED.glob("*.pod.json"))


def test_golden_pods_exist():
    assert FILES, f"no golden injected pod in {EXPECTED.relative_to(REPO)}/*.pod.json"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_golden_pod_is_a_valid_injected_pod(path):
    pod = json.loads(path.read_text())
    assert pod.get("apiVersion", "v1") == "v1" and pod.get("kind", "Pod") == "Pod"
    pod = {"apiVersion": "v1", "kind": "Pod", **pod}
    validate_strict(pod)
    sidecars = [c for c in pod["spec"]["initContainers"] if c["name"] == "redis-entra-proxy"]
    assert len(sidecars) == 1, "injected exactly once"
    assert pod["spec"]["initContainers"][0] is sidecars[0], "the sidecar comes first"
    sidecar = sidecars[0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/startup"
    assert sidecar["startupProbe"]["httpGet"]["port"] == "proxy-admin"
    assert "proxy-admin" in {p.get("name") for p in sidecar.get("ports", [])}
    assert pod["metadata"]["annotations"]["redis-entra-proxy.io/injected"] == "true"
