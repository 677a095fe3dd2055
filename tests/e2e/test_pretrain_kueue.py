"""PretrainJob gated by the real Kueue controller (v0.17.0) in the dev cluster.

One ClusterQueue with room for exactly one gang (2 pods x 1 CPU), preemption of lower priorities within it,
and Kueue's waitForPodsReady on (see kubeforge.devcluster.kueue). The scenario shows, with Kueue deciding:
- admission only when quota fits (a second job waits with no pod),
- the admitted job reports PodsReady on its Workload (what waitForPodsReady waits for),
- a suspended job gives its quota back (the waiting job is admitted),
- a higher-priority job (WorkloadPriorityClass, named by the `kueue.x-k8s.io/priority-class` label and
  queued by the `kueue.x-k8s.io/queue-name` label) preempts the running one: eviction -> checkpoint ->
  re-admission once the quota is free -> resume from that checkpoint -> Succeeded,
- a PriorityClass makes a valid Workload (Kueue refuses priorityClassRef without its value).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeforge.controller.kube import Resource
from kubeforge.devcluster.testing import ClusterHandle

from .conftest import REPO, Jobs, Operator, example, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KIND = "PretrainJob"
FLAVOR = "cpu-flavor"
V = "v1beta2"


def kres(plural: str, namespaced: bool = True) -> Resource:
    return Resource("kueue.x-k8s.io", V, plural, namespaced=namespaced)


def create(cluster: ClusterHandle, obj: dict[str, Any]) -> None:
    """Create a Kueue object or a PriorityClass (409 is fine: the module fixture may run once per session)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = cluster.api_client()
    group, version = obj["apiVersion"].split("/")
    plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
    ns = obj["metadata"].get("namespace")
    co = client.CustomObjectsApi(api)
    try:
        if ns:
            co.create_namespaced_custom_object(group, version, ns, plural, obj)
        else:
            co.create_cluster_custom_object(group, version, plural, obj)
    except ApiException as e:
        if e.status != 409:
            raise


@pytest.fixture(scope="module")
def kueue(cluster: ClusterHandle) -> str:
    """Kueue running in the session's dev cluster, a flavor and a ClusterQueue with room for one gang."""
    assert cluster.dev is not None
    cluster.dev.up(nodes=2, gpus_per_node=2, with_kueue=True)
    kube = Jobs(cluster, "default").kube
    create(cluster, {"apiVersion": f"kueue.x-k8s.io/{V}", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR},
                 "spec": {"nodeLabels": {"kubernetes.io/os": "linux"},
                          "tolerations": [{"key": "kubeforge.dev/training", "operator": "Exists",
                                           "effect": "NoSchedule"}]}})
    create(cluster, {"apiVersion": f"kueue.x-k8s.io/{V}", "kind": "ClusterQueue", "metadata": {"name": "team-cq"},
                 "spec": {"namespaceSelector": {},
                          "preemption": {"withinClusterQueue": "LowerPriority"},
                          "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{
                              "name": FLAVOR, "resources": [{"name": "cpu", "nominalQuota": "2"},
                                                            {"name": "memory", "nominalQuota": "8Gi"}]}]}]}})
    create(cluster, {"apiVersion": f"kueue.x-k8s.io/{V}", "kind": "WorkloadPriorityClass",
                 "metadata": {"name": "urgent"}, "value": 1000, "description": "preempts batch work"})
    create(cluster, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "kf-batch"},
                 "value": 10, "description": "batch training"})
    wait(lambda: next((c for c in (kube.get(kres("clusterqueues", False), None, "team-cq") or {}).get(
        "status", {}).get("conditions", []) if c["type"] == "Active" and c["status"] == "True"), None),
        60, "the ClusterQueue to be active")
    return "team-cq"


def job(jobs: Jobs, name: str, steps: int, interval: int, **labels: str) -> dict[str, Any]:
    obj = copy.deepcopy(example("pretrain-tiny.yaml"))
    obj["metadata"] = {"name": name, "labels": labels}
    obj["spec"]["training"]["totalSteps"] = steps
    obj["spec"]["checkpoint"].update(uri=f"s3://kubeforge/checkpoints/{jobs.ns}/{name}", intervalSteps=interval)
    obj["spec"]["runPolicy"]["progressDeadlineSeconds"] = 3600  # queueing and a loaded machine are no hang
    return obj


def workload(jobs: Jobs, name: str) -> dict[str, Any]:
    return jobs.kube.get(kres("workloads"), jobs.ns, f"{name}-workload") or {}


