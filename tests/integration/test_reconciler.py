"""The reconciler against a real API server (no operator process): status the way kstatus tools read it."""

from __future__ import annotations

import time

import pytest
from kubernetes.client.exceptions import ApiException

from builders import pretrain_job, rl_job, with_
from kubeforge.controller.kube import RESOURCES, Kube
from kubeforge.controller.reconciler import Reconciler
from kubeforge.settings import OperatorSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def reconciler(cluster) -> Reconciler:
    return Reconciler(Kube(cluster.api_client()), OperatorSettings())


def conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def _strip_cel(node):
    if isinstance(node, dict):
        return {k: _strip_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [_strip_cel(v) for v in node]
    return node


@pytest.fixture
def crd_without_cel(cluster):
    """PretrainJob's CRD as an older chart installed it, without today's CEL rules (Helm never upgrades CRDs),
    restored afterwards."""
    from pathlib import Path

    from kubernetes import client

    from kubeforge.devcluster.cluster import install_crd_files

    api = cluster.api_client()
    ext = client.ApiextensionsV1Api(api)
    name = "pretrainjobs.kubeforge.dev"
    cur = api.sanitize_for_serialization(ext.read_custom_resource_definition(name))
    ext.replace_custom_resource_definition(name, _strip_cel(cur))
    try:
        yield
    finally:
        install_crd_files(api, [Path(__file__).resolve().parents[2] / "crds" / f"{name}.yaml"])


def test_invalid_spec_on_a_server_without_the_webhook_is_stalled_with_the_field_path(reconciler, namespace,
                                                                                      crd_without_cel):
    kube = reconciler.kube
    obj = with_(pretrain_job("bad", namespace), "spec.training.globalBatchSize", 7)
    deadline = time.monotonic() + 30
    while True:  # the API server picks up the CEL-less schema within moments
        try:
            kube.create(obj)
            break
        except ApiException as e:
            assert e.status == 422 and time.monotonic() < deadline, e
            time.sleep(0.2)
    reconciler.reconcile("PretrainJob", namespace, "bad")
    got = kube.get(RESOURCES["PretrainJob"], namespace, "bad")
    conds = conditions(got)
    assert conds["Stalled"]["status"] == "True" and conds["Stalled"]["reason"] == "InvalidSpec"
    assert conds["Stalled"]["message"] == (
        "spec.training.globalBatchSize: must be a multiple of microBatchSize x numNodes x processesPerNode (4)")
    assert conds["Ready"]["status"] == "False" and conds["Reconciling"]["status"] == "False"
    assert got["status"]["observedGeneration"] == got["metadata"]["generation"] == 1
    assert kube.list(RESOURCES["Pod"], namespace) == []
    events = [e for e in kube.list(RESOURCES["Event"], namespace) if e["involvedObject"]["name"] == "bad"]
    assert [e["reason"] for e in events] == ["InvalidSpec"]

    # fixed (and suspended, so nothing runs): no longer stalled, generation observed
    kube.merge_patch(RESOURCES["PretrainJob"], namespace, "bad",
                     {"spec": {"training": {"globalBatchSize": 8}, "runPolicy": {"suspend": True}}})
    reconciler.reconcile("PretrainJob", namespace, "bad")
    got = kube.get(RESOURCES["PretrainJob"], namespace, "bad")
    conds = conditions(got)
    assert got["status"]["observedGeneration"] == got["metadata"]["generation"] == 2
    assert conds["Stalled"]["status"] == "False" and got["status"]["phase"] == "Suspended"
    assert conds["Stalled"]["lastTransitionTime"] >= conds["Ready"]["lastTransitionTime"]

    # reconciling again changes nothing: no status write, no new event
    rv = got["metadata"]["resourceVersion"]
    reconciler.reconcile("PretrainJob", namespace, "bad")
    assert kube.get(RESOURCES["PretrainJob"], namespace, "bad")["metadata"]["resourceVersion"] == rv


def test_kinds_without_a_controller_say_so_honestly(reconciler, namespace):
    kube = reconciler.kube
    obj = rl_job("post")
    obj["metadata"]["namespace"] = namespace
    kube.create(obj)
    reconciler.reconcile("RLJob", namespace, "post")
    got = kube.get(RESOURCES["RLJob"], namespace, "post")
    conds = conditions(got)
    assert conds["Stalled"]["reason"] == "NotImplemented" and conds["Ready"]["status"] == "False"
    assert "phase" not in got["status"] and got["status"]["observedGeneration"] == 1
    assert kube.list(RESOURCES["Pod"], namespace) == []


def test_model_and_data_secrets_reach_the_gang_under_their_prefixes(reconciler, namespace):
    """Three Secrets (checkpoint, model, data) in one job: the API server stores the pods with each one's
    envFrom, the model's and the data's under their prefixes. The gang asks for more GPUs than any node
    has, so it stays Pending and nothing runs."""
    from kubeforge import contract

    kube = reconciler.kube
    obj = pretrain_job("creds", namespace, resources={"numNodes": 2, "processesPerNode": 1,
                                                      "requests": {"nvidia.com/gpu": 64}})
    obj["spec"]["checkpoint"]["secretRef"] = {"name": "kubeforge-s3"}
    obj["spec"]["model"]["secretRef"] = {"name": "hub-models"}
    obj["spec"]["data"]["secretRef"] = {"name": "corpora"}
    kube.create(obj)
    # the API server refuses pods of the job's new ServiceAccount until its token exists (500, Retry-After:
    # "No API token found"); the operator retries the reconcile, and so does this test
    for _ in range(30):
        try:
            reconciler.reconcile("PretrainJob", namespace, "creds")
            break
        except ApiException as e:
            if e.status != 500 or "No API token found" not in str(e.body):
                raise
            time.sleep(1)
    pods = kube.list(RESOURCES["Pod"], namespace, "kubeforge.dev/job-name=creds")
    assert sorted(p["metadata"]["name"] for p in pods) == ["creds-worker-0", "creds-worker-1"]
    for p in pods:
        assert p["spec"]["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "kubeforge-s3"}},
            {"prefix": contract.MODEL_CREDENTIALS_PREFIX, "secretRef": {"name": "hub-models"}},
            {"prefix": contract.DATA_CREDENTIALS_PREFIX, "secretRef": {"name": "corpora"}},
        ]
