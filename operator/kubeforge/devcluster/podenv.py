"""Pure helpers of the node agent: env resolution, `$(VAR)` expansion, path mapping, quantities.

Kept free of threads and I/O (beyond a lookup callable) so they are easy to unit-test.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

PYTHON_NAMES = re.compile(r"^python(3(\.\d+)?)?$")

# (kind, namespace, name) -> data dict (already decoded for secrets) or None when missing
Lookup = Callable[[str, str, str], "dict[str, str] | None"]


class ConfigError(Exception):
    """A referenced Secret/ConfigMap/key is missing (kubelet: CreateContainerConfigError)."""


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined vars are replaced, undefined stay as written, `$$` -> `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, value)


def map_path(path: str, mounts: Mapping[str, str]) -> str:
    """Rewrite `path` when it lies under a mountPath (longest prefix wins)."""
    for mp in sorted(mounts, key=len, reverse=True):
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            return mounts[mp] + path[len(mp.rstrip("/")):] if path != mp else mounts[mp]
    return path


def map_arg(arg: str, mounts: Mapping[str, str]) -> str:
    """Rewrite a command-line argument that is a mounted path, also in `--flag=/path` form."""
    if arg.startswith("/"):
        return map_path(arg, mounts)
    if arg.startswith("-") and "=/" in arg:
        flag, _, val = arg.partition("=")
        return f"{flag}={map_path(val, mounts)}"
    return arg


def resolve_argv0(argv: list[str]) -> list[str]:
    """`python`/`python3` run the agent's own interpreter, so the venv holding kubeforge is used."""
    if argv and PYTHON_NAMES.match(os.path.basename(argv[0])) and "/" not in argv[0]:
        return [sys.executable, *argv[1:]]
    if argv and argv[0].startswith("/usr/bin/python") or argv and argv[0].startswith("/usr/local/bin/python"):
        return [sys.executable, *argv[1:]]
    return argv


def _format_labels(d: Mapping[str, str] | None) -> str:
    return "\n".join(f'{k}="{v}"' for k, v in sorted((d or {}).items()))


def field_ref(pod: dict[str, Any], path: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "metadata.labels": _format_labels(meta.get("labels")),
        "metadata.annotations": _format_labels(meta.get("annotations")),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(p.get("ip", "") for p in status.get("podIPs") or []),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return "" if simple[path] is None else str(simple[path])


def resource_ref(container: dict[str, Any] | None, ref: dict[str, Any], node_alloc: Mapping[str, str]) -> str:
    """resourceFieldRef: the limit (or request) divided by the divisor, rounded up like the kubelet.

    With no limit the kubelet reports node allocatable; so do we (the dev node's advertised figures)."""
    res = ref.get("resource", "")
    kind, _, name = res.partition(".")
    resources = (container or {}).get("resources") or {}
    val = (resources.get(kind) or {}).get(name)
    if val is None and kind == "requests":
        val = "0"
    if val is None:
        val = node_alloc.get(name, "0")
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(parse_quantity(str(val)) / divisor))


def container_env(
    pod: dict[str, Any],
    container: dict[str, Any],
    lookup: Lookup,
    node_alloc: Mapping[str, str],
) -> dict[str, str]:
    """The env a container sees from its spec (envFrom first, then env, with `$(VAR)` expansion)."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix") or ""
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            ref = src.get(key)
            if not ref:
                continue
            data = lookup(kind, ns, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"{kind} {ref['name']!r} not found")
            for k, v in data.items():
                env[prefix + k] = v
    for e in container.get("env") or []:
        name = e["name"]
        if "valueFrom" not in e or e.get("valueFrom") is None:
            env[name] = expand(e.get("value") or "", env)
            continue
        vf = e["valueFrom"]
        if vf.get("fieldRef"):
            env[name] = field_ref(pod, vf["fieldRef"]["fieldPath"])
        elif vf.get("resourceFieldRef"):
            rref = vf["resourceFieldRef"]
            target = container
            if rref.get("containerName"):
                every = (pod["spec"].get("containers") or []) + (pod["spec"].get("initContainers") or [])
                target = next((c for c in every if c["name"] == rref["containerName"]), container)
            env[name] = resource_ref(target, rref, node_alloc)
        else:
            for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
                ref = vf.get(key)
                if not ref:
                    continue
                data = lookup(kind, ns, ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        break
                    what = f"{kind} {ref['name']!r}" if data is None else f"key {ref['key']!r} in {kind} {ref['name']!r}"
                    raise ConfigError(f"{what} not found")
                env[name] = data[ref["key"]]
                break
    return env
