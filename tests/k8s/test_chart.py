"""The Helm chart charts/redis-entra-proxy, rendered offline with Helm's own library."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helm_python as helm
import pytest

from conftest import (
    CHART, CI_VALUES, NAMESPACE, assert_locked_down, by_kind, decode_b64, load_values, notes,
    one, pod_metadata, pod_spec, render, validate_strict,
)
from volume_rules import unreadable_files

VALUE_SETS = [None, *CI_VALUES]
VALUE_IDS = ["default", *(p.name for p in CI_VALUES)]

DEFAULTS_FIELDS = {"image", "imagePullPolicy", "upstream", "clientId", "listen", "auth",
                   "accessKeySecret", "listenPasswordSecret", "database", "maxConnections",
                   "cluster", "clusterPorts", "clusterMaxNodes", "multiplex",
                   "adminPort", "logFormat", "resources"}

GATEWAY = {"mode": "gateway",
           "gateway": {"upstream": "mycache.redis.cache.windows.net",
                       "listenPassword": {"existingSecret": "pw"}}}


def test_ci_values_cover_every_mode():
    modes = {(v.get("mode"), v.get("injector", {}).get("tls", {}).get("mode", "helm"))
             for v in map(load_values, CI_VALUES)}
    assert {("injector", "helm"), ("injector", "cert-manager")} <= modes
    assert any(m == "gateway" for m, _ in modes)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=VALUE_IDS)
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_clean(values_file, strict):
    report = helm.lint(CHART, load_values(values_file), strict=strict, namespace=NAMESPACE,
                       kube_version="v1.29.0")
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error. (1 = info, e.g. "icon is recommended", is fine.)
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert bad == [], bad


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=VALUE_IDS)
def test_every_rendered_object_validates_strictly(values_file):
    objects = render(load_values(values_file))
    assert objects
    for obj in objects:
        validate_strict(obj)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=VALUE_IDS)
def test_workloads_are_locked_down_with_replicas_and_pdb(values_file):
    objects = render(load_values(values_file))
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        assert_locked_down(c)
        assert c["securityContext"]["runAsUser"] == 65532
        assert c["securityContext"]["runAsGroup"] == 65532
        assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "requests" in c["resources"] and "limits" in c["resources"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, probe
    terms = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=VALUE_IDS)
def test_services_select_their_deployment(values_file):
    objects = render(load_values(values_file))
    labels = pod_metadata(one(objects, "Deployment"))["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"] for p in pod_spec(one(objects, "Deployment"))["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_image_defaults_to_app_version():
    objects = render()
    image = pod_spec(one(objects, "Deployment"))["containers"][0]["image"]
    assert image == "ghcr.io/redis-entra-proxy/redis-entra-proxy:0.1.0"
    image = pod_spec(one(render({"image": {"tag": "9.9.9"}}), "Deployment"))["containers"][0]["image"]
    assert image.endswith(":9.9.9")


# ----------------------------------------------------------------------------------- injector

def webhook_of(objects):
    config = one(objects, "MutatingWebhookConfiguration")
    assert len(config["webhooks"]) == 1
    return config, config["webhooks"][0]


def test_injector_container_runs_the_contract():
    objects = render()
    container = pod_spec(one(objects, "Deployment"))["containers"][0]
    assert container["args"] == [
        "injector", "--listen", "0.0.0.0:8443",
        "--tls-cert-file", "/etc/redis-entra-proxy-injector/tls/tls.crt",
        "--tls-key-file", "/etc/redis-entra-proxy-injector/tls/tls.key",
        "--defaults-file", "/etc/redis-entra-proxy-injector/defaults/defaults.json",
        "--log-format", "json",
    ]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["scheme"] == "HTTPS"
        assert get["port"] in ("webhook", 8443)
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in container["ports"]
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(one(objects, "Deployment"))["volumes"]}
    tls = volumes[mounts["/etc/redis-entra-proxy-injector/tls"]]["secret"]["secretName"]
    defaults = volumes[mounts["/etc/redis-entra-proxy-injector/defaults"]]["configMap"]["name"]
    assert defaults == one(objects, "ConfigMap")["metadata"]["name"]
    assert tls == one(objects, "Secret")["metadata"]["name"]
    sa = one(objects, "ServiceAccount")
    assert pod_spec(one(objects, "Deployment"))["serviceAccountName"] == sa["metadata"]["name"]


def test_webhook_defaults():
    objects = render()
    config, webhook = webhook_of(objects)
    assert webhook["objectSelector"] == {"matchLabels": {"redis-entra-proxy.io/inject": "true"}}
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["timeoutSeconds"] == 5
    assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""],
                                 "apiVersions": ["v1"], "resources": ["pods"],
                                 "scope": "Namespaced"}]
    [expr] = webhook["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "NotIn"
    assert {NAMESPACE, "kube-system"} <= set(expr["values"])
    service = webhook["clientConfig"]["service"]
    assert service["path"] == "/mutate"
    assert service["namespace"] == NAMESPACE
    assert service["name"] == one(objects, "Service")["metadata"]["name"]
    assert service.get("port", 443) == 443


def test_webhook_values_are_overridable():
    objects = render({"injector": {"failurePolicy": "Ignore", "timeoutSeconds": 2,
                                   "excludeNamespaces": ["monitoring", "kube-system"]}})
    _, webhook = webhook_of(objects)
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["timeoutSeconds"] == 2
    values = webhook["namespaceSelector"]["matchExpressions"][0]["values"]
    assert sorted(values) == sorted([NAMESPACE, "kube-system", "monitoring"])


def test_helm_tls_mode_generates_a_ca_and_a_serving_certificate():
    objects = render()
    config, webhook = webhook_of(objects)
    assert "cert-manager.io/inject-ca-from" not in config["metadata"].get("annotations", {})
    ca_bundle = webhook["clientConfig"]["caBundle"]
    assert ca_bundle
    assert decode_b64(ca_bundle).startswith("-----BEGIN CERTIFICATE-----")
    secret = one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["data"]["ca.crt"] == ca_bundle
    assert decode_b64(secret["data"]["tls.crt"]).startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY-----" in decode_b64(secret["data"]["tls.key"])
    assert not by_kind(objects, "Certificate") and not by_kind(objects, "Issuer")


def test_helm_tls_certificate_names_the_service():
    """The serving certificate's SANs, read with openssl (.ci/run installs it when missing)."""
    import subprocess
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed (apt-get install openssl)"
    objects = render()
    crt = decode_b64(one(objects, "Secret")["data"]["tls.crt"])
    text = subprocess.run([openssl, "x509", "-noout", "-ext", "subjectAltName"], input=crt,
                          capture_output=True, text=True, check=True).stdout
    svc = one(objects, "Service")["metadata"]["name"]
    sans = {part.strip() for part in text.split("\n", 1)[1].split(",")}
    assert sans == {f"DNS:{svc}", f"DNS:{svc}.{NAMESPACE}", f"DNS:{svc}.{NAMESPACE}.svc",
                    f"DNS:{svc}.{NAMESPACE}.svc.cluster.local"}, text


