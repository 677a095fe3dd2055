"""The real Kueue controller (v0.17.0, built from the Go module proxy) in the dev cluster.

Installed the way Kueue's own manifests install it (config/default of its module), with what a process on
this machine needs instead of a Deployment:
- Kueue's CRDs, with the conversion webhook its kustomization enables (workloads, clusterqueues, localqueues,
  cohorts, multikueueclusters serve v1beta1 and v1beta2, stored as v1beta2);
- its admission webhooks for Kueue's own kinds (`kueue-{validating,mutating}-webhook-configuration`). The pod,
  Deployment, StatefulSet and other framework webhooks are left out: they intercept every pod in the cluster
  and serve only integrations this dev cluster does not enable (an admin enabling the `pod` integration
  installs them, as Kueue's manifests do);
- the `kueue-webhook-service` Service without a selector, annotated with the manager's webhook address on
  127.0.0.1 (the API server refuses loopback EndpointSlice addresses): the API server dials the ClusterIP
  and the node agent proxies it there, as kube-proxy would to an endpoint;
- Kueue's internal certificate management: the manager writes the serving cert (for
  `kueue-webhook-service.kueue-system.svc`) and injects the CA into the webhook configurations and CRDs.

The manager runs with the admin kubeconfig, one replica, no leader election. Its Configuration registers the
kubeforge training kinds as external frameworks and turns on waitForPodsReady (see docs/kueue.md).
"""

from __future__ import annotations

import base64
import copy
import time
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "kueue-system"
SERVICE = "kueue-webhook-service"
SECRET = "kueue-webhook-server-cert"
EXTERNAL_FRAMEWORKS = (
    "PretrainJob.v1alpha1.kubeforge.dev",
    "ContextExtensionJob.v1alpha1.kubeforge.dev",
    "RLJob.v1alpha1.kubeforge.dev",
)
# The CRDs whose kustomization enables the conversion webhook (config/components/crd/kustomization.yaml).
CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")


def crds(module: Path) -> list[dict[str, Any]]:
    """Kueue's CRDs as its kustomization renders them: the bases plus the conversion webhook patches."""
    kust = yaml.safe_load((module / "config/components/crd/kustomization.yaml").read_text())
    out = []
    for rel in kust["resources"]:
        doc = yaml.safe_load((module / "config/components/crd" / rel).read_text())
        if doc["spec"]["names"]["plural"] in CONVERTED:
            doc["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "clientConfig": {"service": {"namespace": NAMESPACE, "name": SERVICE, "path": "/convert",
                                             "port": 443}},
                "conversionReviewVersions": ["v1"]}}
        out.append(doc)
    return out


def webhook_configurations(module: Path) -> list[dict[str, Any]]:
    """Kueue's webhook configurations (kustomize's `kueue-` name prefix and namespace applied), limited to
    the webhooks on kueue.x-k8s.io kinds."""
    out = []
    for doc in yaml.safe_load_all((module / "config/components/webhook/manifests.yaml").read_text()):
        if not doc:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"]["name"] = "kueue-" + doc["metadata"]["name"]
        hooks = []
        for h in doc.get("webhooks") or []:
            if not all(g == "kueue.x-k8s.io" for r in h.get("rules") or [] for g in r.get("apiGroups") or []):
                continue
            h["clientConfig"]["service"].update(name=SERVICE, namespace=NAMESPACE, port=443)
            hooks.append(h)
        doc["webhooks"] = hooks
        out.append(doc)
    return out


def configuration(webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path,
                  pods_ready_timeout: str = "5m") -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": True, "webhookServiceName": SERVICE, "webhookSecretName": SECRET},
        # The job reports PodsReady on its Workload once the whole gang runs; Kueue evicts and requeues a
        # Workload whose pods are not ready within the timeout.
        "waitForPodsReady": {"timeout": pods_ready_timeout, "blockAdmission": False,
                             "requeuingStrategy": {"timestamp": "Eviction", "backoffBaseSeconds": 10,
                                                   "backoffMaxSeconds": 60}},
        "integrations": {"frameworks": ["batch/job"], "externalFrameworks": list(EXTERNAL_FRAMEWORKS)},
        "clientConnection": {"qps": 50, "burst": 100},
    }


