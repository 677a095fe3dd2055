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
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"  # names a WorkloadPriorityClass, as on Kueue's own jobs
DEFAULT_LOCAL_QUEUE = "default"  # Kueue's LocalQueue defaulting: jobs without a queue go to this one if it exists


def queue_name_for(obj: dict[str, Any], queue_name: str | None, gang: str | None,
                   default_queue_exists: bool) -> str | None:
    """The LocalQueue a job goes to: spec.scheduling.queueName, else the `kueue.x-k8s.io/queue-name` label,
    else the namespace's LocalQueue `default` when it has one (and no other gang backend was chosen)."""
    if queue_name:
        return queue_name
    label = (obj["metadata"].get("labels") or {}).get(QUEUE_LABEL)
    if label:
        return label
    if gang in (None, "kueue") and default_queue_exists:
        return DEFAULT_LOCAL_QUEUE
    return None


@dataclass(frozen=True)
class WorkloadPriority:
    """The Workload's priority: a value, and the class it came from (Kueue's CEL rule wants both together)."""

    value: int | None
    kind: str | None = None  # "WorkloadPriorityClass" or "PriorityClass"
    name: str | None = None


def priority_class_ref(p: WorkloadPriority) -> dict[str, str] | None:
    if not p.kind or not p.name:
        return None
    group = GROUP if p.kind == "WorkloadPriorityClass" else "scheduling.k8s.io"
    return {"group": group, "kind": p.kind, "name": p.name}


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
                     priority: WorkloadPriority | None, active: bool) -> dict[str, Any]:
    meta = metadata(obj, workload_name(obj))
    meta["labels"][QUEUE_LABEL] = queue_name
    spec: dict[str, Any] = {
        "queueName": queue_name,
        "active": active,
        "podSets": [{"name": ps.name, "count": ps.count, "template": ps.template} for ps in pod_sets],
    }
    if priority is not None and priority.value is not None:
        spec["priority"] = priority.value
        if priority.kind and priority.name:
            if version == "v1beta1":
                spec["priorityClassName"] = priority.name
                spec["priorityClassSource"] = ("kueue.x-k8s.io/workloadpriorityclass"
                                               if priority.kind == "WorkloadPriorityClass"
                                               else "scheduling.k8s.io/priorityclass")
            else:
                spec["priorityClassRef"] = priority_class_ref(priority)
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


def pod_set_updates(workload: dict[str, Any] | None, pod_set: str) -> list[dict[str, Any]]:
    """What the admission checks ask of one podSet's pods (status.admissionChecks[].podSetUpdates)."""
    out = []
    for check in ((workload or {}).get("status") or {}).get("admissionChecks") or []:
        out += [u for u in check.get("podSetUpdates") or [] if u.get("name") == pod_set]
    return out


def pod_placement(adm: Admission, pod_set: str, flavors: dict[str, dict[str, Any]],
                  updates: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """nodeSelector and tolerations the assigned flavors of one podSet add to its pods, then the labels,
    annotations, nodeSelector and tolerations its admission checks' podSetUpdates add (as Kueue's
    jobframework applies them when it starts a job)."""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    for flavor_name in sorted(set((adm.flavors.get(pod_set) or {}).values())):
        spec = (flavors.get(flavor_name) or {}).get("spec") or {}
        node_selector.update(spec.get("nodeLabels") or {})
        for tol in spec.get("tolerations") or []:
            if tol not in tolerations:
                tolerations.append(tol)
    for u in updates or []:
        node_selector.update(u.get("nodeSelector") or {})
        labels.update(u.get("labels") or {})
        annotations.update(u.get("annotations") or {})
        for tol in u.get("tolerations") or []:
            if tol not in tolerations:
                tolerations.append(tol)
    out: dict[str, Any] = {"nodeSelector": node_selector, "tolerations": tolerations}
    if labels:
        out["labels"] = labels
    if annotations:
        out["annotations"] = annotations
    return out


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


def _guarded(workload: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """A status merge patch that replaces the conditions list only if nobody wrote the Workload since it was
    read: the resourceVersion makes a stale patch fail with 409 (retried on the next reconcile) instead of
    dropping the conditions Kueue set in between."""
    return {"metadata": {"resourceVersion": workload["metadata"]["resourceVersion"]}, "status": status}


def release_quota_patch(workload: dict[str, Any], message: str, now: datetime) -> dict[str, Any]:
    """After an eviction the integration stops the pods, then gives the quota back (as Kueue's jobframework does):
    admission cleared, QuotaReserved/Admitted false, so Kueue can admit the Workload again later."""
    gen = workload["metadata"].get("generation")
    conds = list((workload.get("status") or {}).get("conditions") or [])
    conds = _set_condition(conds, "QuotaReserved", "False", "Pending", message, now, gen)
    conds = _set_condition(conds, "Admitted", "False", "NoReservation", "The workload has no reservation", now, gen)
    conds = _set_condition(conds, "Requeued", "True", "Evicted", message, now, gen)
    if _condition(workload, "PodsReady") is not None:
        conds = _set_condition(conds, "PodsReady", "False", "PodsReady", "The workload has no reservation",
                               now, gen)
    return _guarded(workload, {"admission": None, "conditions": conds})


def finished_patch(workload: dict[str, Any], succeeded: bool, message: str, now: datetime) -> dict[str, Any]:
    gen = workload["metadata"].get("generation")
    conds = list((workload.get("status") or {}).get("conditions") or [])
    reason = "Succeeded" if succeeded else "Failed"
    return _guarded(workload, {"conditions": _set_condition(conds, "Finished", "True", reason, message, now, gen)})


def pods_ready_patch(workload: dict[str, Any], ready: bool, recovering: bool, now: datetime) -> dict[str, Any] | None:
    """The PodsReady condition Kueue's waitForPodsReady waits for (None when it already says so): True once
    every pod of the admitted gang is ready; False while they start (WaitForStart) or after a pod failed
    (WaitForRecovery)."""
    cur = _condition(workload, "PodsReady")
    if ready:
        status, reason, message = "True", "PodsReady", "All pods reached readiness and the workload is running"
    elif recovering:
        status, reason, message = "False", "WaitForRecovery", "At least one pod has failed, waiting for recovery"
    else:
        status, reason, message = "False", "WaitForStart", "Not all pods are ready or succeeded"
    if cur is not None and cur.get("status") == status and cur.get("reason") == reason:
        return None
    gen = workload["metadata"].get("generation")
    conds = list((workload.get("status") or {}).get("conditions") or [])
    return _guarded(workload, {"conditions": _set_condition(conds, "PodsReady", status, reason, message, now, gen)})