def test_cert_manager_mode_uses_inject_ca_from():
    objects = render({"injector": {"tls": {"mode": "cert-manager"}}})
    config, webhook = webhook_of(objects)
    assert "caBundle" not in webhook["clientConfig"]
    annotation = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    certificates = {c["metadata"]["name"]: c for c in by_kind(objects, "Certificate")}
    ns, name = annotation.split("/")
    assert ns == NAMESPACE and name in certificates
    serving = certificates[name]
    svc = one(objects, "Service")["metadata"]["name"]
    assert serving["spec"]["dnsNames"] == [svc, f"{svc}.{NAMESPACE}", f"{svc}.{NAMESPACE}.svc",
                                           f"{svc}.{NAMESPACE}.svc.cluster.local"]
    # The Deployment mounts the Secret the Certificate writes; the chart makes no Secret itself.
    assert not by_kind(objects, "Secret")
    volumes = {v["name"]: v for v in pod_spec(one(objects, "Deployment"))["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == serving["spec"]["secretName"]
    # A self-signed CA chain: selfSigned Issuer -> CA Certificate -> CA Issuer -> serving cert.
    issuers = {i["metadata"]["name"]: i for i in by_kind(objects, "Issuer")}
    ca_issuer = issuers[serving["spec"]["issuerRef"]["name"]]
    ca_cert = next(c for c in certificates.values()
                   if c["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"])
    assert ca_cert["spec"]["isCA"] is True
    assert "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]


def defaults_json(objects):
    config_map = one(objects, "ConfigMap")
    assert set(config_map["data"]) == {"defaults.json"}
    return json.loads(config_map["data"]["defaults.json"])


def test_defaults_file_has_only_the_known_fields():
    for values_file in VALUE_SETS:
        values = load_values(values_file)
        if (values or {}).get("mode") == "gateway":
            continue
        data = defaults_json(render(values))
        assert set(data) <= DEFAULTS_FIELDS, set(data) - DEFAULTS_FIELDS


def test_defaults_file_content():
    data = defaults_json(render())
    assert data == {
        "image": "ghcr.io/redis-entra-proxy/redis-entra-proxy:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "listen": "127.0.0.1:6379",
        "auth": "auto",
        "database": 0,
        "adminPort": 9090,
        "logFormat": "json",
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"},
                      "limits": {"memory": "128Mi"}},
    }
    data = defaults_json(render({"injector": {"defaults": {
        "upstream": "c.redis.cache.windows.net", "clientId": "11111111-2222-3333-4444-555555555555",
        "accessKeySecret": "k/primary", "database": 3, "adminPort": 9191, "image": "x/y:1",
        "imagePullPolicy": "Always", "listen": "0.0.0.0:6379",
        "listenPasswordSecret": "pw", "maxConnections": 0}}}))
    assert data["maxConnections"] == 0 and isinstance(data["maxConnections"], int)
    assert data["listen"] == "0.0.0.0:6379" and data["listenPasswordSecret"] == "pw"
    assert data["upstream"] == "c.redis.cache.windows.net"
    assert data["clientId"] == "11111111-2222-3333-4444-555555555555"
    assert data["accessKeySecret"] == "k/primary"
    assert data["database"] == 3 and isinstance(data["database"], int)
    assert data["adminPort"] == 9191
    assert data["image"] == "x/y:1" and data["imagePullPolicy"] == "Always"
    data = defaults_json(render({"injector": {"defaults": {"multiplex": 4, "cluster": "off"}}}))
    assert data["multiplex"] == 4 and isinstance(data["multiplex"], int)
    assert data["cluster"] == "off"
    assert defaults_json(render({"injector": {"defaults": {"multiplex": 0}}}))["multiplex"] == 0


def test_defaults_checksum_rolls_the_injector():
    def checksum(values):
        template = one(render(values), "Deployment")["spec"]["template"]
        return template["metadata"]["annotations"]["checksum/defaults"]
    assert checksum(None) == checksum(None)
    assert checksum(None) != checksum({"injector": {"defaults": {"upstream": "other"}}})


def test_injector_network_policy_is_off_unless_asked_for():
    assert not by_kind(render(), "NetworkPolicy")


def test_injector_network_policy_admits_only_the_api_server_and_allows_no_egress():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"app": "konnectivity-agent"}}}
    objects = render({"injector": {"networkPolicy": {
        "enabled": True, "apiServerCIDRs": ["10.224.0.0/28", "fd00::/64"], "from": [peer]}}})
    policy = one(objects, "NetworkPolicy")
    validate_strict(policy)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == \
        one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["egress"] == []
    [ingress] = spec["ingress"]
    assert ingress["ports"] == [{"port": "webhook", "protocol": "TCP"}]
    assert ingress["from"] == [{"ipBlock": {"cidr": "10.224.0.0/28"}},
                               {"ipBlock": {"cidr": "fd00::/64"}}, peer]
    # The port it names is the one the webhook Service targets.
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in \
        pod_spec(one(objects, "Deployment"))["containers"][0]["ports"]


