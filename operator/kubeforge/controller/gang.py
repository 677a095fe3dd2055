"""Gang scheduling: a training job's pods start together or not at all.

Three backends: Kueue (a Workload gates pod creation, see kueue.py), Volcano / scheduler-plugins
coscheduling (a PodGroup with minMember = all pods), and, with no gang scheduler installed, the operator's
own all-or-nothing rule: a gang not wholly running within scheduleTimeoutSeconds is deleted and retried.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from kubeforge.api.common import SchedulingSpec

from .children import child_name, metadata

Backend = Literal["kueue", "volcano", "coscheduling", "builtin"]

VOLCANO_SCHEDULER = "volcano"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHEDULING_SCHEDULER = "scheduler-plugins-scheduler"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"


def backend(scheduling: SchedulingSpec, queue_name: str | None = None) -> Backend:
    """`queue_name`: the LocalQueue resolved from spec, label or namespace default (kueue.queue_name_for)."""
    if scheduling.gang is not None:
        return scheduling.gang
    return "kueue" if (queue_name or scheduling.queue_name) else "builtin"


def pod_group(obj: dict[str, Any], backend_: Backend, min_member: int, scheduling: SchedulingSpec,
              min_resources: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The PodGroup the pods point at (Volcano or coscheduling); None for the other backends."""
    name = child_name(obj["metadata"]["name"], "gang")
    if backend_ == "volcano":
        spec: dict[str, Any] = {"minMember": min_member}
        if min_resources:
            spec["minResources"] = min_resources
        if scheduling.queue_name:
            spec["queue"] = scheduling.queue_name
        return {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup",
                "metadata": metadata(obj, name), "spec": spec}
    if backend_ == "coscheduling":
        spec = {"minMember": min_member, "scheduleTimeoutSeconds": scheduling.schedule_timeout_seconds}
        if min_resources:
            spec["minResources"] = min_resources
        return {"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup",
                "metadata": metadata(obj, name), "spec": spec}
    return None


def pod_fields(obj: dict[str, Any], backend_: Backend) -> tuple[dict[str, str], dict[str, str], str | None]:
    """(labels, annotations, schedulerName) a gang member pod needs for its backend."""
    group = child_name(obj["metadata"]["name"], "gang")
    if backend_ == "volcano":
        return {}, {VOLCANO_GROUP_ANNOTATION: group}, VOLCANO_SCHEDULER
    if backend_ == "coscheduling":
        return {COSCHEDULING_GROUP_LABEL: group}, {}, COSCHEDULING_SCHEDULER
    return {}, {}, None


def sum_requests(per_pod: dict[str, str], count: int) -> dict[str, str]:
    """minResources of a PodGroup: what the whole gang needs (integers only; others are left out)."""
    out = {}
    for key, value in per_pod.items():
        if value.isdigit():
            out[key] = str(int(value) * count)
    return out


def builtin_timed_out(all_running: bool, gang_created_at: datetime | None, timeout_seconds: int,
                      now: datetime) -> bool:
    """The operator's own all-or-nothing rule: the whole gang runs within the timeout, or it goes."""
    if all_running or gang_created_at is None:
        return False
    return now - gang_created_at > timedelta(seconds=timeout_seconds)
