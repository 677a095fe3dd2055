"""The reconciler against a real API server (no operator process): status the way kstatus tools read it."""

from __future__ import annotations

import time

import pytest
from kubernetes.client.exceptions import ApiException

from builders import pretrain_job, with_
from kubeforge.controller.kube import RESOURCES, Kube, Resource
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


# --- reliability: identity, crashes, partial gangs (pods ask for more GPUs than any node has: never run) ---

UNSCHEDULABLE = {"numNodes": 2, "processesPerNode": 1, "requests": {"nvidia.com/gpu": 64}}


def _reconcile_until_created(reconciler: Reconciler, namespace: str, name: str) -> None:
    """The first pods of a new ServiceAccount wait for its token (500 'No API token found'), as in the test
    above; the operator retries, so does this."""
    for _ in range(60):
        try:
            reconciler.reconcile("PretrainJob", namespace, name)
            return
        except ApiException as e:
            if e.status != 500 or "No API token found" not in str(e.body):
                raise
            time.sleep(1)  # a retry interval, not a wait for a state: the next call checks it


def _pods(kube: Kube, namespace: str, name: str) -> list[dict]:
    return kube.list(RESOURCES["Pod"], namespace, f"kubeforge.dev/job-name={name}")


def _poll(fn, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_a_recreated_job_does_not_adopt_the_old_ones_pods(reconciler, namespace):
    """GitOps deletes and re-creates a job under the same name while the old pods still terminate (held
    here by a finalizer). The new job (another uid) neither adopts them nor counts them as its own
    preemption: it waits, then creates its own gang."""
    kube = reconciler.kube
    kube.create(pretrain_job("gitops", namespace, resources=UNSCHEDULABLE))
    _reconcile_until_created(reconciler, namespace, "gitops")
    old = _pods(kube, namespace, "gitops")
    assert len(old) == 2
    for p in old:
        kube.merge_patch(RESOURCES["Pod"], namespace, p["metadata"]["name"],
                         {"metadata": {"finalizers": ["kubeforge.dev/test-hold"]}})
    kube.delete(RESOURCES["PretrainJob"], namespace, "gitops")
    for p in old:  # what the garbage collector does to the dependents (explicit: no timing on the GC)
        kube.delete(RESOURCES["Pod"], namespace, p["metadata"]["name"])
    assert _poll(lambda: all(p["metadata"].get("deletionTimestamp") for p in _pods(kube, namespace, "gitops")))

    kube.create(pretrain_job("gitops", namespace, resources=UNSCHEDULABLE))
    new_uid = kube.get(RESOURCES["PretrainJob"], namespace, "gitops")["metadata"]["uid"]
    reconciler.reconcile("PretrainJob", namespace, "gitops")
    got = kube.get(RESOURCES["PretrainJob"], namespace, "gitops")["status"]
    assert got.get("preemptions", 0) == 0 and got.get("attempt", 0) == 0
    assert "previous" in got["message"]
    assert all(p["metadata"]["ownerReferences"][0]["uid"] != new_uid for p in _pods(kube, namespace, "gitops"))

    for p in old:  # the old pods finish terminating
        kube.merge_patch(RESOURCES["Pod"], namespace, p["metadata"]["name"], {"metadata": {"finalizers": None}})
    assert _poll(lambda: not _pods(kube, namespace, "gitops"))
    _reconcile_until_created(reconciler, namespace, "gitops")
    mine = _pods(kube, namespace, "gitops")
    assert len(mine) == 2 and {p["metadata"]["ownerReferences"][0]["uid"] for p in mine} == {new_uid}


class DiesAfterDeletes(Kube):
    """The operator process dying right after it deleted `n` pods: a fault injected into the real client."""

    class Died(Exception):
        pass

    def __init__(self, api_client, n: int) -> None:
        super().__init__(api_client)
        self.left = n

    def delete(self, res, namespace, name, grace_seconds=None) -> bool:
        done = super().delete(res, namespace, name, grace_seconds)
        if res.plural == "pods":
            self.left -= 1
            if self.left == 0:
                raise self.Died(f"killed after deleting {name}")
        return done


def _gang_with_a_failed_worker(kube: Kube, reconciler: Reconciler, namespace: str, name: str, message: str) -> None:
    """A 2-pod gang created (never scheduled), then its worker-1 failed with exit code 1 and `message`."""
    kube.create(pretrain_job(name, namespace, resources=UNSCHEDULABLE))
    _reconcile_until_created(reconciler, namespace, name)
    failed = {"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}}]}
    kube.merge_patch(RESOURCES["Pod"], namespace, f"{name}-worker-1", {"status": failed}, subresource="status")


def test_a_crash_between_pod_deletion_and_status_write_keeps_the_failure(cluster, namespace):
    """A worker failed; the operator deletes the gang and dies before anything else. The restarted operator
    must still count a failure (restart budget), not lose it or take it for a preemption."""
    from kubeforge.settings import OperatorSettings

    kube = Kube(cluster.api_client())
    reconciler = Reconciler(kube, OperatorSettings())
    _gang_with_a_failed_worker(kube, reconciler, namespace, "crashy", "NCCL timeout")

    dying = Reconciler(DiesAfterDeletes(cluster.api_client(), n=2), OperatorSettings())
    try:
        dying.reconcile("PretrainJob", namespace, "crashy")
    except DiesAfterDeletes.Died:
        pass
    reconciler.reconcile("PretrainJob", namespace, "crashy")  # the restarted operator
    st = kube.get(RESOURCES["PretrainJob"], namespace, "crashy")["status"]
    assert st["restarts"] == 1 and st.get("preemptions", 0) == 0 and st["attempt"] == 1


class RecordsPodDeletes(Kube):
    """The real client, remembering the grace period of every pod delete it sent."""

    def __init__(self, api_client) -> None:
        super().__init__(api_client)
        self.graces: dict[str, int | None] = {}

    def delete(self, res, namespace, name, grace_seconds=None, uid=None) -> bool:
        if res.plural == "pods":
            self.graces[name] = grace_seconds
        return super().delete(res, namespace, name, grace_seconds, uid)


def test_the_survivors_of_a_failed_pod_are_deleted_with_a_short_grace(cluster, namespace):
    """A gang that lost a member cannot save (the checkpoint is collective): its survivors get 30 s, not
    runPolicy's 300 s, so the next gang is not held back for nothing."""
    from kubeforge.controller.training import SURVIVOR_GRACE_S

    kube = RecordsPodDeletes(cluster.api_client())
    reconciler = Reconciler(kube, OperatorSettings())
    _gang_with_a_failed_worker(kube, reconciler, namespace, "lossy", "gloo: connection reset")
    reconciler.reconcile("PretrainJob", namespace, "lossy")
    assert kube.graces == {"lossy-worker-0": SURVIVOR_GRACE_S, "lossy-worker-1": SURVIVOR_GRACE_S}
    assert kube.get(RESOURCES["PretrainJob"], namespace, "lossy")["status"]["restarts"] == 1


def test_a_gang_half_refused_by_a_quota_is_completed_not_recreated(reconciler, namespace):
    """A ResourceQuota admits one of the two pods (403 for the second). The operator keeps the pod it has
    and creates the missing one once the quota allows, instead of deleting and re-creating the gang in a
    loop with no backoff."""
    kube = reconciler.kube
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "one-pod", "namespace": namespace},
             "spec": {"hard": {"pods": "1"}}}
    kube._call("POST", f"/api/v1/namespaces/{namespace}/resourcequotas", body=quota)
    kube.create(pretrain_job("quota", namespace, resources=UNSCHEDULABLE))
    errors = 0
    for _ in range(3):  # every reconcile meets the quota; none deletes the pod it already has
        try:
            _reconcile_until_created(reconciler, namespace, "quota")
        except ApiException as e:
            assert e.status == 403, e
            errors += 1
        names = [p["metadata"]["name"] for p in _pods(kube, namespace, "quota")]
        assert len(names) == 1
    assert errors == 3
    first = _pods(kube, namespace, "quota")[0]
    kube.delete(Resource("", "v1", "resourcequotas"), namespace, "one-pod")
    assert _poll(lambda: _try_reconcile(reconciler, namespace, "quota") and
                 len(_pods(kube, namespace, "quota")) == 2)
    again = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _pods(kube, namespace, "quota")}
    assert again[first["metadata"]["name"]] == first["metadata"]["uid"]  # the first pod was kept
    st = kube.get(RESOURCES["PretrainJob"], namespace, "quota")["status"]
    assert st.get("preemptions", 0) == 0 and st.get("attempt", 0) == 0


