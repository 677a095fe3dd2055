"""End-to-end fixtures: the operator running against the test cluster, and a small client for jobs."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge import GROUP, VERSION
from kubeforge.controller.kube import RESOURCES, Kube, Resource
from kubeforge.devcluster.testing import ClusterHandle, Process, pod_processes

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_CONFIG = f"validate.{GROUP}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """The real operator process (with its admission webhook), restartable mid-test."""

    def __init__(self, cluster: ClusterHandle) -> None:
        self.cluster = cluster
        self.env = {
            "KUBEFORGE_WEBHOOK": "true",
            "KUBEFORGE_WEBHOOK_HOST": "127.0.0.1",
            "KUBEFORGE_WEBHOOK_LISTEN": "127.0.0.1",
            "KUBEFORGE_WEBHOOK_PORT": str(free_port()),
            "KUBEFORGE_RESYNC_SECONDS": "2",
        }
        self.process: Process | None = None

    def start(self) -> None:
        self.process = self.cluster.start_operator(env=self.env)
        kube = Kube(self.cluster.api_client())
        res = Resource("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations",
                                         namespaced=False)

        def webhook_points_here() -> bool:
            cfg = kube.get(res, None, WEBHOOK_CONFIG)
            urls = [w["clientConfig"].get("url", "") for w in (cfg or {}).get("webhooks", [])]
            return bool(urls) and all(f":{self.env['KUBEFORGE_WEBHOOK_PORT']}/" in u for u in urls)

        wait(webhook_points_here, 60, "the operator to configure its admission webhook")

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), as a crashed or evicted operator pod."""
        if self.process is not None:
            self.process.stop(0)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(10)
            self.process = None
        # a webhook pointing at a stopped operator would refuse every later create
        kube = Kube(self.cluster.api_client())
        for plural in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations"):
            res = Resource("admissionregistration.k8s.io", "v1", plural, namespaced=False)
            kube.delete(res, None, WEBHOOK_CONFIG)

    def log(self) -> str:
        return self.process.log() if self.process else ""


@pytest.fixture(scope="module")
def operator(cluster: ClusterHandle) -> Iterator[Operator]:
    op = Operator(cluster)
    op.start()
    try:
        yield op
    finally:
        op.stop()


def wait(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Jobs:
    """Create and watch kubeforge objects in one test namespace."""

    def __init__(self, cluster: ClusterHandle, namespace: str) -> None:
        self.cluster, self.ns = cluster, namespace
        self.kube = Kube(cluster.api_client())

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["metadata"]["namespace"] = self.ns
        self.kube.create(obj)
        return obj

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.kube.get(RESOURCES[kind], self.ns, name)

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return (self.get(kind, name) or {}).get("status") or {}

    def patch_spec(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        self.kube.merge_patch(RESOURCES[kind], self.ns, name, {"spec": patch})

    def wait_phase(self, kind: str, name: str, phases: set[str], timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            st = self.status(kind, name)
            return st if st.get("phase") in phases else None

        try:
            return wait(reached, timeout, f"{kind} {name} to reach {phases}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nstatus: {json.dumps(self.status(kind, name), indent=1)}") from None

    def pods(self, job: str) -> list[dict[str, Any]]:
        return self.kube.list(RESOURCES["Pod"], self.ns, f"kubeforge.dev/job-name={job}")

    def events(self, name: str) -> list[dict[str, Any]]:
        evs = self.kube.list(RESOURCES["Event"], self.ns)
        return [e for e in evs if e["involvedObject"].get("name") == name]

    def event_reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in sorted(self.events(name), key=lambda e: e.get("firstTimestamp") or "")]

    def table(self, plural: str) -> dict[str, Any]:
        """What `kubectl get <plural>` prints: the server-side Table with the CRD's printer columns."""
        api = self.cluster.api_client()
        resp = api.call_api(
            f"/apis/{GROUP}/{VERSION}/namespaces/{self.ns}/{plural}", "GET",
            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
        return json.loads(resp.data)


@pytest.fixture
def jobs(cluster: ClusterHandle, namespace: str) -> Jobs:
    return Jobs(cluster, namespace)


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())


def kill_worker(namespace: str, pod: str) -> int:
    # torchrun's worker (`-m kubeforge.runtime.pretrain`), not the launcher that would report the failure
    pids = wait(lambda: [p for p in pod_processes(namespace, pod, b"kubeforge.runtime.pretrain")
                         if p not in pod_processes(namespace, pod, b"kubeforge.runtime.launch")], 60,
                f"the training process of {pod}")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


@pytest.fixture
def dev_cluster_only(cluster: ClusterHandle) -> None:
    if cluster.dev is None:
        pytest.skip("needs the dev cluster (processes are reached on this machine)")
