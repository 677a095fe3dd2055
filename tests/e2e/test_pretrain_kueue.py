"""PretrainJob gated by Kueue: Kueue's real CRDs are installed and this test plays Kueue's part
(admit, evict, re-admit) by writing Workload status exactly as Kueue's controllers do."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeforge.controller.conditions import rfc3339
from kubeforge.controller.kube import Resource
from kubeforge.controller.reconciler import utcnow
from kubeforge.devcluster.cluster import install_crd_files
from kubeforge.devcluster.testing import ClusterHandle

from .conftest import REPO, Jobs, Operator, example, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KUEUE_CRDS = REPO / "tests" / "e2e" / "kueue-crds"  # vendored, see its README
KIND = "PretrainJob"
FLAVOR = "cpu-flavor"


@pytest.fixture(scope="module")
def kueue_crds(cluster: ClusterHandle) -> str:
    install_crd_files(cluster.api_client(), sorted(KUEUE_CRDS.glob("*.yaml")))
    kube = Jobs(cluster, "default").kube
    wait(lambda: kube.served("kueue.x-k8s.io", "v1beta2"), 60, "Kueue's API to be served")
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR},
              "spec": {"nodeLabels": {"kubernetes.io/os": "linux"},
                       "tolerations": [{"key": "kubeforge.dev/training", "operator": "Exists",
                                        "effect": "NoSchedule"}]}}
    wait(lambda: kube.create(flavor) or kube.get(Resource("kueue.x-k8s.io", "v1beta2", "resourceflavors",
                                                          namespaced=False), None, FLAVOR), 30, "the flavor")
    return "v1beta2"


class FakeKueue:
    """Kueue's admission and eviction, written to the Workload's status subresource."""

    def __init__(self, jobs: Jobs, version: str) -> None:
        self.jobs = jobs
        self.res = Resource("kueue.x-k8s.io", version, "workloads")

    def workload(self, name: str) -> dict[str, Any] | None:
        return self.jobs.kube.get(self.res, self.jobs.ns, name)

    def _conditions(self, wl: dict[str, Any], **statuses: tuple[str, str]) -> list[dict[str, Any]]:
        now = rfc3339(utcnow())
        conds = {c["type"]: c for c in (wl.get("status") or {}).get("conditions") or []}
        for type_, (status, reason) in statuses.items():
            conds[type_] = {"type": type_, "status": status, "reason": reason, "message": f"{type_} by the test",
                            "lastTransitionTime": now}
        return list(conds.values())

    def admit(self, name: str, count: int) -> None:
        wl = self.workload(name)
        assert wl is not None
        status = {
            "admission": {"clusterQueue": "team-cq", "podSetAssignments": [
                {"name": "worker", "count": count, "flavors": {"cpu": FLAVOR, "memory": FLAVOR}}]},
            "conditions": self._conditions(wl, QuotaReserved=("True", "QuotaReserved"), Admitted=("True", "Admitted"),
                                           Evicted=("False", "Admitted")),
        }
        self.jobs.kube.merge_patch(self.res, self.jobs.ns, name, {"status": status}, subresource="status")

    def evict(self, name: str) -> None:
        wl = self.workload(name)
        assert wl is not None
        status = {"conditions": self._conditions(wl, Evicted=("True", "Preempted"))}
        self.jobs.kube.merge_patch(self.res, self.jobs.ns, name, {"status": status}, subresource="status")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def test_kueue_admits_evicts_and_readmits_the_gang(operator: Operator, jobs: Jobs, cluster: ClusterHandle,
                                                   kueue_crds: str):
    cluster.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                    "data/tiny-corpus.jsonl")
    obj = copy.deepcopy(example("pretrain-tiny.yaml"))
    obj["metadata"]["name"] = "queued"
    obj["spec"]["training"]["totalSteps"] = 200
    obj["spec"]["checkpoint"].update(uri=f"s3://kubeforge/checkpoints/{jobs.ns}/queued", intervalSteps=100)
    obj["spec"]["scheduling"] = {"queueName": "team-a", "priority": 10}
    jobs.create(obj)
    kueue = FakeKueue(jobs, kueue_crds)

    wl = wait(lambda: kueue.workload("queued-workload"), 60, "the Workload")
    assert wl["spec"]["queueName"] == "team-a" and wl["spec"]["podSets"][0]["count"] == 2
    assert wl["metadata"]["ownerReferences"][0]["name"] == "queued"
    jobs.wait_phase(KIND, "queued", {"Queued"}, timeout=30)
    assert jobs.pods("queued") == [], "no pod may exist before Kueue admits the Workload"

    kueue.admit("queued-workload", 2)
    pods = wait(lambda: len(jobs.pods("queued")) == 2 and jobs.pods("queued"), 60, "the admitted gang")
    for p in pods:
        assert p["spec"]["nodeSelector"]["kubernetes.io/os"] == "linux"
        assert {"key": "kubeforge.dev/training", "operator": "Exists", "effect": "NoSchedule"} in p["spec"]["tolerations"]
    wait(lambda: (jobs.status(KIND, "queued").get("progress") or {}).get("step", 0) >= 10, 150, "training")
    assert condition(jobs.get(KIND, "queued"), "Admitted")["status"] == "True"

    kueue.evict("queued-workload")
    st = jobs.wait_phase(KIND, "queued", {"Queued"}, timeout=60)
    wait(lambda: not jobs.pods("queued"), 90, "the evicted gang to stop")
    wait(lambda: not (kueue.workload("queued-workload").get("status") or {}).get("admission"), 60,
         "the operator to give the quota back")
    st = jobs.status(KIND, "queued")
    assert st["restarts"] == 0 and st["preemptions"] == 1
    saved = st["lastCheckpoint"]["step"]
    assert saved >= 10, "the gang must checkpoint when it is evicted"
    assert condition(kueue.workload("queued-workload"), "QuotaReserved")["status"] == "False"

    kueue.admit("queued-workload", 2)
    first = wait(lambda: (lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step", 0) > saved
                          and s["progress"])(jobs.status(KIND, "queued")), 150, "progress after re-admission")
    assert first["step"] > saved
    st = jobs.wait_phase(KIND, "queued", {"Succeeded", "Failed"}, timeout=240)
    assert st["phase"] == "Succeeded" and st["attempt"] == 1 and st["restarts"] == 0
    finished = wait(lambda: condition(kueue.workload("queued-workload"), "Finished"), 30, "Finished on the Workload")
    assert finished["status"] == "True" and finished["reason"] == "Succeeded"


def test_workload_version_follows_what_the_cluster_serves(kueue_crds: str, cluster: ClusterHandle):
    from kubeforge.controller import kueue

    kube = Jobs(cluster, "default").kube
    served = [v for v in kueue.VERSIONS if kube.served(kueue.GROUP, v)]
    assert served[0] == "v1beta2" and "v1beta1" in served