def _try_reconcile(reconciler: Reconciler, namespace: str, name: str) -> bool:
    try:
        reconciler.reconcile("PretrainJob", namespace, name)
        return True
    except ApiException:
        return False


class CountsWrites(Kube):
    """The real client, counting what it sends besides reads."""

    def __init__(self, api_client) -> None:
        super().__init__(api_client)
        self.writes: list[tuple[str, str]] = []

    def create(self, manifest):
        self.writes.append(("create", manifest["kind"]))
        return super().create(manifest)

    def delete(self, res, namespace, name, grace_seconds=None):
        self.writes.append(("delete", res.plural))
        return super().delete(res, namespace, name, grace_seconds)

    def merge_patch(self, res, namespace, name, patch, subresource=None):
        self.writes.append(("patch", f"{res.plural}/{subresource or ''}"))
        return super().merge_patch(res, namespace, name, patch, subresource)

    def post_event(self, obj, type_, reason, message):
        self.writes.append(("event", reason))
        return super().post_event(obj, type_, reason, message)


def test_a_settled_job_is_reconciled_without_a_single_write(cluster, namespace):
    """The gang is created and Pending (it never fits): from then on a reconcile (the resync, a requeue, a
    pod event that changes nothing) decides the same thing, and sends nothing at all: no status write, no
    create, no event; the object's resourceVersion stays."""
    kube = CountsWrites(cluster.api_client())
    reconciler = Reconciler(kube, OperatorSettings())
    kube.create(pretrain_job("settled", namespace, resources=UNSCHEDULABLE))
    _reconcile_until_created(reconciler, namespace, "settled")
    reconciler.reconcile("PretrainJob", namespace, "settled")  # the pods are seen Pending: "0/2 pods running"
    rv = kube.get(RESOURCES["PretrainJob"], namespace, "settled")["metadata"]["resourceVersion"]
    kube.writes.clear()
    for _ in range(5):
        reconciler.reconcile("PretrainJob", namespace, "settled")
    assert kube.writes == []
    assert kube.get(RESOURCES["PretrainJob"], namespace, "settled")["metadata"]["resourceVersion"] == rv