def test_an_injector_network_policy_without_sources_fails_the_install():
    with pytest.raises(helm.HelmError, match=r"admits nothing"):
        render({"injector": {"networkPolicy": {"enabled": True}}})


def test_injector_mounts_no_api_token():
    objects = render()
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod_spec(one(objects, "Deployment"))["automountServiceAccountToken"] is False


def test_notes_tell_how_to_opt_in():
    text = notes()
    assert 'redis-entra-proxy.io/inject: "true"' in text
    assert "redis-entra-proxy.io/upstream" in text


# ------------------------------------------------------------------------------------ gateway

def gateway_container(objects):
    [container] = pod_spec(one(objects, "Deployment"))["containers"]
    return container


def arg(container, flag):
    args = container["args"]
    return args[args.index(flag) + 1] if flag in args else None


def test_gateway_runs_the_proxy_with_a_listen_password():
    objects = render(GATEWAY)
    assert not by_kind(objects, "MutatingWebhookConfiguration")
    c = gateway_container(objects)
    assert arg(c, "--upstream") == "mycache.redis.cache.windows.net"
    assert arg(c, "--listen") == "0.0.0.0:6379"
    assert arg(c, "--admin-listen") == "0.0.0.0:9090"
    [env] = [e for e in c["env"] if e["name"] == "REDIS_PROXY_LISTEN_PASSWORD"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "pw", "key": "password"}
    paths = {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/startup", "livenessProbe": "/liveness",
                     "readinessProbe": "/readiness"}
    assert pod_spec(one(objects, "Deployment"))["terminationGracePeriodSeconds"] >= 35


