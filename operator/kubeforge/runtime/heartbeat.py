"""Liveness of a user's script, for jobs whose script reports no progress (spec.entrypoint without the sdk).

Rank 0's launcher samples the CPU time of its worker processes every KUBEFORGE_HEARTBEAT_SECONDS and, when it
moved, sets contract.HEARTBEAT_ANNOTATION on its own pod to the current time. The operator's progress
deadline then measures from the last beat. A process blocked in a collective or deadlocked uses no CPU and
stops beating; a hang that spins (some NCCL waits do) keeps beating and is not detected: report progress
with kubeforge.runtime.sdk for that.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .. import contract
from .report import now_rfc3339

log = logging.getLogger(__name__)


def descendants_cpu_seconds(root: int, proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds of the live descendants of `root` (Linux /proc)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        parents[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def annotate_own_pod(env: dict[str, str] | None = None) -> Callable[[str], None] | None:
    """A function that sets the heartbeat annotation on this pod, or None outside a cluster."""
    env = dict(os.environ) if env is None else env
    name, ns = env.get(contract.ENV_POD_NAME), env.get(contract.ENV_POD_NAMESPACE)
    if not (name and ns and env.get("KUBERNETES_SERVICE_HOST")):
        return None
    from kubernetes import client, config

    config.load_incluster_config()
    api = client.CoreV1Api()

    def send(time: str) -> None:
        body = {"metadata": {"annotations": {contract.HEARTBEAT_ANNOTATION: time}}}
        api.patch_namespaced_pod(name, ns, body, _request_timeout=10)

    return send


class Heartbeat:
    """Beats while the workers under `root` use CPU."""

    def __init__(self, send: Callable[[str], None], interval: float, root: int | None = None,
                 cpu_seconds: Callable[[int], float] = descendants_cpu_seconds) -> None:
        self.send, self.interval = send, interval
        self.root = os.getpid() if root is None else root
        self.cpu_seconds = cpu_seconds
        self.last_cpu = -1.0
        self._stop = threading.Event()

    def beat_once(self) -> bool:
        used = self.cpu_seconds(self.root)
        if used <= self.last_cpu:
            return False
        self.last_cpu = used
        try:
            self.send(now_rfc3339())
        except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next interval
            log.warning("heartbeat not sent: %s", exc)
            return False
        return True

    def start(self) -> None:
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat_once()

    def stop(self) -> None:
        self._stop.set()
