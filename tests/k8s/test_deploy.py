"""The plain manifests in deploy/: valid multi-document YAML, every object valid for Kubernetes
(strict: unknown fields are errors), and the native sidecar set up as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import DEPLOY, assert_locked_down, pod_metadata, pod_spec, validate_strict
from volume_rules import unreadable_files

FILES = sorted(DEPLOY.glob("*.yaml"))
WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet", "Pod"}


def documents(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_expected_files_exist():
    names = {p.name for p in FILES}
    assert {"workload-identity.yaml", "access-key.yaml", "job.yaml",
            "prometheus-alerts.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_object_validates_strictly(path):
    # prometheus-alerts.yaml is a PrometheusRule (a Prometheus Operator CRD, not in Kubernetes'
    # own schemas): validate_strict() gives it conftest.check_crd_shape() instead.
    docs = documents(path)
    assert docs, f"{path.name} has no object"
    for doc in docs:
        validate_strict(doc)


def workloads():
    for path in FILES:
        for doc in documents(path):
            if doc["kind"] in WORKLOAD_KINDS:
                yield pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("workload", list(workloads()))
def test_native_sidecar(workload):
    spec = pod_spec(workload)
    proxy = spec["initContainers"][0]
    assert proxy["name"] == "redis-entra-proxy"
    assert proxy["restartPolicy"] == "Always"
    assert proxy["image"].startswith("ghcr.io/redis-entra-proxy/redis-entra-proxy:")
    args = proxy["args"]
    assert args[args.index("--listen") + 1] == "127.0.0.1:6379"
    assert args[args.index("--admin-listen") + 1] == "0.0.0.0:9090"
    assert "--upstream" in args
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"proxy-admin": 9090}
    startup = proxy["startupProbe"]["httpGet"]
    assert startup == {"path": "/startup", "port": "proxy-admin"}
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/liveness"
    if workload["kind"] != "Job":
        assert proxy["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]["memory"]
    # The connection limit the chart would derive from that memory limit.
    assert proxy["resources"]["limits"]["memory"] == "128Mi"
    assert args[args.index("--max-connections") + 1] == "56"
    sc = proxy["securityContext"]
    assert sc["runAsUser"] == 65532 and sc["runAsGroup"] == 65532
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["initContainers"] + spec["containers"]:
        assert_locked_down(container)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert unreadable_files(spec, proxy) == []


def test_workload_identity_wiring():
    docs = {d["kind"]: d for d in documents(DEPLOY / "workload-identity.yaml")}
    sa = docs["ServiceAccount"]
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"]
    deployment = docs["Deployment"]
    assert pod_metadata(deployment)["labels"]["azure.workload.identity/use"] == "true"
    assert pod_spec(deployment)["serviceAccountName"] == sa["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in pod_spec(deployment)["containers"][0]["env"]}
    assert env["REDIS_HOST"] == "localhost" and env["REDIS_PORT"] == "6379"


def test_access_key_is_a_mounted_file():
    docs = {d["kind"]: d for d in documents(DEPLOY / "access-key.yaml")}
    secret = docs["Secret"]
    spec = pod_spec(docs["Deployment"])
    proxy = spec["initContainers"][0]
    args = proxy["args"]
    assert args[args.index("--auth") + 1] == "access-key"
    key_file = args[args.index("--access-key-file") + 1]
    assert key_file == "/var/run/secrets/redis-entra-proxy/access-key"
    [mount] = proxy["volumeMounts"]
    assert "subPath" not in mount, "a subPath mount is never updated: key rotation would break"
    assert key_file == f"{mount['mountPath']}/access-key"
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert "access-key" in secret["stringData"]


def test_job_completes_with_a_native_sidecar():
    [job] = documents(DEPLOY / "job.yaml")
    assert job["kind"] == "Job"
    assert isinstance(job["spec"]["backoffLimit"], int)
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert len(spec["containers"]) == 1
