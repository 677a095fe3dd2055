"""Reading observed pods: phases, exit codes, termination messages, disruption, progress annotations."""

from __future__ import annotations

import json
from typing import Any

from kubeforge import contract

DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated", "NodeLost"})


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
