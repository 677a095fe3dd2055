"""What every workload pod gets so that it runs in a Pod Security "restricted" namespace, pulls from a
private registry and writes nowhere on the image's root filesystem.

- securityContext: non-root as the images' user (UID/GID 10001), no privilege escalation, every capability
  dropped, the runtime's default seccomp profile: the "restricted" level of Pod Security admission.
- imagePullSecrets: the operator's setting (the chart's `workloads.imagePullSecrets`), because the per-job
  ServiceAccounts the operator creates carry none.
- a `scratch` emptyDir for the runtime's working files (KUBEFORGE_WORKDIR) and Hugging Face caches, so the
  root filesystem stays untouched; it counts against the pod's ephemeral storage, which
  `requests["ephemeral-storage"]` in a spec reserves.
"""

from __future__ import annotations

from typing import Any

RUN_AS = 10001  # the user of every image under images/
SCRATCH_VOLUME, SCRATCH_DIR = "scratch", "/scratch"


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_env() -> list[dict[str, Any]]:
    return [
        {"name": "KUBEFORGE_WORKDIR", "value": f"{SCRATCH_DIR}/kubeforge"},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/huggingface"},
    ]


def harden(pod_spec: dict[str, Any], image_pull_secrets: list[str]) -> dict[str, Any]:
    """The pod spec, in place, with security contexts, pull secrets and the scratch volume on every
    container (init containers too)."""
    pod_spec["securityContext"] = {**pod_security_context(), **pod_spec.get("securityContext", {})}
    if image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in image_pull_secrets]
    pod_spec["volumes"] = [*pod_spec.get("volumes", []), {"name": SCRATCH_VOLUME, "emptyDir": {}}]
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        c["securityContext"] = container_security_context()
        c["volumeMounts"] = [*c.get("volumeMounts", []), {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR}]
        have = {e["name"] for e in c.get("env", [])}
        c["env"] = [*c.get("env", []), *(e for e in scratch_env() if e["name"] not in have)]
    return pod_spec
