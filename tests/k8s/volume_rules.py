"""An explicit model of the Kubernetes rules that decide whether a container's process can read a
file of a Secret, ConfigMap or projected volume, so that tests can check, on rendered and
injected pods (no cluster here), that the proxy can read every file it is told to read.

What the model encodes (kubelet and container runtime, Linux):

* The process: uid = the container's securityContext.runAsUser, else the pod's, else the image's
  USER; primary gid = the container's runAsGroup, else the pod's, else the image user's group;
  supplementary groups = the primary gid, the pod's supplementalGroups and the pod's fsGroup
  (supplementalGroups and fsGroup exist only at pod level and apply to every container). Groups
  that the image's /etc/group would add are ignored (none for the distroless nonroot user).
* A file of a Secret / ConfigMap volume: owner uid 0; mode = the item's `mode`, else the
  volume's `defaultMode`, else 0644; group 0, unless the pod sets fsGroup: then group = fsGroup
  and the kubelet ORs the read-only volume mask 0440 into the mode (SetVolumeOwnership in
  pkg/volume/volume_linux.go: these volumes are read-only, so `mode | 0440`). A projected volume
  does the same with its sources' items (service account tokens have rules of their own, which
  this model refuses to guess).
* Directories on the way (the mount point, `..data`) are searchable by everyone (0755, or 0777
  and setgid with fsGroup), so only the file's own mode matters.
* Access (no CAP_DAC_OVERRIDE: the containers drop ALL capabilities): the owner bits apply if
  the process's uid owns the file, else the group bits if any of its groups is the file's group,
  else the other bits; exactly one class applies (a matching group with no read bit denies even
  when the other bits would allow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The image's USER (Dockerfile: distroless cc-debian12:nonroot): uid and gid 65532.
IMAGE_USER = 65532
IMAGE_GROUP = 65532

# Flags whose value is a file the proxy reads.
FILE_FLAGS = ("--access-key-file", "--ca-file", "--token-ca-file")
FILE_VARIABLES = ("REDIS_PROXY_ACCESS_KEY_FILE", "REDIS_PROXY_CA_FILE")


@dataclass(frozen=True)
class Process:
    uid: int
    gid: int
    groups: frozenset[int]
    dac_override: bool


@dataclass(frozen=True)
class File:
    path: str
    uid: int
    gid: int
    mode: int


def process_of(pod_spec: dict[str, Any], container: dict[str, Any]) -> Process:
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser", IMAGE_USER))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", IMAGE_GROUP))
    groups = {gid, *pod_sc.get("supplementalGroups", [])}
    if "fsGroup" in pod_sc:
        groups.add(pod_sc["fsGroup"])
    caps = sc.get("capabilities") or {}
    dropped = set(caps.get("drop", []))
    added = set(caps.get("add", []))
    # Root keeps CAP_DAC_OVERRIDE unless it is dropped (ALL drops it); a non-root process never
    # has it unless it is added.
    dac = ("DAC_OVERRIDE" in added) or (uid == 0 and not dropped & {"ALL", "DAC_OVERRIDE"})
    return Process(uid=uid, gid=gid, groups=frozenset(groups), dac_override=dac)


def can_read(process: Process, file: File) -> bool:
    if process.dac_override:
        return True
    if process.uid == file.uid:
        bits = (file.mode >> 6) & 7
    elif file.gid in process.groups:
        bits = (file.mode >> 3) & 7
    else:
        bits = file.mode & 7
    return bool(bits & 4)


def _items_file(pod_sc: dict[str, Any], path: str, relative: str, items,
                default_mode: int) -> File | None:
    """The file at `relative` among `items` (all keys when there are no items)."""
    mode = default_mode
    if items is not None:
        item = next((i for i in items if i["path"] == relative), None)
        if item is None:
            return None
        mode = item.get("mode", default_mode)
    gid = 0
    if "fsGroup" in pod_sc:
        gid = pod_sc["fsGroup"]
        mode |= 0o440
    return File(path=path, uid=0, gid=gid, mode=mode)


def file_of(pod_spec: dict[str, Any], container: dict[str, Any], path: str) -> File:
    """The attributes of the file at `path` as the container sees it; fails (AssertionError)
    when no mount of the container holds it or the model has no rule for its volume."""
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    mount = next((m for m in mounts
                  if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    assert mount is not None, f"{container['name']}: no volume mount holds {path}"
    assert "subPath" not in mount, f"{path}: a subPath mount never sees a rotated Secret"
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    volume = next(v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"])
    pod_sc = pod_spec.get("securityContext") or {}
    for kind in ("secret", "configMap"):
        if kind in volume:
            src = volume[kind]
            found = _items_file(pod_sc, path, relative, src.get("items"),
                                src.get("defaultMode", 0o644))
            assert found is not None, f"{path}: no item {relative!r} in volume {volume['name']}"
            return found
    if "projected" in volume:
        default = volume["projected"].get("defaultMode", 0o644)
        for source in volume["projected"]["sources"]:
            kind = next(iter(source))
            assert kind in ("secret", "configMap"), \
                f"{path}: no model for projected {kind} files"
            found = _items_file(pod_sc, path, relative, source[kind].get("items"), default)
            if found is not None:
                return found
        raise AssertionError(f"{path}: not in projected volume {volume['name']}")
    raise AssertionError(f"{path}: no model for volume {volume['name']}: {sorted(volume)}")


def files_read_by(container: dict[str, Any]) -> list[str]:
    """The files the proxy container is told to read: flag values in its args, and variables."""
    args = container.get("args", [])
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a in FILE_FLAGS]
    paths += [e["value"] for e in container.get("env", [])
              if e["name"] in FILE_VARIABLES and "value" in e]
    return paths


def unreadable_files(pod_spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """Every file the container must read but can't, with why (empty when all is well)."""
    process = process_of(pod_spec, container)
    problems = []
    for path in files_read_by(container):
        file = file_of(pod_spec, container, path)
        if not can_read(process, file):
            problems.append(f"{path}: mode {file.mode:04o} owner {file.uid} group {file.gid}, "
                            f"process uid {process.uid} groups {sorted(process.groups)}")
    return problems
