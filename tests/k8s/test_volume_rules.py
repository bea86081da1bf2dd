"""The model of Kubernetes' volume file rules (volume_rules.py) on cases whose outcome is known,
so that the properties checked with it on the golden pods, deploy/ and the chart mean something."""

from __future__ import annotations

import pytest

from volume_rules import can_read, file_of, process_of, unreadable_files

SIDECAR_SC = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
              "capabilities": {"drop": ["ALL"]}}
KEY = "/var/run/secrets/redis-entra-proxy/access-key"


def pod(mode, pod_sc=None, sc=SIDECAR_SC, item_mode=None):
    item = {"key": "k", "path": "access-key"}
    if item_mode is not None:
        item["mode"] = item_mode
    volume = {"name": "key", "secret": {"secretName": "s", "items": [item]}}
    if mode is not None:
        volume["secret"]["defaultMode"] = mode
    container = {"name": "redis-entra-proxy", "securityContext": sc,
                 "args": ["--access-key-file", KEY],
                 "volumeMounts": [{"name": "key", "mountPath": "/var/run/secrets/redis-entra-proxy",
                                   "readOnly": True}]}
    return {"securityContext": pod_sc or {}, "volumes": [volume]}, container


@pytest.mark.parametrize("mode, pod_sc, sc, readable", [
    # The bug of issue 13: 0440 without fsGroup is root:root, and 65532 is neither.
    (0o440, {}, SIDECAR_SC, False),
    # With any fsGroup the file is group fsGroup (mode | 0440) and every container is in it.
    (0o440, {"fsGroup": 2000}, SIDECAR_SC, True),
    (0o400, {"fsGroup": 2000}, SIDECAR_SC, True),
    # Readable by all.
    (0o444, {}, SIDECAR_SC, True),
    (None, {}, SIDECAR_SC, True),  # defaultMode 0644
    # A matching group class without the read bit denies, even if "other" could read.
    (0o404, {"supplementalGroups": [0]}, SIDECAR_SC, False),
    (0o404, {}, SIDECAR_SC, True),
    # Pod-level user and group apply where the container sets none.
    (0o440, {"runAsUser": 0, "runAsGroup": 0}, {"capabilities": {"drop": ["ALL"]}}, True),
    (0o400, {"runAsUser": 1000}, {"capabilities": {"drop": ["ALL"]}}, False),
    # Root with its capabilities reads anything; with them dropped, only what modes allow.
    (0o000, {"runAsUser": 0}, {}, True),
    (0o000, {"runAsUser": 0}, {"capabilities": {"drop": ["ALL"]}}, False),
    (0o400, {"runAsUser": 0}, {"capabilities": {"drop": ["ALL"]}}, True),
])
def test_known_outcomes(mode, pod_sc, sc, readable):
    spec, container = pod(mode, pod_sc, sc)
    file = file_of(spec, container, KEY)
    assert can_read(process_of(spec, container), file) is readable, (file, pod_sc, sc)
    assert (unreadable_files(spec, container) == []) is readable


def test_item_mode_wins_over_default_mode():
    spec, container = pod(0o400, item_mode=0o444)
    assert unreadable_files(spec, container) == []


def test_container_group_overrides_the_pods():
    spec, container = pod(0o440, {"runAsGroup": 0}, SIDECAR_SC)
    assert process_of(spec, container).gid == 65532
    assert unreadable_files(spec, container)


def test_files_outside_any_mount_or_volume_model_fail():
    spec, container = pod(0o444)
    container["args"] = ["--access-key-file", "/etc/other/key"]
    with pytest.raises(AssertionError, match="no volume mount"):
        unreadable_files(spec, container)
    spec["volumes"][0] = {"name": "key", "projected": {"sources": [
        {"serviceAccountToken": {"path": "access-key"}}]}}
    container["args"] = ["--access-key-file", KEY]
    with pytest.raises(AssertionError, match="no model"):
        unreadable_files(spec, container)