class ReadsStaleOnce(Kube):
    """Answers the first GET of a job with an older copy of it: an operator restarted while its
    predecessor's last write was still on the way, or a lagging cache."""

    def __init__(self, api_client, stale: dict) -> None:
        super().__init__(api_client)
        self.stale: dict | None = stale
        self.deleted: list[str] = []

    def get(self, res, namespace, name):
        if res.plural == "pretrainjobs" and self.stale is not None:
            stale, self.stale = self.stale, None
            return stale
        return super().get(res, namespace, name)

    def delete(self, res, namespace, name, grace_seconds=None, uid=None):
        self.deleted.append(name)
        return super().delete(res, namespace, name, grace_seconds, uid)


def test_a_plan_made_from_a_stale_read_touches_no_pod_and_is_made_again(cluster, namespace):
    """Attempt 0 failed and attempt 1's gang exists. A reconcile that reads the job as it was during attempt
    0 takes attempt 1's pods for stale ones. Its status write carries the resourceVersion it read, so the API
    server refuses it (409) before any pod is deleted; the reconcile reads again and decides again: attempt
    1's pods keep their uids and the status still counts one restart."""
    kube = Kube(cluster.api_client())
    reconciler = Reconciler(kube, OperatorSettings())
    kube.create(pretrain_job("stale", namespace, resources=UNSCHEDULABLE, runPolicy={"backoffSeconds": 0}))
    _reconcile_until_created(reconciler, namespace, "stale")
    attempt0 = kube.get(RESOURCES["PretrainJob"], namespace, "stale")
    assert attempt0["status"]["attempt"] == 0
    failed = {"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "NCCL timeout"}}}]}
    kube.merge_patch(RESOURCES["Pod"], namespace, "stale-worker-1", {"status": failed}, subresource="status")
    reconciler.reconcile("PretrainJob", namespace, "stale")  # tears attempt 0 down

    def attempt1_created():
        reconciler.reconcile("PretrainJob", namespace, "stale")
        pods = _pods(kube, namespace, "stale")
        return len(pods) == 2 and all(p["metadata"]["labels"]["kubeforge.dev/attempt"] == "1" for p in pods)

    assert _poll(attempt1_created)
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _pods(kube, namespace, "stale")}

    stale = ReadsStaleOnce(cluster.api_client(), attempt0)
    Reconciler(stale, OperatorSettings()).reconcile("PretrainJob", namespace, "stale")
    assert stale.stale is None and stale.deleted == []  # the stale copy was read, and nothing deleted
    after = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _pods(kube, namespace, "stale")}
    assert after == before
    st = kube.get(RESOURCES["PretrainJob"], namespace, "stale")["status"]
    assert st["attempt"] == 1 and st["restarts"] == 1


