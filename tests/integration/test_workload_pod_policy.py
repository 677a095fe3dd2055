"""A workload's ServiceAccount can patch only its own pod: the per-job Role the operator renders plus the chart's
ValidatingAdmissionPolicy, against a real API server, with real ServiceAccount tokens bound to two pods of one
gang (TokenRequest, as the kubelet requests them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeforge import contract, helmcheck
from kubeforge.controller.children import job_labels, progress_rbac
from kubeforge.controller.kube import Kube, Resource
from kubeforge.devcluster.testing import ClusterHandle, wait_for
from kubeforge.runtime.report import PodAnnotationSink, Progress

pytestmark = pytest.mark.integration

POLICY = Resource("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies", namespaced=False)
BINDING = Resource("admissionregistration.k8s.io", "v1", "validatingadmissionpolicybindings", namespaced=False)
DENIED_BY_POLICY = "may change only its own pod"
ACCOUNT = "gang-progress"


def chart_policy() -> list[dict[str, Any]]:
    docs = [d for d in helmcheck.render({}) if d["kind"] in ("ValidatingAdmissionPolicy",
                                                              "ValidatingAdmissionPolicyBinding")]
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    return docs


@pytest.fixture(scope="module")
def own_pod_policy(cluster: ClusterHandle) -> Iterator[str]:
    """The chart's policy and binding, as `helm install` creates them; removed afterwards."""
    kube = Kube(cluster.api_client())
    admission = client.AdmissionregistrationV1Api(cluster.api_client())
    docs = chart_policy()
    for doc in docs:
        res = POLICY if doc["kind"] == "ValidatingAdmissionPolicy" else BINDING
        kube.delete(res, None, doc["metadata"]["name"])
        wait_for(lambda res=res, doc=doc: kube.get(res, None, doc["metadata"]["name"]) is None, 30,
                 what="an old copy to go")
        if res is POLICY:
            admission.create_validating_admission_policy(doc)
        else:
            admission.create_validating_admission_policy_binding(doc)
    try:
        yield docs[0]["metadata"]["name"]
    finally:
        kube.delete(BINDING, None, docs[1]["metadata"]["name"])
        kube.delete(POLICY, None, docs[0]["metadata"]["name"])


def owner(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": name, "namespace": namespace, "uid": "0"}}


def gang(kube: Kube, namespace: str, job: str, pods: list[str], account: str) -> dict[str, dict[str, Any]]:
    """The operator's per-job ServiceAccount/Role/RoleBinding and pods labelled as the operator labels them
    (kept Pending by a node selector nothing matches: a token can be bound to a pod that never runs)."""
    for m in progress_rbac(owner(namespace, job), account, pods):
        m["metadata"].pop("ownerReferences")  # no owner object here: the garbage collector would take them
        kube.create(m)
    out = {}
    for name in pods:
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {**job_labels(owner(namespace, job), "worker"), contract.LABEL_REPLICA_INDEX: "0"}},
            "spec": {"serviceAccountName": account, "nodeSelector": {"kubeforge.dev/test-never": "true"},
                     "containers": [{"name": "c", "image": "none", "command": ["true"]}]},
        }
        kube.create(pod)
        out[name] = kube.get(Resource("", "v1", "pods"), namespace, name)
    return out


def token_for(cluster: ClusterHandle, namespace: str, account: str, pod: dict[str, Any] | None) -> str:
    """A ServiceAccount token; bound to `pod` (its name and uid) as the kubelet requests them, or unbound."""
    core = client.CoreV1Api(cluster.api_client())
    bound = None if pod is None else client.V1BoundObjectReference(
        kind="Pod", api_version="v1", name=pod["metadata"]["name"], uid=pod["metadata"]["uid"])
    spec = client.V1TokenRequestSpec(audiences=[], expiration_seconds=600, bound_object_ref=bound)
    tr = core.create_namespaced_service_account_token(account, namespace, client.AuthenticationV1TokenRequest(spec=spec))
    return str(tr.status.token)


def as_token(cluster: ClusterHandle, token: str) -> client.ApiClient:
    admin = cluster.api_client().configuration
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert, cfg.verify_ssl = admin.host, admin.ssl_ca_cert, admin.verify_ssl
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def annotate(api: client.ApiClient, namespace: str, pod: str, value: str) -> None:
    body = {"metadata": {"annotations": {contract.HEARTBEAT_ANNOTATION: value}}}
    client.CoreV1Api(api).patch_namespaced_pod(pod, namespace, body, _request_timeout=10)


def refusal(fn) -> ApiException:
    with pytest.raises(ApiException) as err:
        fn()
    return err.value


@pytest.fixture
def two_pods(cluster: ClusterHandle, namespace: str, own_pod_policy: str):
    kube = Kube(cluster.api_client())
    pods = gang(kube, namespace, "ptj", ["ptj-worker-0", "ptj-worker-1"], ACCOUNT)
    a = as_token(cluster, token_for(cluster, namespace, ACCOUNT, pods["ptj-worker-0"]))
    b = as_token(cluster, token_for(cluster, namespace, ACCOUNT, pods["ptj-worker-1"]))

    # the policy is live once the API server's admission informer has it: A's patch of B is refused
    def b_refused_to_a() -> bool:
        try:
            annotate(a, namespace, "ptj-worker-1", "probe")
        except ApiException as e:
            return e.status == 403 and DENIED_BY_POLICY in (e.body or "")
        return False

    wait_for(b_refused_to_a, 90, interval=0.5, what="the own-pod policy to be enforced")
    return kube, a, b