def install(api: Any, module: Path, webhook_port: int) -> None:
    """Namespace, CRDs, webhook configurations, the Service/EndpointSlice and the cert Secret (idempotent)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from .cluster import install_crd_files_docs
    from .nodeagent import HOST_BACKENDS_ANNOTATION

    core = client.CoreV1Api(api)
    _create(lambda: core.create_namespace({"metadata": {"name": NAMESPACE}}))
    install_crd_files_docs(api, crds(module), keep_ca_bundle=True)
    adm = client.AdmissionregistrationV1Api(api)
    for doc in webhook_configurations(module):
        create, read, replace = (
            (adm.create_validating_webhook_configuration, adm.read_validating_webhook_configuration,
             adm.replace_validating_webhook_configuration)
            if doc["kind"] == "ValidatingWebhookConfiguration" else
            (adm.create_mutating_webhook_configuration, adm.read_mutating_webhook_configuration,
             adm.replace_mutating_webhook_configuration))
        try:
            create(doc)
        except ApiException as e:
            if e.status != 409:
                raise
            cur = read(doc["metadata"]["name"])
            ca = {h.name: h.client_config.ca_bundle for h in cur.webhooks or []}
            for h in doc["webhooks"]:
                if ca.get(h["name"]):  # keep the CA Kueue injected
                    h["clientConfig"]["caBundle"] = base64.b64encode(ca[h["name"]]).decode() if isinstance(
                        ca[h["name"]], bytes) else ca[h["name"]]
            doc["metadata"]["resourceVersion"] = cur.metadata.resource_version
            replace(doc["metadata"]["name"], doc)
    svc = {"metadata": {"name": SERVICE, "labels": {"app.kubernetes.io/name": "kueue"},
                        "annotations": {HOST_BACKENDS_ANNOTATION: f"127.0.0.1:{webhook_port}"}},
           "spec": {"ports": [{"port": 443, "protocol": "TCP", "targetPort": 9443}]}}
    try:
        core.create_namespaced_service(NAMESPACE, svc)
    except ApiException as e:
        if e.status != 409:
            raise
        core.patch_namespaced_service(SERVICE, NAMESPACE, {"metadata": {"annotations": svc["metadata"]["annotations"]}})
    _create(lambda: core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": SECRET}}))


def mount_cert_secret(api: Any, cert_dir: Path) -> bool:
    """Write the webhook cert Secret's keys into `cert_dir` as a Secret volume would (True once they are
    there and current)."""
    from kubernetes import client

    data = client.CoreV1Api(api).read_namespaced_secret(SECRET, NAMESPACE).data or {}
    if not all(k in data for k in ("ca.crt", "tls.crt", "tls.key")):
        return False
    cert_dir.mkdir(parents=True, exist_ok=True)
    for k, v in data.items():
        raw = base64.b64decode(v)
        f = cert_dir / k
        if not f.exists() or f.read_bytes() != raw:
            tmp = f.with_suffix(".tmp")
            tmp.write_bytes(raw)
            tmp.chmod(0o600)
            tmp.replace(f)
    return True


def wait_ready(api: Any, timeout: float = 120.0) -> None:
    """Until the webhooks answer: a dry-run ResourceFlavor passes Kueue's own admission through the
    ClusterIP, so certificates, CA injection, proxy and manager are all in place."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    co = client.CustomObjectsApi(api)
    body = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
            "metadata": {"name": "kubeforge-readiness-probe"}, "spec": {}}
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            co.create_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "resourceflavors", body, dry_run="All")
            co.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta1", "default", "workloads", limit=1)
            return
        except ApiException as e:  # webhook not reachable yet, CA not injected yet, conversion not ready
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"Kueue's webhooks did not come up within {timeout:.0f}s: {last}")


def _create(fn: Any) -> None:
    from kubernetes.client.rest import ApiException

    try:
        fn()
    except ApiException as e:
        if e.status != 409:
            raise