def test_ttl_deletes_the_finished_job_it_read_never_one_recreated_under_its_name(cluster, namespace):
    """ttlSecondsAfterFinished expired on a job that has since been deleted and re-created with the same name
    (GitOps does this): the reconcile that read the finished one deletes with its uid as a precondition, so
    the new job survives; the finished one itself is deleted when its time comes."""
    from datetime import timedelta

    from kubeforge.controller.reconciler import utcnow

    kube = Kube(cluster.api_client())
    res = RESOURCES["PretrainJob"]
    later = Reconciler(kube, OperatorSettings(), clock=lambda: utcnow() + timedelta(hours=2))

    def settled_finished_job(name: str) -> dict:
        """Succeeded an hour of TTL ago, reconciled once (its status settled: a reconcile writes nothing)."""
        kube.create(pretrain_job(name, namespace, resources=UNSCHEDULABLE, runPolicy={"ttlSecondsAfterFinished": 3600}))
        done = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        kube.merge_patch(res, namespace, name, {"status": {"phase": "Succeeded", "completionTime": done}},
                         subresource="status")
        now = Reconciler(kube, OperatorSettings())
        now.reconcile("PretrainJob", namespace, name)
        obj = kube.get(res, namespace, name)
        now.reconcile("PretrainJob", namespace, name)
        assert kube.get(res, namespace, name)["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
        return obj

    old = settled_finished_job("ttl")
    assert old["status"]["phase"] == "Succeeded"
    kube.delete(res, namespace, "ttl")
    assert _poll(lambda: kube.get(res, namespace, "ttl") is None)
    kube.create(pretrain_job("ttl", namespace, resources=UNSCHEDULABLE))
    new_uid = kube.get(res, namespace, "ttl")["metadata"]["uid"]
    assert new_uid != old["metadata"]["uid"]

    stale = ReadsStaleOnce(cluster.api_client(), old)
    Reconciler(stale, OperatorSettings(), clock=later.clock).reconcile("PretrainJob", namespace, "ttl")
    assert stale.deleted == ["ttl"]  # it decided to delete the finished job it read ...
    survivor = kube.get(res, namespace, "ttl")
    assert survivor is not None and survivor["metadata"]["uid"] == new_uid  # ... and the new one is untouched

    settled_finished_job("ttl-own")
    later.reconcile("PretrainJob", namespace, "ttl-own")
    assert _poll(lambda: kube.get(res, namespace, "ttl-own") is None)
