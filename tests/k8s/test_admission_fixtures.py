"""The golden injected pods of the injector's Rust tests (tests/fixtures/admission/expected/
*.pod.json): each must be a valid v1 Pod (strict) with the sidecar as the contract says, whose
sidecar can read every file it is told to read under Kubernetes' volume rules (volume_rules.py),
and whose other containers see exactly what they saw before injection.

There must be at least one: this test fails when the directory is empty or missing, so that a
change that stops producing the golden files can't pass unnoticed."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, validate_strict
from volume_rules import unreadable_files

FIXTURES = REPO / "tests" / "fixtures" / "admission"
EXPECTED = FIXTURES / "expected"
FILES = sorted(EXPECTED.glob("*.pod.json"))
SIDECAR = "redis-entra-proxy"


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


def sidecar_of(pod):
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_the_sidecar_can_read_every_file_it_is_told_to_read(path):
    pod = json.loads(path.read_text())
    assert unreadable_files(pod["spec"], sidecar_of(pod)) == []


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_injection_changes_nothing_the_other_containers_can_read(path):
    """Only additions: the sidecar, volumes that only it mounts, the annotation. The pod's
    securityContext (fsGroup, supplementalGroups: what every container's groups are) and every
    other container are exactly as the pod's author wrote them."""
    injected = json.loads(path.read_text())
    name = path.name.removesuffix(".pod.json")
    original = json.loads((FIXTURES / f"{name}.review.json").read_text())["request"]["object"]
    spec, before = injected["spec"], original["spec"]
    assert spec.get("securityContext") == before.get("securityContext")
    assert spec["containers"] == before["containers"]
    others = [c for c in spec["initContainers"] if c["name"] != SIDECAR]
    assert others == before.get("initContainers", [])
    added = [v for v in spec.get("volumes", []) if v not in before.get("volumes", [])]
    assert spec.get("volumes", [])[:len(before.get("volumes", []))] == before.get("volumes", [])
    ours = {v["name"] for v in added}
    assert all(n.startswith(SIDECAR) for n in ours), ours
    for container in spec["containers"] + others:
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        assert not mounted & ours, f"{container['name']} mounts {mounted & ours}"
    rest = {k: v for k, v in spec.items() if k not in ("initContainers", "volumes")}
    assert rest == {k: v for k, v in before.items() if k not in ("initContainers", "volumes")}
