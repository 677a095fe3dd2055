"""How the router learns the endpoints of its prefill and decode pools, as pods come and go.

One small interface, `Discovery.snapshot() -> {pool: [base URL, ...]}`, with three implementations:
  StaticDiscovery      URLs given on the command line;
  FileDiscovery        a JSON file `{"prefill": [...], "decode": [...]}` re-read when it changes (tests, or
                       a ConfigMap mounted by anything that knows the endpoints);
  KubernetesDiscovery  watches Pods by label selector in a namespace (in-cluster config) and keeps the Ready
                       ones, as `http://<status.podIP>:<port>`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger("kubeforge.serve.discovery")

Pools = dict[str, list[str]]


def _norm(url: str) -> str:
    url = url.strip().rstrip("/")
    url = url.removesuffix("/v1")
    if "://" not in url:
        url = "http://" + url
    return url


class Discovery:
    """Base: a thread-safe snapshot of the pools."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: Pools = {}

    def snapshot(self) -> Pools:
        with self._lock:
            return {k: list(v) for k, v in self._pools.items()}

    def _set(self, pools: Mapping[str, Sequence[str]]) -> None:
        new = {k: sorted({_norm(u) for u in v}) for k, v in pools.items()}
        with self._lock:
            changed = new != self._pools
            self._pools = new
        if changed:
            log.info("endpoints: %s", new)

    def start(self) -> None:
        """Begin watching (no-op for static)."""

    def stop(self) -> None:
        """Stop watching."""


class StaticDiscovery(Discovery):
    def __init__(self, pools: Mapping[str, Sequence[str]]):
        super().__init__()
        self._set({k: v for k, v in pools.items() if v})


class FileDiscovery(Discovery):
    """Re-reads a JSON file when its mtime/size changes (polled every `interval` seconds)."""

    def __init__(self, path: str, interval: float = 0.25):
        super().__init__()
        self.path = path
        self.interval = interval
        self._sig: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reload()

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._sig is not None:
                self._sig = None
                self._set({})
            return
        sig = (st.st_mtime, st.st_size)
        if sig == self._sig:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # half-written file: keep the last good view, retry next poll
            log.warning("discovery file %s unreadable: %s", self.path, e)
            return
        self._sig = sig
        self._set({str(k): [str(u) for u in (v or [])] for k, v in data.items()})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.reload()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="file-discovery", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def pod_is_ready(pod) -> bool:
    """A Pod that is Running, not terminating, has an IP and a Ready=True condition."""
    md, st = pod.metadata, pod.status
    if md is None or st is None or getattr(md, "deletion_timestamp", None):
        return False
    if st.phase != "Running" or not st.pod_ip:
        return False
    for c in st.conditions or []:
        if c.type == "Ready":
            return c.status == "True"
    return False


class KubernetesDiscovery(Discovery):
    """Watches Pods per pool (label selector) in one namespace; keeps Ready pods' `podIP:port`.

    Uses the official client with in-cluster config (or KUBECONFIG outside a cluster). The RBAC needed is
    `get/list/watch` on `pods` in the namespace. A watch that ends or fails is re-listed after a backoff.
    """

    def __init__(
        self,
        namespace: str,
        selectors: Mapping[str, str],
        port: int | Mapping[str, int],
        scheme: str = "http",
        watch_timeout_s: int = 300,
        api=None,
    ):
        super().__init__()
        self.namespace = namespace
        self.selectors = {k: v for k, v in selectors.items() if v}
        self.ports = dict(port) if isinstance(port, Mapping) else {k: int(port) for k in self.selectors}
        self.scheme = scheme
        self.watch_timeout_s = watch_timeout_s
        self._pods: dict[str, dict[str, str]] = {pool: {} for pool in self.selectors}  # pool -> name -> url
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._api = api  # a kubernetes.client.CoreV1Api; None = in-cluster config (or KUBECONFIG)

    def _client(self):
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def _publish(self) -> None:
        with self._lock:
            pods = {pool: sorted(v.values()) for pool, v in self._pods.items()}
        self._set(pods)

    def _url(self, pool: str, pod) -> str:
        return f"{self.scheme}://{pod.status.pod_ip}:{self.ports[pool]}"

    def apply_event(self, pool: str, event_type: str, pod) -> None:
        """Fold one watch event into the view (public for tests)."""
        name = pod.metadata.name
        with self._lock:
            if event_type == "DELETED" or not pod_is_ready(pod):
                self._pods[pool].pop(name, None)
            else:
                self._pods[pool][name] = self._url(pool, pod)
        self._publish()

    def _watch_pool(self, pool: str) -> None:
        from kubernetes import watch

        backoff = 1.0
        while not self._stop.is_set():
            try:
                api = self._client()
                lst = api.list_namespaced_pod(self.namespace, label_selector=self.selectors[pool])
                with self._lock:
                    self._pods[pool] = {
                        p.metadata.name: self._url(pool, p) for p in lst.items if pod_is_ready(p)
                    }
                self._publish()
                w = watch.Watch()
                for ev in w.stream(
                    api.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selectors[pool],
                    resource_version=lst.metadata.resource_version,
                    timeout_seconds=self.watch_timeout_s,
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    self.apply_event(pool, ev["type"], ev["object"])
                backoff = 1.0
            except Exception as e:  # noqa: BLE001 - any failure: re-list after a backoff
                log.warning("pod watch for pool %s failed: %s; re-listing in %.0fs", pool, e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def start(self) -> None:
        for pool in self.selectors:
            t = threading.Thread(
                target=self._watch_pool, args=(pool,), name=f"k8s-discovery-{pool}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()


def wait_for(discovery: Discovery, pred, timeout: float = 5.0) -> bool:
    """Poll until pred(snapshot) is true (helper for tests and start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred(discovery.snapshot()):
            return True
        time.sleep(0.02)
    return pred(discovery.snapshot())
