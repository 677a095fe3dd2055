"""Install as a platform engineer would: the chart rendered by Helm, its manifests applied to the cluster,
the operator running as the chart's ServiceAccount with the chart's RBAC (a TokenRequest token, not
cluster-admin), the chart's webhook configuration and certificate in force, workloads in a Pod Security
"restricted" namespace; one PretrainJob and one InferenceDeployment end to end; then an upgrade (a new image
tag re-rendered and applied, the operator restarted) that loses nothing; then deleting with the operator down.

The dev cluster runs pods as local processes, so the chart's operator Deployment is the one manifest not
applied: the operator runs as a local process with the Deployment's env, and the webhook Service is backed
by that process (the dev cluster's host-backends annotation, in place of the pod the selector would find).
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubeforge import helmcheck
from kubeforge.controller.kube import RESOURCES, Kube, Resource
from kubeforge.devcluster.nodeagent import HOST_BACKENDS_ANNOTATION
from kubeforge.devcluster.testing import ClusterHandle, Process

from .conftest import REPO, Jobs, example, free_port, wait

RELEASE, NS = "kubeforge", "kubeforge-system"
CHART_CRDS = helmcheck.CHART_DIR / "crds"
SECRETS = Resource("", "v1", "secrets")
NAMESPACES = Resource("", "v1", "namespaces", namespaced=False)


def apply(cluster: ClusterHandle, docs: list[dict[str, Any]]) -> None:
    """Server-side apply, as `helm upgrade --server-side` or Argo CD/Flux would."""
    from kubernetes import dynamic

    dyn = dynamic.DynamicClient(cluster.api_client())
    for doc in docs:
        res = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        ns = doc["metadata"].get("namespace") if res.namespaced else None
        res.server_side_apply(body=doc, name=doc["metadata"]["name"], namespace=ns, field_manager="helm",
                              force_conflicts=True)


def sa_kubeconfig(cluster: ClusterHandle, sa: str, out: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (a bound token from TokenRequest)."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    token = core.create_namespaced_service_account_token(sa, NS, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))).status.token
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "dev", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "dev", "user": sa}}],
    }
    out.write_text(yaml.safe_dump(cfg))
    return out


class Release:
    """One chart release: render, apply, run the operator the way the Deployment would."""

    def __init__(self, cluster: ClusterHandle, tmp: Path) -> None:
        self.cluster, self.tmp = cluster, tmp
        self.webhook_port = free_port()
        self.docs: list[dict[str, Any]] = []
        self.process: Process | None = None

    def install(self, values: dict[str, Any]) -> None:
        self.docs = helmcheck.render(values, name=RELEASE, namespace=NS)
        apply(self.cluster, [d for d in self.docs if d["kind"] != "Deployment"])
        svc = copy.deepcopy(self.one("Service", f"{RELEASE}-webhook"))
        svc["spec"].pop("selector")  # the operator is a local process here, not a pod the selector finds
        svc["metadata"].setdefault("annotations", {})[HOST_BACKENDS_ANNOTATION] = f"127.0.0.1:{self.webhook_port}"
        kube = Kube(self.cluster.api_client())
        kube.merge_patch(RESOURCES["Service"], NS, svc["metadata"]["name"],
                         {"metadata": svc["metadata"], "spec": {"selector": None}})

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
        assert len(found) == 1, (kind, name)
        return found[0]

    def start_operator(self) -> None:
        dep = self.one("Deployment")
        container = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        # the certificate the chart made, where the Deployment mounts it
        secret = Kube(self.cluster.api_client()).get(SECRETS, NS, f"{RELEASE}-webhook-tls")
        certs = self.tmp / "webhook-tls"
        certs.mkdir(exist_ok=True)
        for key in ("tls.crt", "tls.key"):
            (certs / key).write_bytes(base64.b64decode(secret["data"][key]))
        env |= {
            "KUBECONFIG": str(sa_kubeconfig(self.cluster, dep["spec"]["template"]["spec"]["serviceAccountName"],
                                            self.tmp / "sa.kubeconfig")),
            "KUBEFORGE_WEBHOOK_LISTEN": "127.0.0.1", "KUBEFORGE_WEBHOOK_PORT": str(self.webhook_port),
            "KUBEFORGE_WEBHOOK_CERTFILE": str(certs / "tls.crt"), "KUBEFORGE_WEBHOOK_KEYFILE": str(certs / "tls.key"),
            "KUBEFORGE_LIVENESS_PORT": str(free_port()), "KUBEFORGE_METRICS_PORT": str(free_port()),
            "KUBEFORGE_RESYNC_SECONDS": "2",
        }
        self.metrics_port = int(env["KUBEFORGE_METRICS_PORT"])
        self.process = self.cluster.start_process(None, "operator-chart", env)

    def stop_operator(self) -> None:
        if self.process is not None:
            self.process.stop(10)
            self.process = None

    def log(self) -> str:
        return self.process.log() if self.process else ""




@pytest.fixture
def release(cluster: ClusterHandle, dev_cluster_only: None, tmp_path: Path):
    cluster.install_crds(CHART_CRDS)
    from kubernetes import client

    try:
        client.CoreV1Api(cluster.api_client()).create_namespace(client.V1Namespace(metadata={"name": NS}))
    except client.ApiException as e:
        if e.status != 409:
            raise
    rel = Release(cluster, tmp_path)
    yield rel
    rel.stop_operator()
    for doc in reversed(rel.docs):  # cluster-scoped leftovers would outlive the test
        if doc["kind"] in ("ValidatingWebhookConfiguration", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering",
                           "ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy"):
            from kubernetes import dynamic

            dynamic.DynamicClient(cluster.api_client()).resources.get(
                api_version=doc["apiVersion"], kind=doc["kind"]).delete(name=doc["metadata"]["name"])


def restricted(cluster: ClusterHandle, namespace: str) -> None:
    Kube(cluster.api_client()).merge_patch(
        NAMESPACES, None, namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})


def test_chart_install_trains_serves_upgrades_and_deletes_without_the_operator(
        release: Release, cluster: ClusterHandle, jobs: Jobs, namespace: str):
    cluster.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                    "data/tiny-corpus.jsonl")
    restricted(cluster, namespace)
    release.install({"image": {"tag": "0.1.0"}})
    release.start_operator()
    try:
        _run(release, cluster, jobs, namespace)
    except BaseException:
        print(release.log()[-20000:])
        raise


def _run(release: Release, cluster: ClusterHandle, jobs: Jobs, namespace: str) -> None:
    from kubernetes.client.exceptions import ApiException

    # the chart's webhook (Service clientConfig, the chart's certificate) refuses what the CRD's CEL rules
    # cannot: a change inside model.config (CEL would compare its JSON numbers by type, not value)
    held = copy.deepcopy(example("pretrain-tiny.yaml"))
    held["metadata"].update(name="held", namespace=namespace)
    held["spec"]["runPolicy"]["suspend"] = True
    held["spec"]["checkpoint"]["uri"] = f"s3://kubeforge/checkpoints/{namespace}/held"

    def created() -> bool:  # the webhook answers (Fail policy) once the operator serves it
        try:
            Kube(cluster.api_client()).create(held)
            return True
        except ApiException as e:
            if e.status < 500:
                raise
            return False

    wait(created, 60, "the chart's webhook to admit a valid job")
    attempt = iter(range(1000))

    def refused() -> str | None:
        size = 64 + 8 * (next(attempt) + 1)  # a new value each try: a change even if an earlier try got in
        try:
            Kube(cluster.api_client()).merge_patch(RESOURCES["PretrainJob"], namespace, "held",
                                                   {"spec": {"model": {"config": {"hidden_size": size}}}})
        except ApiException as e:
            return e.body if e.status in (400, 422) and "admission webhook" in (e.body or "") else None
        return None

    assert "spec.model: is immutable" in wait(refused, 60, "the chart's webhook to refuse a model change")
    # `held` stays (suspended, nothing runs): the webhook is asked again after the upgrade

    job = copy.deepcopy(example("pretrain-tiny.yaml"))
    job["spec"]["training"]["totalSteps"] = 20
    job["spec"]["checkpoint"]["uri"] = f"s3://kubeforge/checkpoints/{namespace}/pretrain-tiny"
    jobs.create(job)
    st = jobs.wait_phase("PretrainJob", "pretrain-tiny", {"Succeeded", "Failed"}, timeout=300)
    assert st["phase"] == "Succeeded", st
    assert not (jobs.get("PretrainJob", "pretrain-tiny")["metadata"].get("finalizers"))

    serve = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceDeployment",
             "metadata": {"name": "tiny"},
             "spec": {"model": {"from": {"kind": "PretrainJob", "name": "pretrain-tiny"},
                                "secretRef": {"name": "kubeforge-s3"}},
                      "engine": "reference", "mode": "aggregated", "maxModelLen": 256,
                      "pool": {"replicas": 1, "requests": {"cpu": "500m", "memory": "1Gi"}}}}
    jobs.create(serve)
    st = jobs.wait_phase("InferenceDeployment", "tiny", {"Ready", "Failed"}, timeout=300)
    assert st["phase"] == "Ready", st
    assert complete(cluster, namespace)

    # /metrics of the running operator
    text = httpx.get(f"http://127.0.0.1:{release.metrics_port}/metrics", timeout=5).text
    assert 'kubeforge_jobs{kind="PretrainJob",phase="Succeeded"} 1.0' in text

    # upgrade: a new image tag, re-rendered and applied, the operator restarted; nothing is lost
    before = {k: jobs.get(k, n) for k, n in (("PretrainJob", "pretrain-tiny"), ("InferenceDeployment", "tiny"))}
    pods_before = sorted(p["metadata"]["uid"] for p in jobs.kube.list(RESOURCES["Pod"], namespace,
                                                                      "kubeforge.dev/job-name=tiny"))
    release.stop_operator()
    release.install({"image": {"tag": "0.1.1"}})
    assert release.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.1")
    release.start_operator()
    assert wait(refused, 60, "the webhook after the upgrade")
    wait(lambda: "kubeforge_objects" in _metrics(release), 60, "the upgraded operator's metrics")
    after = {k: jobs.get(k, n) for k, n in (("PretrainJob", "pretrain-tiny"), ("InferenceDeployment", "tiny"))}
    for kind in before:
        assert after[kind]["metadata"]["uid"] == before[kind]["metadata"]["uid"]
        assert after[kind]["status"]["phase"] == before[kind]["status"]["phase"]
    assert after["PretrainJob"]["status"]["output"] == before["PretrainJob"]["status"]["output"]
    pods_after = sorted(p["metadata"]["uid"] for p in jobs.kube.list(RESOURCES["Pod"], namespace,
                                                                     "kubeforge.dev/job-name=tiny"))
    assert pods_after == pods_before  # the serving pool was not rolled
    assert complete(cluster, namespace)

    # deleting needs no operator: no finalizer holds the objects
    release.stop_operator()
    for kind, name in (("PretrainJob", "pretrain-tiny"), ("InferenceDeployment", "tiny")):
        jobs.kube.delete(RESOURCES[kind], namespace, name)
        wait(lambda k=kind, n=name: jobs.get(k, n) is None, 30, f"{kind} {name} to be deleted")


def _metrics(release: Release) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{release.metrics_port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""


def complete(cluster: ClusterHandle, namespace: str) -> bool:
    svc = Kube(cluster.api_client()).get(RESOURCES["Service"], namespace, "tiny")
    url = f"http://{svc['spec']['clusterIP']}:8000/v1/completions"

    def ok() -> bool:
        try:
            r = httpx.post(url, json={"model": "tiny", "prompt": "The ", "max_tokens": 4, "temperature": 0},
                           timeout=30)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and bool(r.json()["choices"][0]["text"])

    return bool(wait(ok, 120, "a completion through the Service"))

