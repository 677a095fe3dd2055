"""Kueue integration through its Workload API (no Python client exists: plain dicts over the CRDs).

Kueue's docs: any custom workload API integrates by creating a Workload. kubeforge creates one per job
(owned by it), creates no pod until Kueue admits it, applies the assigned ResourceFlavors' node labels and
tolerations, stops the pods on eviction and gives the quota back, and marks the Workload finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .children import child_name, metadata
from .conditions import rfc3339

GROUP = "kueue.x-k8s.io"
VERSIONS = ("v1beta2", "v1beta1")  # newest first: use the first the cluster serves
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class PodSet:
    name: str
    count: int
    template: dict[str, Any]  # a PodTemplateSpec


@dataclass
class Admission:
    """What Kueue decided: per podSet, the flavor of each resource."""

    cluster_queue: str
    flavors: dict[str, dict[str, str]] = field(default_factory=dict)  # podSet -> resource -> flavor

    def flavor_names(self) -> set[str]:
        return {f for per_set in self.flavors.values() for f in per_set.values()}


def workload_name(obj: dict[str, Any]) -> str:
    return child_name(obj["metadata"]["name"], "workload")


def desired_workload(obj: dict[str, Any], version: str, queue_name: str, pod_sets: list[PodSet],
                     priority: int | None, priority_class: str | None, active: bool) -> dict[str, Any]:
    meta = metadata(obj, workload_name(obj))
    meta["labels"][QUEUE_LABEL] = queue_name
    spec: dict[str, Any] = {
        "queueName": queue_name,
        "active": active,
        "podSets": [{"name": ps.name, "count": ps.count, "template": ps.template} for ps in pod_sets],
    }
    if priority is not None:
        spec["priority"] = priority
    if priority_class:
        if version == "v1beta1":
            spec["priorityClassName"] = priority_class
            spec["priorityClassSource"] = "scheduling.k8s.io/priorityclass"
        else:
            spec["priorityClassRef"] = {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": priority_class}
    return {"apiVersion": f"{GROUP}/{version}", "kind": "Workload", "metadata": meta, "spec": spec}


def _condition(workload: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _true(workload: dict[str, Any], type_: str) -> bool:
    c = _condition(workload, type_)
    return c is not None and c.get("status") == "True"


def admission(workload: dict[str, Any] | None) -> Admission | None:
    """The admission when Kueue has admitted the Workload and not evicted it since."""
    if workload is None or not _true(workload, "Admitted") or _true(workload, "Evicted"):
        return None
    adm = (workload.get("status") or {}).get("admission")
    if not adm:
        return None
    return Admission(
        cluster_queue=adm.get("clusterQueue", ""),
        flavors={a["name"]: dict(a.get("flavors") or {}) for a in adm.get("podSetAssignments") or []},
    )


def eviction(workload: dict[str, Any] | None) -> str | None:
    """The eviction message when Kueue evicted the Workload (preemption, deactivation, ...)."""
    if workload is None or not _true(workload, "Evicted"):
        return None
    c = _condition(workload, "Evicted") or {}
    return f"{c.get('reason', 'Evicted')}: {c.get('message', '')}".strip(": ")


def holds_quota(workload: dict[str, Any] | None) -> bool:
    return workload is not None and bool((workload.get("status") or {}).get("admission"))


def is_finished(workload: dict[str, Any] | None) -> bool:
    return workload is not None and _true(workload, "Finished")


def pod_placement(adm: Admission, pod_set: str, flavors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """nodeSelector and tolerations the assigned flavors of one podSet add to its pods."""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    for flavor_name in sorted(set((adm.flavors.get(pod_set) or {}).values())):
        spec = (flavors.get(flavor_name) or {}).get("spec") or {}
        node_selector.update(spec.get("nodeLabels") or {})
        for tol in spec.get("tolerations") or []:
            if tol not in tolerations:
                tolerations.append(tol)
    return {"nodeSelector": node_selector, "tolerations": tolerations}


def _set_condition(conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str,
                   now: datetime, generation: int | None) -> list[dict[str, Any]]:
    out = [c for c in conditions if c.get("type") != type_]
    old = _condition({"status": {"conditions": conditions}}, type_)
    transition = old["lastTransitionTime"] if old and old.get("status") == status else rfc3339(now)
    cond = {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": transition}
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    return out


def release_quota_patch(workload: dict[str, Any], message: str, now: datetime) -> dict[str, Any]:
    """After an eviction the integration stops the pods, then gives the quota back (as Kueue's jobframework does):
    admission cleared, QuotaReserved/Admitted false, so Kueue can admit the Workload again later."""
    gen = workload["metadata"].get("generation")
    conds = list((workload.get("status") or {}).get("conditions") or [])
    conds = _set_condition(conds, "QuotaReserved", "False", "Pending", message, now, gen)
    conds = _set_condition(conds, "Admitted", "False", "NoReservation", "The workload has no reservation", now, gen)
    conds = _set_condition(conds, "Requeued", "True", "Evicted", message, now, gen)
    return {"status": {"admission": None, "conditions": conds}}


def finished_patch(workload: dict[str, Any], succeeded: bool, message: str, now: datetime) -> dict[str, Any]:
    gen = workload["metadata"].get("generation")
    conds = list((workload.get("status") or {}).get("conditions") or [])
    reason = "Succeeded" if succeeded else "Failed"
    return {"status": {"conditions": _set_condition(conds, "Finished", "True", reason, message, now, gen)}}
