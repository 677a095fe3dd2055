"""Reading observed pods: phases, exit codes, termination messages, disruption, progress annotations."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from kubeforge import contract

from .conditions import parse_time

DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated", "NodeLost"})
# NoExecute taints the node lifecycle controller puts on a node whose kubelet stopped reporting (unreachable)
# or reports NotReady, and the one an administrator puts on a node that is shut down (out-of-service)
LOST_NODE_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready",
                    "node.kubernetes.io/out-of-service")


def name(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["name"])


def label(pod: dict[str, Any], key: str) -> str | None:
    return (pod["metadata"].get("labels") or {}).get(key)


def attempt(pod: dict[str, Any]) -> int:
    try:
        return int(label(pod, contract.LABEL_ATTEMPT) or -1)
    except ValueError:
        return -1


def index(pod: dict[str, Any]) -> int:
    try:
        return int(label(pod, contract.LABEL_REPLICA_INDEX) or -1)
    except ValueError:
        return -1


def phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def deleting(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def running(pod: dict[str, Any]) -> bool:
    return phase(pod) == "Running" and not deleting(pod)


def ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition (all containers ready) is True."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The terminated state of the pod's main (first) container, if it has one."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses[:1]:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term:
            return dict(term)
    return None


def exit_code(pod: dict[str, Any]) -> int | None:
    term = terminated_state(pod)
    return None if term is None else int(term.get("exitCode", -1))


def termination_message(pod: dict[str, Any]) -> str:
    term = terminated_state(pod) or {}
    return str(term.get("message") or "").strip()


def disrupted(pod: dict[str, Any]) -> str | None:
    """Why the pod was taken away by the cluster (eviction, preemption, node loss), or None."""
    status = pod.get("status") or {}
    if status.get("reason") in DISRUPTION_REASONS:
        return f"{status['reason']}: {status.get('message', '')}".strip(": ")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return f"{cond.get('reason', 'DisruptionTarget')}: {cond.get('message', '')}".strip(": ")
    return None


def progress_report(pod: dict[str, Any]) -> dict[str, Any] | None:
    raw = (pod["metadata"].get("annotations") or {}).get(contract.PROGRESS_ANNOTATION)
    if not raw:
        return None
    try:
        report = json.loads(raw)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def heartbeat(pod: dict[str, Any]) -> datetime | None:
    """When rank 0's launcher last saw its workers use CPU (contract.HEARTBEAT_ANNOTATION), if it said."""
    raw = (pod["metadata"].get("annotations") or {}).get(contract.HEARTBEAT_ANNOTATION)
    try:
        return parse_time(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def final_report(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The runtime's JSON termination message (outputUri, step, ...), if it wrote one."""
    msg = termination_message(pod)
    if not msg.startswith("{"):
        return None
    try:
        report = json.loads(msg)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def node_name(pod: dict[str, Any]) -> str | None:
    return (pod.get("spec") or {}).get("nodeName") or None


def on_suspect_node(pod: dict[str, Any]) -> bool:
    """A bound, unfinished pod that is not Ready, or is being deleted: what a pod on a dead node looks like
    (the node lifecycle controller marks its pods NotReady). Only for these does the reconciler read the Node."""
    return bool(node_name(pod)) and phase(pod) not in ("Succeeded", "Failed") and (deleting(pod) or not ready(pod))


def node_lost(node: dict[str, Any] | None) -> str | None:
    """Why the pods on this node are lost (the Node is gone, or tainted unreachable / not-ready /
    out-of-service with NoExecute), or None while it is healthy or only late."""
    if node is None:
        return "the Node object was deleted"
    for t in (node.get("spec") or {}).get("taints") or []:
        if t.get("key") in LOST_NODE_TAINTS and t.get("effect") == "NoExecute":
            since = f" since {t['timeAdded']}" if t.get("timeAdded") else ""
            return f"{t['key']}:NoExecute{since}"
    return None


def node_ready(node: dict[str, Any] | None) -> bool:
    return node is not None and any(c.get("type") == "Ready" and c.get("status") == "True"
                                    for c in (node.get("status") or {}).get("conditions") or [])


def peer_lost(pod: dict[str, Any]) -> bool:
    """The runtime said it failed because another rank went away (contract.REASON_PEER_LOST)."""
    return (final_report(pod) or {}).get("reason") == contract.REASON_PEER_LOST


def finished_at(pod: dict[str, Any]) -> datetime | None:
    raw = (terminated_state(pod) or {}).get("finishedAt")
    try:
        return parse_time(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