def wl_condition(wl: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (wl.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def explain(jobs: Jobs, *names: str) -> str:
    """What Kueue and the operator last said about these jobs, for a failure message."""
    out = []
    for n in names:
        wl = workload(jobs, n)
        conds = [(c["type"], c["status"], c.get("reason"), c.get("message", "")[:160])
                 for c in (wl.get("status") or {}).get("conditions") or []]
        out.append(f"{n}: job {jobs.status(KIND, n).get('phase')}/{jobs.status(KIND, n).get('message')}; "
                   f"workload active={wl.get('spec', {}).get('active')} "
                   f"admission={bool((wl.get('status') or {}).get('admission'))} conditions={conds}")
    return "\n".join(out)


def step(jobs: Jobs, name: str) -> int:
    return int((jobs.status(KIND, name).get("progress") or {}).get("step") or 0)


def test_real_kueue_quota_suspend_preemption_and_resume(operator: Operator, jobs: Jobs, cluster: ClusterHandle,
                                                        kueue: str):
    cluster.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                    "data/tiny-corpus.jsonl")
    create(cluster, {"apiVersion": f"kueue.x-k8s.io/{V}", "kind": "LocalQueue",
                      "metadata": {"name": "team-a", "namespace": jobs.ns}, "spec": {"clusterQueue": kueue}})

    # --- admission only when quota fits; the admitted gang reports PodsReady
    first = job(jobs, "first", 400, 20)
    first["spec"]["scheduling"] = {"queueName": "team-a"}
    first["spec"]["resources"]["priorityClassName"] = "kf-batch"
    jobs.create(first)
    wait(lambda: len(jobs.pods("first")) == 2, 120, "Kueue to admit the first job and its gang")
    wl = workload(jobs, "first")
    assert wl["spec"]["priority"] == 10 and wl["spec"]["priorityClassRef"]["name"] == "kf-batch"
    pods = jobs.pods("first")
    for p in pods:
        assert p["spec"]["nodeSelector"]["kubernetes.io/os"] == "linux"
    wait(lambda: wl_condition(workload(jobs, "first"), "PodsReady").get("status") == "True", 120,
         "PodsReady on the first job's Workload")

    second = job(jobs, "second", 120, 20, **{"kueue.x-k8s.io/queue-name": "team-a"})
    jobs.create(second)
    wait(lambda: workload(jobs, "second").get("spec"), 60, "the second job's Workload")
    jobs.wait_phase(KIND, "second", {"Queued"}, timeout=60)
    wait(lambda: "couldn't assign flavors" in wl_condition(workload(jobs, "second"), "QuotaReserved").get(
        "message", "") or "insufficient" in wl_condition(workload(jobs, "second"), "QuotaReserved").get(
        "message", "").lower(), 60, "Kueue to say the second job does not fit")
    assert jobs.pods("second") == [], "no pod may exist before Kueue admits the Workload"

    # --- a suspended job gives its quota back, so the waiting one is admitted
    wait(lambda: step(jobs, "first") >= 5, 300, "the first job to train")
    jobs.patch_spec(KIND, "first", {"runPolicy": {"suspend": True}})
    jobs.wait_phase(KIND, "first", {"Suspended"}, timeout=120)
    wait(lambda: not jobs.pods("first"), 120, "the suspended gang to stop")
    wait(lambda: not (workload(jobs, "first").get("status") or {}).get("admission"), 60,
         "the suspended job's quota to be released")
    try:
        wait(lambda: len(jobs.pods("second")) == 2, 240, "Kueue to admit the second job in the freed quota")
    except AssertionError as e:
        log = "\n".join(operator.log().splitlines()[-60:])
        raise AssertionError(f"{e}\n{explain(jobs, 'first', 'second')}\noperator log (tail):\n{log}") from None
    assert workload(jobs, "first")["spec"]["active"] is False

    # --- a higher-priority job preempts the second: eviction -> checkpoint -> re-admission -> resume
    wait(lambda: step(jobs, "second") >= 25, 300, "the second job to pass its first checkpoint")
    urgent = job(jobs, "urgent", 20, 10, **{"kueue.x-k8s.io/queue-name": "team-a",
                                             "kueue.x-k8s.io/priority-class": "urgent"})
    jobs.create(urgent)
    wl = wait(lambda: workload(jobs, "urgent").get("spec"), 60, "the urgent Workload")
    assert wl["priority"] == 1000 and wl["priorityClassRef"]["kind"] == "WorkloadPriorityClass"
    wait(lambda: wl_condition(workload(jobs, "second"), "Evicted").get("reason") == "Preempted"
         or jobs.status(KIND, "second").get("preemptions", 0) >= 1, 120, "Kueue to preempt the second job")
    wait(lambda: not jobs.pods("second"), 120, "the preempted gang to stop")
    st = jobs.status(KIND, "second")
    assert st["restarts"] == 0 and st["preemptions"] >= 1, st
    saved = st["lastCheckpoint"]["step"]
    assert saved >= 20, "the preempted gang must checkpoint before it stops"
    done = jobs.wait_phase(KIND, "urgent", {"Succeeded", "Failed"}, timeout=300)
    assert done["phase"] == "Succeeded", done
    wait(lambda: wl_condition(workload(jobs, "urgent"), "Finished").get("status") == "True", 60,
         "Finished on the urgent Workload")

    # the quota is free again: the second job is re-admitted and resumes from its checkpoint
    resumed = wait(lambda: (lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step", 0) > saved
                            and s)(jobs.status(KIND, "second")), 300, "the second job to resume")
    assert resumed["progress"]["step"] > saved
    end = jobs.wait_phase(KIND, "second", {"Succeeded", "Failed"}, timeout=400)
    assert end["phase"] == "Succeeded" and end["restarts"] == 0, end
    assert "Preempted" in jobs.event_reasons("second") or "Evicted" in jobs.event_reasons("second")

    # the suspended first job is still waiting, holding nothing
    assert jobs.status(KIND, "first")["phase"] == "Suspended" and jobs.pods("first") == []


def test_workload_version_follows_what_the_cluster_serves(kueue: str, cluster: ClusterHandle):
    from kubeforge.controller import kueue as kq

    kube = Jobs(cluster, "default").kube
    served = [v for v in kq.VERSIONS if kube.serves(Resource(kq.GROUP, v, "workloads"), "default")]
    assert served[0] == "v1beta2" and "v1beta1" in served