@pytest.mark.parametrize("gateway", [
    {"upstream": "c.redis.cache.windows.net"},
    {"upstream": "c.redis.cache.windows.net", "listenPassword": {"existingSecret": ""}},
])
def test_gateway_without_listen_password_fails_schema(gateway):
    with pytest.raises(helm.HelmValuesError, match=r"listenPassword"):
        render({"mode": "gateway", "gateway": gateway})


def test_gateway_without_listen_password_fails_in_the_template_too(tmp_path):
    """Without the schema (e.g. a tool that skips it), the template's `required` still stops
    the render, with a message that says what to do."""
    copy = tmp_path / "redis-entra-proxy"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with pytest.raises(helm.HelmError, match=r"gateway\.listenPassword\.existingSecret is required"):
        render({"mode": "gateway", "gateway": {"upstream": "c.redis.cache.windows.net"}}, chart=copy)
    with pytest.raises(helm.HelmError, match=r"gateway\.upstream is required"):
        render({"mode": "gateway", "gateway": {"listenPassword": {"existingSecret": "pw"}}},
               chart=copy)
    with pytest.raises(helm.HelmError, match=r"accessKey\.existingSecret is empty"):
        render({"mode": "gateway", "gateway": {"upstream": "c", "auth": "access-key",
                                               "listenPassword": {"existingSecret": "pw"}}},
               chart=copy)


def test_gateway_network_policy():
    objects = render(GATEWAY)
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == \
        one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    redis, metrics = policy["ingress"]
    assert redis["ports"] == [{"port": "redis", "protocol": "TCP"}]
    assert redis["from"] == [{"podSelector": {"matchLabels": {"redis-entra-proxy.io/client": "true"}}}]
    assert metrics["ports"] == [{"port": "proxy-admin", "protocol": "TCP"}]
    # Helm merges maps with the defaults: the default label is replaced by setting it to null.
    objects = render({**GATEWAY, "gateway": {**GATEWAY["gateway"], "networkPolicy": {
        "clientPodSelector": {"matchLabels": {"team": "a", "redis-entra-proxy.io/client": None}},
        "clientNamespaceSelector": {}}}})
    redis = one(objects, "NetworkPolicy")["spec"]["ingress"][0]
    assert redis["from"] == [{"podSelector": {"matchLabels": {"team": "a"}}, "namespaceSelector": {}}]


def test_gateway_workload_identity():
    objects = render(GATEWAY)
    assert "azure.workload.identity/use" not in pod_metadata(one(objects, "Deployment"))["labels"]
    assert not one(objects, "ServiceAccount")["metadata"].get("annotations")
    client_id = "11111111-2222-3333-4444-555555555555"
    objects = render({**GATEWAY, "gateway": {**GATEWAY["gateway"],
                                             "workloadIdentity": {"clientId": client_id}}})
    assert pod_metadata(one(objects, "Deployment"))["labels"]["azure.workload.identity/use"] == "true"
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"] == client_id
    assert pod_spec(one(objects, "Deployment"))["serviceAccountName"] == sa["metadata"]["name"]


def test_gateway_access_key_file():
    objects = render({**GATEWAY, "gateway": {**GATEWAY["gateway"], "auth": "access-key",
                                             "accessKey": {"existingSecret": "k", "key": "primary"}}})
    c = gateway_container(objects)
    assert arg(c, "--auth") == "access-key"
    path = arg(c, "--access-key-file")
    [mount] = c["volumeMounts"]
    assert path == f"{mount['mountPath']}/access-key"
    assert "subPath" not in mount  # subPath mounts never see a rotated Secret
    [volume] = pod_spec(one(objects, "Deployment"))["volumes"]
    assert volume["secret"]["secretName"] == "k"
    assert volume["secret"]["items"] == [{"key": "primary", "path": "access-key"}]
    assert unreadable_files(pod_spec(one(objects, "Deployment")), c) == []


