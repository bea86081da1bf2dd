"""Shared helpers of the Kubernetes packaging tests: render the chart offline with Helm's own
library (helm-python-sdk), and validate objects with kubernetes-validate, strictly (an unknown
field is an error), against the oldest Kubernetes the chart supports (1.29, the first with native
sidecars on by default) and the newest schemas the package bundles."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "redis-entra-proxy"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
DEPLOY = REPO / "deploy"

RELEASE = "rep"
NAMESPACE = "redis-system"

# Oldest supported (native sidecars) and newest bundled.
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.latest_version() + ".0"]

# Kinds from CRDs, whose schemas are not among Kubernetes' own: checked by check_crd_shape().
CRD_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def load_values(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """Render the chart as `helm install` would (offline: lookup finds nothing) and return every
    object, NOTES.txt excluded."""
    with helm.Chart.load(chart) as c:
        out = c.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for name, text in sorted(out.items()):
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as c:
        out = c.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for name, text in out.items() if name.endswith("NOTES.txt"))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def validate_strict(obj: dict[str, Any]) -> None:
    """Validate one object against the Kubernetes schemas, unknown fields being errors; CRD
    kinds get the explicit shape check instead."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_KINDS:
        check_crd_shape(obj)
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} invalid for Kubernetes "
                        f"{version} at {path}: {e.message}")


def _check_metadata(obj: dict[str, Any]) -> None:
    """A CRD object's metadata is a plain ObjectMeta: validate it strictly by wrapping it in a
    ConfigMap, whose schema has the same metadata."""
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": copy.deepcopy(obj["metadata"])}
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(probe, version, strict=True)


_ISSUER_REF_KEYS = {"name", "kind", "group"}
_CERT_SPEC_KEYS = {
    "secretName", "commonName", "dnsNames", "ipAddresses", "uris", "duration", "renewBefore",
    "isCA", "usages", "privateKey", "issuerRef", "subject", "secretTemplate",
    "revisionHistoryLimit",
}
_PRIVATE_KEY_KEYS = {"algorithm", "size", "encoding", "rotationPolicy"}
_USAGES = {"digital signature", "key encipherment", "server auth", "client auth", "cert sign",
           "crl sign"}


def check_crd_shape(obj: dict[str, Any]) -> None:
    """The shape of the CRD objects the project ships (cert-manager Issuer / Certificate,
    Prometheus Operator PrometheusRule). kubernetes-validate has only Kubernetes' own schemas,
    so these get a small explicit check of the fields we use, strict like the rest: an unknown
    spec field fails. It does not replace the CRD's real OpenAPI schema."""
    _check_metadata(obj)
    kind, spec = obj["kind"], obj["spec"]
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, set(obj)
    if kind == "Issuer":
        assert len(spec) == 1 and set(spec) <= {"selfSigned", "ca"}, spec
        if "ca" in spec:
            assert set(spec["ca"]) == {"secretName"} and spec["ca"]["secretName"]
        else:
            assert spec["selfSigned"] == {}
    elif kind == "Certificate":
        assert set(spec) <= _CERT_SPEC_KEYS, set(spec) - _CERT_SPEC_KEYS
        assert spec["secretName"]
        assert set(spec["issuerRef"]) <= _ISSUER_REF_KEYS and spec["issuerRef"]["name"]
        assert spec["issuerRef"].get("kind", "Issuer") in {"Issuer", "ClusterIssuer"}
        assert spec.get("isCA") or spec.get("dnsNames"), "a serving certificate needs dnsNames"
        assert all(isinstance(n, str) and n for n in spec.get("dnsNames", []))
        assert set(spec.get("privateKey", {})) <= _PRIVATE_KEY_KEYS
        assert set(spec.get("usages", [])) <= _USAGES
        for d in ("duration", "renewBefore"):
            if d in spec:
                assert isinstance(spec[d], str) and spec[d][-1] in "hms", spec[d]
    elif kind == "PrometheusRule":
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules"} and group["name"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
                assert ("alert" in rule) != ("record" in rule), rule
                assert isinstance(rule["expr"], str) and rule["expr"].strip()
    else:  # pragma: no cover
        pytest.fail(f"no shape check for {kind}")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["spec"]
    return obj["spec"]["template"]["spec"]


def pod_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["metadata"]
    return obj["spec"]["template"]["metadata"]


def assert_locked_down(container: dict[str, Any]) -> None:
    sc = container.get("securityContext", {})
    name = container["name"]
    assert sc.get("runAsNonRoot") is True, name
    assert sc.get("allowPrivilegeEscalation") is False, name
    assert sc.get("readOnlyRootFilesystem") is True, name
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], name


def decode_b64(value: str) -> str:
    return base64.b64decode(value).decode()


def json_of(text: str) -> Any:
    return json.loads(text)
