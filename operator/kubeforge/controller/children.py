"""Builders of the plain child objects every kind uses: names, labels, owner refs, Service, RBAC, spec file."""

from __future__ import annotations

import json
from typing import Any

from kubeforge import contract
from kubeforge.api.common import PodTemplate


def child_name(job: str, role: str, index: int | None = None) -> str:
    """`<job>-<role>-<index>`: deterministic, so a retried reconcile finds what it made before."""
    return f"{job}-{role}" if index is None else f"{job}-{role}-{index}"


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: dict[str, Any], child: dict[str, Any]) -> bool:
    """Whether `obj` (this very object: its uid, not its name) controls `child`. Labels carry only the name,
    which a deleted and re-created object shares with the old one's still-terminating children."""
    uid = obj["metadata"].get("uid")
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in child.get("metadata", {}).get("ownerReferences") or [])


def job_labels(obj: dict[str, Any], role: str | None = None) -> dict[str, str]:
    labels = {
        contract.LABEL_JOB_NAME: obj["metadata"]["name"],
        contract.LABEL_JOB_KIND: obj["kind"],
        "app.kubernetes.io/managed-by": "kubeforge",
    }
    if role is not None:
        labels[contract.LABEL_ROLE] = role
    return labels


def selector_labels(obj: dict[str, Any], role: str | None = None) -> dict[str, str]:
    """The labels that select this object's children (of a role): job_labels without managed-by."""
    return {k: v for k, v in job_labels(obj, role).items() if k != "app.kubernetes.io/managed-by"}


def selector(obj: dict[str, Any], role: str | None = None) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(obj, role).items())


def own_pods_only_policy(obj: dict[str, Any], name: str, role: str | None,
                         pod_selector: dict[str, Any]) -> dict[str, Any]:
    """A NetworkPolicy: the pods `pod_selector` selects take connections (any port) only from this object's
    own pods. Policies add up (a cluster that scrapes /metrics adds one allowing the scraper); kubelet probes
    from the node are always allowed; enforced by network plugins that implement NetworkPolicy."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(obj, name, role),
        "spec": {
            "podSelector": pod_selector,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": selector_labels(obj)}}]}],
        },
    }


def metadata(obj: dict[str, Any], name: str, role: str | None = None, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": obj["metadata"]["namespace"],
        "labels": {**job_labels(obj, role), **labels},
        "ownerReferences": [owner_reference(obj)],
    }


def headless_service(obj: dict[str, Any], role: str, port: int, port_name: str) -> dict[str, Any]:
    """Gives every pod `<pod>.<job>.<ns>.svc` before it is ready: torchrun needs rank 0's name at start."""
    name = obj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(obj, name, role),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(obj, role),
            "ports": [{"name": port_name, "port": port, "targetPort": port}],
        },
    }


def spec_config_map(obj: dict[str, Any], resolved_spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The resolved job as the runtime reads it (KUBEFORGE_SPEC_FILE)."""
    meta = obj["metadata"]
    job = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
        "spec": resolved_spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(obj, name),
        "data": {contract.SPEC_FILE_NAME: json.dumps(job, indent=2, sort_keys=True)},
    }


def progress_rbac(obj: dict[str, Any], account: str, pod_names: list[str]) -> list[dict[str, Any]]:
    """A ServiceAccount that may patch the job's own pods (progress and heartbeat annotations), nothing else:
    no read, no other verb. RBAC cannot say "the caller's own pod"; the chart's ValidatingAdmissionPolicy
    (templates/workload-pod-policy.yaml) narrows it to the pod a request's token is bound to."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(obj, account)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(obj, account),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "resourceNames": sorted(pod_names),
                 "verbs": ["patch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(obj, account),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": obj["metadata"]["namespace"]}],
        },
    ]


def downward_env() -> list[dict[str, Any]]:
    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        {"name": contract.ENV_POD_NAME, **field("metadata.name")},
        {"name": contract.ENV_POD_NAMESPACE, **field("metadata.namespace")},
        {"name": contract.ENV_POD_IP, **field("status.podIP")},
    ]


def s3_env(secret_name: str | None, endpoint: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, envFrom) giving the runtime S3 credentials; the operator itself never reads them."""
    env = [{"name": "AWS_ENDPOINT_URL", "value": endpoint}] if endpoint else []
    env_from = [{"secretRef": {"name": secret_name}}] if secret_name else []
    return env, env_from


def resources_block(tpl: PodTemplate, default_gpus: int = 0) -> dict[str, Any]:
    requests = {k: str(v) for k, v in tpl.requests.items()}
    limits = {k: str(v) for k, v in tpl.limits.items()}
    gpu = "nvidia.com/gpu"
    if default_gpus and gpu not in requests and gpu not in limits:
        requests[gpu] = str(default_gpus)
    if gpu in requests and gpu not in limits:
        limits[gpu] = requests[gpu]  # extended resources need limits == requests
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def placement(tpl: PodTemplate) -> dict[str, Any]:
    """nodeSelector, tolerations and priority of a pod spec."""
    out: dict[str, Any] = {}
    if tpl.node_selector:
        out["nodeSelector"] = dict(tpl.node_selector)
    if tpl.tolerations:
        out["tolerations"] = [t.to_wire() for t in tpl.tolerations]
    if tpl.priority_class_name:
        out["priorityClassName"] = tpl.priority_class_name
    return out