def test_a_pod_patches_its_own_pod_and_not_its_gang_mates(cluster, namespace, two_pods):
    kube, a, b = two_pods
    pods = Resource("", "v1", "pods")
    annotate(a, namespace, "ptj-worker-0", "a-own")
    annotate(b, namespace, "ptj-worker-1", "b-own")
    for token, victim in ((a, "ptj-worker-1"), (b, "ptj-worker-0")):
        err = refusal(lambda token=token, victim=victim: annotate(token, namespace, victim, "forged"))
        assert err.status == 403 and DENIED_BY_POLICY in err.body, err.body
    annotations = {n: kube.get(pods, namespace, n)["metadata"]["annotations"] for n in ("ptj-worker-0", "ptj-worker-1")}
    assert annotations["ptj-worker-0"][contract.HEARTBEAT_ANNOTATION] == "a-own"
    assert annotations["ptj-worker-1"][contract.HEARTBEAT_ANNOTATION] == "b-own"

    # the runtime's own progress report (kubeforge.runtime.report) passes as it is sent
    sink = PodAnnotationSink.__new__(PodAnnotationSink)
    sink.api, sink.name, sink.namespace = client.CoreV1Api(a), "ptj-worker-0", namespace
    sink.send(Progress(step=3, total_steps=10, tokens=96, loss=2.5).to_json())
    stored = kube.get(pods, namespace, "ptj-worker-0")["metadata"]["annotations"][contract.PROGRESS_ANNOTATION]
    assert json.loads(stored)["step"] == 3
    sink.name = "ptj-worker-1"
    err = refusal(lambda: sink.send(Progress(step=9, total_steps=10, tokens=1).to_json()))
    assert err.status == 403 and contract.PROGRESS_ANNOTATION not in (
        kube.get(pods, namespace, "ptj-worker-1")["metadata"].get("annotations") or {})

    # people and the operator (other identities) are not matched by the policy
    kube.merge_patch(pods, namespace, "ptj-worker-1", {"metadata": {"annotations": {"x": "admin"}}})


def test_every_other_verb_is_denied(cluster, namespace, two_pods):
    kube, a, _ = two_pods
    core = client.CoreV1Api(a)
    other_job = gang(kube, namespace, "other", ["other-worker-0"], "other-progress")["other-worker-0"]
    own = "ptj-worker-0"
    attempts = {
        "get own pod": lambda: core.read_namespaced_pod(own, namespace),
        "list pods": lambda: core.list_namespaced_pod(namespace),
        "watch pods": lambda: core.list_namespaced_pod(namespace, watch=True, timeout_seconds=1),
        "delete own pod": lambda: core.delete_namespaced_pod(own, namespace),
        "delete gang mate": lambda: core.delete_namespaced_pod("ptj-worker-1", namespace),
        "replace own pod": lambda: core.replace_namespaced_pod(
            own, namespace, kube.get(Resource("", "v1", "pods"), namespace, own)),
        "patch own status": lambda: core.patch_namespaced_pod_status(
            own, namespace, {"metadata": {"annotations": {"s": "1"}}}),
        "evict own pod": lambda: core.create_namespaced_pod_eviction(own, namespace, client.V1Eviction(
            metadata=client.V1ObjectMeta(name=own, namespace=namespace))),
        "create a pod": lambda: core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sneaky"},
            "spec": {"containers": [{"name": "c", "image": "none"}]}}),
        "patch another job's pod": lambda: annotate(a, namespace, other_job["metadata"]["name"], "x"),
        "read a secret": lambda: core.read_namespaced_secret("kubeforge-s3", namespace),
        "list secrets": lambda: core.list_namespaced_secret(namespace),
        "read a configmap": lambda: core.list_namespaced_config_map(namespace),
        "patch its own ServiceAccount": lambda: core.patch_namespaced_service_account(
            ACCOUNT, namespace, {"metadata": {"labels": {"x": "1"}}}),
    }
    outcomes = {}
    for what, call in attempts.items():
        try:
            call()
            outcomes[what] = "allowed"
        except ApiException as e:
            outcomes[what] = e.status
    assert outcomes == dict.fromkeys(attempts, 403)
    assert kube.get(Resource("", "v1", "pods"), namespace, own) is not None


def test_a_token_bound_to_no_pod_patches_nothing(cluster, namespace, two_pods):
    unbound = as_token(cluster, token_for(cluster, namespace, ACCOUNT, None))
    for pod in ("ptj-worker-0", "ptj-worker-1"):
        err = refusal(lambda pod=pod: annotate(unbound, namespace, pod, "unbound"))
        assert err.status == 403 and DENIED_BY_POLICY in err.body, err.body


def test_without_the_policy_the_role_alone_would_allow_a_gang_mate():
    """Why the policy exists: RBAC can name only the gang's pods, every one of them."""
    (role,) = [m for m in progress_rbac(owner("ns", "ptj"), ACCOUNT, ["ptj-worker-0", "ptj-worker-1"])
               if m["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"],
                              "resourceNames": ["ptj-worker-0", "ptj-worker-1"]}]
    policy = chart_policy()[0]
    assert "authentication.kubernetes.io/pod-uid" in policy["spec"]["validations"][0]["expression"]
