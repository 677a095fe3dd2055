"""The operator's only door to the API server: plain dicts in and out.

Planners never import this; the reconciler hands them what it read and applies what they return. Tests of
planners build dicts; tests of the reconciler run it against a real API server.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeforge import GROUP, VERSION

from . import metrics
from .echoes import Echoes

log = logging.getLogger(__name__)

FIELD_MANAGER = "kubeforge"
DEFAULT_TIMEOUT = (10.0, 60.0)  # connect, read
SERVED_TTL_S, UNSERVED_TTL_S = 600.0, 30.0  # how long Kube.serves remembers a yes, a no


@dataclass(frozen=True)
class Resource:
    group: str  # "" for core
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


# kind -> resource, for what kubeforge creates
RESOURCES: dict[str, Resource] = {
    "Pod": Resource("", "v1", "pods"),
    "Service": Resource("", "v1", "services"),
    "ConfigMap": Resource("", "v1", "configmaps"),
    "ServiceAccount": Resource("", "v1", "serviceaccounts"),
    "Event": Resource("", "v1", "events"),
    "Role": Resource("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": Resource("rbac.authorization.k8s.io", "v1", "rolebindings"),
    "Deployment": Resource("apps", "v1", "deployments"),
    "Secret": Resource("", "v1", "secrets"),  # created only (an InferenceDeployment's token), never read
    "NetworkPolicy": Resource("networking.k8s.io", "v1", "networkpolicies"),
    # policy/v1 from Kubernetes 1.21; older servers (the v1.20 dev cluster) serve only policy/v1beta1
    "PodDisruptionBudget": Resource("policy", "v1", "poddisruptionbudgets"),
    "PodGroup.volcano": Resource("scheduling.volcano.sh", "v1beta1", "podgroups"),
    "PodGroup.coscheduling": Resource("scheduling.x-k8s.io", "v1alpha1", "podgroups"),
    "PretrainJob": Resource(GROUP, VERSION, "pretrainjobs"),
    "ContextExtensionJob": Resource(GROUP, VERSION, "contextextensionjobs"),
    "RLJob": Resource(GROUP, VERSION, "rljobs"),
    "InferenceDeployment": Resource(GROUP, VERSION, "inferencedeployments"),
    "ResourceFlavor": Resource("kueue.x-k8s.io", "v1beta2", "resourceflavors", namespaced=False),
}


def resource_for(manifest: dict[str, Any]) -> Resource:
    kind, api_version = manifest["kind"], manifest["apiVersion"]
    if kind == "PodGroup":
        return RESOURCES["PodGroup.volcano" if api_version.startswith("scheduling.volcano.sh") else "PodGroup.coscheduling"]
    if kind in ("Workload", "PodDisruptionBudget"):  # the version the cluster serves, as rendered
        group, version = api_version.split("/")
        return Resource(group, version, "workloads" if kind == "Workload" else "poddisruptionbudgets")
    return RESOURCES[kind]


def resource_of_path(path: str) -> str:
    """`pods`, `pretrainjobs/status`, ... of an API path (the metric label; names and namespaces dropped)."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    parts = parts[2:] if parts[:1] == ["api"] else parts[3:]  # drop api/v1 or apis/<group>/<version>
    if parts[:1] == ["namespaces"] and len(parts) > 2:
        parts = parts[2:]
    if not parts:
        return "discovery"
    return parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")


class Kube:
    """Thin JSON client over the kubernetes ApiClient (configuration, auth and TLS come from it)."""

    def __init__(self, api_client: client.ApiClient | None = None,
                 timeout: tuple[float, float] = DEFAULT_TIMEOUT, echoes: Echoes | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.timeout = timeout  # (connect, read) seconds: a stuck server fails the call, never the operator
        self.echoes = echoes if echoes is not None else Echoes()  # versions our writes produced (echoes.py)
        self._served: dict[tuple[str, str, str], tuple[bool, float]] = {}

    # --- raw -------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None, query: list[tuple[str, Any]] | None = None,
              content_type: str = "application/json", verb: str | None = None) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        code = "error"
        try:
            resp = self.api_client.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                _request_timeout=self.timeout,
            )
            code = str(resp.status)
        except ApiException as e:
            code = str(e.status)
            raise
        finally:
            metrics.API_REQUESTS.labels(verb or method.lower(), resource_of_path(path), code).inc()
        data = resp.data
        return json.loads(data) if data else None

    def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", res.path(namespace, name), verb="get")
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, res: Resource, namespace: str | None, selector: str | None = None) -> list[dict[str, Any]]:
        query = [("labelSelector", selector)] if selector else []
        return list(self._call("GET", res.path(namespace), query=query, verb="list").get("items", []))

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create; False when it already exists (deterministic names make this the idempotence check)."""
        res = resource_for(manifest)
        ns = manifest["metadata"].get("namespace")
        try:
            self.echoes.expect(res.plural, self._call("POST", res.path(ns), body=manifest,
                                                      query=[("fieldManager", FIELD_MANAGER)]))
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def delete(self, res: Resource, namespace: str | None, name: str, grace_seconds: int | None = None,
               uid: str | None = None) -> bool:
        """Delete by name; with `uid`, only that very object (a precondition: an object of the same name
        created since is left alone). False when there was nothing (of that uid) to delete."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self.echoes.expect(res.plural, self._call("DELETE", res.path(namespace, name), body=body))
            return True
        except ApiException as e:
            if e.status == 404 or (e.status == 409 and uid is not None):  # 409: the uid precondition failed
                return False
            raise

    def merge_patch(self, res: Resource, namespace: str | None, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any] | None:
        try:
            out = self._call("PATCH", res.path(namespace, name, subresource), body=patch,
                             content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        self.echoes.expect(res.plural, out)
        return out  # type: ignore[no-any-return]

    def served(self, group: str, version: str) -> bool:
        """Whether the cluster's discovery lists group/version (built-in APIs such as policy/v1; for a CRD's
        version, which discovery may list late, use `serves`)."""
        return self._answer((group, version, ""), lambda: self._call("GET", f"/apis/{group}/{version}"))

    def serves(self, res: Resource, namespace: str | None) -> bool:
        """Whether the API server serves `res` at its version (Kueue may serve v1beta1, v1beta2 or both).

        Asked with a LIST of at most one object, which the API server answers from the CRD itself (404 when
        the version is not served), not with the group-version discovery document: that one is rebuilt
        asynchronously after a CRD is installed or changed, and can lack a version for a while that is
        already served."""
        return self._answer((res.group, res.version, res.plural),
                            lambda: self._call("GET", res.path(namespace), query=[("limit", 1)], verb="list"))

    def _answer(self, key: tuple[str, str, str], probe: Any) -> bool:
        """`probe()` succeeding (True) or answering 404 (False), remembered: a yes for SERVED_TTL_S, a no only
        for UNSERVED_TTL_S (Kueue installed after the operator, or upgraded, is found without a restart)."""
        now = time.monotonic()
        known = self._served.get(key)
        if known is not None and known[1] > now:
            return known[0]
        try:
            probe()
            ok = True
        except ApiException as e:
            if e.status != 404:
                raise
            ok = False
        self._served[key] = (ok, now + (SERVED_TTL_S if ok else UNSERVED_TTL_S))
        return ok

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta.get("uid"),
            },
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": "kubeforge"}, "reportingComponent": "kubeforge",
        }
        try:
            self._call("POST", RESOURCES["Event"].path(meta["namespace"]), body=event)
        except ApiException as e:  # an event is worth a log line, never a failed reconcile
            log.warning("could not post event %s on %s: %s", reason, meta["name"], e.reason)