@pytest.mark.parametrize("memory, expected", [
    # The same figures as the injector's (src/injector/sidecar.rs, max_connections_for):
    # (limit - 16 MiB) / 2 MiB, at least 1.
    ("128Mi", "56"), ("256Mi", "120"), ("1Gi", "504"), ("500M", "230"), ("1.5Gi", "760"),
    ("16Mi", "1"),
])
def test_gateway_max_connections_follow_the_memory_limit(memory, expected):
    objects = render({**GATEWAY, "gateway": {**GATEWAY["gateway"],
                                             "resources": {"limits": {"memory": memory}}}})
    assert arg(gateway_container(objects), "--max-connections") == expected


def test_gateway_max_connections_default_and_overrides():
    assert arg(gateway_container(render(GATEWAY)), "--max-connections") == "120"  # 256Mi
    explicit = {**GATEWAY, "gateway": {**GATEWAY["gateway"], "maxConnections": 77}}
    assert arg(gateway_container(render(explicit)), "--max-connections") == "77"
    off = {**GATEWAY, "gateway": {**GATEWAY["gateway"], "maxConnections": 0}}
    assert arg(gateway_container(render(off)), "--max-connections") is None
    unlimited = {**GATEWAY, "gateway": {**GATEWAY["gateway"], "resources": {"limits": None}}}
    assert arg(gateway_container(render(unlimited)), "--max-connections") is None


def test_gateway_notes():
    assert "AUTH" in notes(GATEWAY)


# -------------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("values, where", [
    ({"mode": "foo"}, "/mode"),
    ({"injector": {"failurePolicy": "Maybe"}}, "/injector/failurePolicy"),
    ({"injector": {"replicas": "2"}}, "/injector/replicas"),
    ({"gateway": {"replicas": "three"}}, "/gateway/replicas"),
    ({"injector": {"timeoutSeconds": 60}}, "/injector/timeoutSeconds"),
    ({"injector": {"tls": {"mode": "vault"}}}, "/injector/tls/mode"),
    ({"injector": {"defaults": {"auth": "password"}}}, "/injector/defaults/auth"),
    ({"injector": {"defaults": {"logFormat": "yaml"}}}, "/injector/defaults/logFormat"),
    ({"injector": {"defaults": {"adminPort": 70000}}}, "/injector/defaults/adminPort"),
    ({"injector": {"networkPolicy": {"apiServerCIDRs": ["10.0.0.1"]}}},
     "/injector/networkPolicy/apiServerCIDRs/0"),
    ({"injector": {"networkPolicy": {"from": [{"podselector": {}}]}}},
     "/injector/networkPolicy/from/0"),
    ({"injector": {"defaults": {"adminPort": 65535}}}, "/injector/defaults/adminPort"),
    ({"injector": {"defaults": {"listen": "unix:/tmp/r.sock"}}}, "/injector/defaults/listen"),
    ({"injector": {"defaults": {"listenPasswordSecret": "Pw"}}},
     "/injector/defaults/listenPasswordSecret"),
    ({"injector": {"defaults": {"clientId": "not-a-guid"}}}, "/injector/defaults/clientId"),
    ({"injector": {"defaults": {"unknownField": 1}}}, "/injector/defaults"),
    ({"injector": {"defaults": {"resources": {"requests": {"cpu": "lots"}}}}},
     "/injector/defaults/resources/requests/cpu"),
    ({"injector": {"replica": 2}}, "/injector"),
    ({"gateway": {"port": 0}}, "/gateway/port"),
    ({"gateway": {"maxConnections": -1}}, "/gateway/maxConnections"),
    ({"injector": {"defaults": {"maxConnections": "many"}}}, "/injector/defaults/maxConnections"),
    ({"injector": {"defaults": {"multiplex": 65}}}, "/injector/defaults/multiplex"),
    ({"injector": {"defaults": {"multiplex": -1}}}, "/injector/defaults/multiplex"),
    ({"injector": {"defaults": {"multiplex": "four"}}}, "/injector/defaults/multiplex"),
    ({"gateway": {"auth": "password"}}, "/gateway/auth"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"typo": True}, "at ''"),
])
def test_bad_values_fail_schema_validation(values, where):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as excinfo:
            chart.validate_schema(values)
    assert where in str(excinfo.value), str(excinfo.value)
    with pytest.raises(helm.HelmValuesError):
        render(values)
