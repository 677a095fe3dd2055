"""The whole life of a model on the dev cluster: examples/lifecycle.yaml applied at once, in a shuffled order of
its documents, by the real operator. Every hand-off is checked: each consumer waits with a clear condition
until its source succeeds, pins the source's uid, generation and output in status.source (a re-created source
changes nothing for it), and the served model's provenance (status and /v1/models through the router) is the
whole chain. A second, cheap test: a pre-training that fails fails its three consumers with SourceFailed.

One chain is trained for the module (about five minutes on 2 cores); the failure test trains nothing."""

from __future__ import annotations

import copy
import json
import random
import time
from typing import Any

import httpx
import pytest
import yaml

from kubeforge.controller.kube import RESOURCES, Resource
from kubeforge.devcluster.testing import ClusterHandle
from kubeforge.runtime import lifecycle_data
from kubeforge.runtime import provenance as prov

from .conftest import REPO, Jobs, Operator, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
EXAMPLE = REPO / "examples" / "lifecycle.yaml"
CHAIN = ["PretrainJob", "ContextExtensionJob", "RLJob", "InferenceDeployment"]
PLURALS = {"PretrainJob": "pretrainjobs", "ContextExtensionJob": "contextextensionjobs", "RLJob": "rljobs",
           "InferenceDeployment": "inferencedeployments"}


@pytest.fixture(scope="module", autouse=True)
def data(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return lifecycle_data.upload(cluster.s3_client(), "s3://kubeforge", tmp_path_factory.mktemp("lifecycle"))


def documents(jobs: Jobs) -> dict[str, dict[str, Any]]:
    """The example's documents by kind, in this test's namespace, running this checkout's code."""
    docs = {d["kind"]: d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d}
    assert list(docs) == CHAIN
    code = {"name": "PYTHONPATH", "value": str(REPO / "operator")}
    for kind, d in docs.items():
        d["metadata"]["namespace"] = jobs.ns
        if kind == "InferenceDeployment":
            d["spec"]["pool"]["env"] = [*d["spec"]["pool"].get("env", []), code]
            continue
        d["spec"]["checkpoint"]["uri"] = f"s3://kubeforge/checkpoints/{jobs.ns}/{d['metadata']['name']}"
        d["spec"]["resources"]["env"] = [*d["spec"]["resources"].get("env", []), code]
    return docs


def apply_shuffled(jobs: Jobs, docs: dict[str, dict[str, Any]]) -> list[str]:
    order = list(CHAIN)
    random.Random(time.time_ns()).shuffle(order)
    for kind in order:
        jobs.create(docs[kind])
    return order


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


def diagnose(cluster: ClusterHandle, jobs: Jobs, docs: dict[str, dict[str, Any]], operator: Operator) -> str:
    out = []
    for kind, d in docs.items():
        name = d["metadata"]["name"]
        out.append(f"=== {kind} {name}: {json.dumps(jobs.status(kind, name), indent=1)[-2500:]}")
        for p in jobs.pods(name):
            pod = p["metadata"]["name"]
            try:
                out.append(f"--- pod {pod} ({p['status'].get('phase')}):\n{cluster.pod_log(jobs.ns, pod)[-1500:]}")
            except Exception as exc:  # noqa: BLE001 - a diagnostic
                out.append(f"--- pod {pod}: no log ({exc})")
    out.append(f"operator log:\n{operator.log()[-3000:]}")
    return "\n".join(out)


def waiting_on(jobs: Jobs, kind: str, name: str, source_kind: str, source_name: str) -> dict[str, Any] | None:
    """The consumer's status while it waits for its source: Reconciling, reason WaitingForModel, the source named."""
    st = jobs.status(kind, name)
    c = conditions(st).get("Reconciling") or {}
    ok = (c.get("status") == "True" and c.get("reason") == "WaitingForModel"
          and f"{source_kind} {source_name}" in c.get("message", ""))
    return st if ok else None


def assert_pinned(jobs: Jobs, consumer: dict[str, Any], producer: dict[str, Any]) -> dict[str, Any]:
    """The consumer's status.source is the producer's identity and output, once it has resolved it."""
    kind, name = consumer["kind"], consumer["metadata"]["name"]
    st = wait(lambda: jobs.status(kind, name).get("source") and jobs.status(kind, name), 120,
              f"{kind} {name} to pin its source")
    src = jobs.get(producer["kind"], producer["metadata"]["name"])
    assert src is not None
    pin = st["source"]
    assert (pin["kind"], pin["name"]) == (producer["kind"], producer["metadata"]["name"])
    assert pin["uid"] == src["metadata"]["uid"] and pin["generation"] == src["metadata"]["generation"]
    assert pin["uri"] == src["status"]["output"]["uri"] == st["resolvedModelUri"]
    return st


def kstatus_done(st: dict[str, Any]) -> bool:
    c = conditions(st)
    return (c["Ready"]["status"], c["Reconciling"]["status"], c["Stalled"]["status"]) == ("True", "False", "False")


def ready_router(jobs: Jobs, name: str) -> str:
    def pod_ip() -> str | None:
        for p in jobs.pods(name):
            st = p.get("status") or {}
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
            if p["metadata"]["labels"].get("kubeforge.dev/role") == "router" and ready and st.get("podIP"):
                return str(st["podIP"])
        return None

    return f"http://{wait(pod_ip, 120, 'a ready router pod')}:8000"


@pytest.mark.timeout(1500)  # three trainings and a deployment one after another on a shared 2-core machine
def test_lifecycle_applied_in_any_order_hands_off_pins_and_serves_its_provenance(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle) -> None:
    docs = documents(jobs)
    order = apply_shuffled(jobs, docs)
    try:
        run_chain(jobs, docs, cluster)
    except AssertionError as exc:
        raise AssertionError(f"documents applied in the order {order}: {exc}\n"
                             f"{diagnose(cluster, jobs, docs, operator)}") from None


def run_chain(jobs: Jobs, docs: dict[str, dict[str, Any]], cluster: ClusterHandle) -> None:
    base, long, rl, chat = (docs[k] for k in CHAIN)
    names = {k: d["metadata"]["name"] for k, d in docs.items()}

    # 1) every consumer waits for its source, says so, and has no pod
    for (kind, name), (skind, sname) in zip(list(names.items())[1:], list(names.items())[:-1], strict=True):
        st = wait(lambda k=kind, n=name, sk=skind, sn=sname: waiting_on(jobs, k, n, sk, sn), 120,
                  f"{kind} {name} to wait for {skind} {sname}")
        assert st.get("source") is None and not jobs.pods(name), st
        assert conditions(st)["Ready"]["status"] == "False" and conditions(st)["Stalled"]["status"] == "False"
    assert jobs.status("InferenceDeployment", names["InferenceDeployment"])["phase"] == "WaitingForModel"

    # 2) pre-training succeeds; the extension pins its output and starts
    st = jobs.wait_phase("PretrainJob", names["PretrainJob"], {"Succeeded", "Failed"}, timeout=420)
    assert st["phase"] == "Succeeded" and kstatus_done(st), st
    old_base = jobs.get("PretrainJob", names["PretrainJob"])
    assert old_base is not None
    pinned = assert_pinned(jobs, long, base)

    # 3) the pre-training is deleted and re-created under its name (suspended: it will never run): the
    #    started extension keeps what it pinned
    jobs.kube.delete(RESOURCES["PretrainJob"], jobs.ns, names["PretrainJob"])
    wait(lambda: jobs.get("PretrainJob", names["PretrainJob"]) is None, 60, "the PretrainJob to go")
    again = copy.deepcopy(base)
    again["spec"]["runPolicy"] = {**again["spec"].get("runPolicy", {}), "suspend": True}
    jobs.create(again)
    new_base = wait(lambda: jobs.get("PretrainJob", names["PretrainJob"]), 30, "the re-created PretrainJob")
    assert new_base["metadata"]["uid"] != old_base["metadata"]["uid"]
    wait(lambda: jobs.status("PretrainJob", names["PretrainJob"]).get("phase") == "Suspended", 60,
         "the re-created PretrainJob to be reconciled")

    # 4) the extension finishes on the pinned model; the RL job pins the extension and raises the reward
    st = jobs.wait_phase("ContextExtensionJob", names["ContextExtensionJob"], {"Succeeded", "Failed"}, timeout=480)
    assert st["phase"] == "Succeeded" and kstatus_done(st), st
    assert st["source"] == pinned["source"] and st["source"]["uid"] == old_base["metadata"]["uid"]
    assert [s["state"] for s in st["stages"]] == ["Succeeded", "Succeeded"]
    assert_pinned(jobs, rl, long)
    st = jobs.wait_phase("RLJob", names["RLJob"], {"Succeeded", "Failed"}, timeout=540)
    assert st["phase"] == "Succeeded" and kstatus_done(st), st
    curve = st["rl"]["rewardCurve"]
    late = sum(p["reward"] for p in curve[-10:]) / len(curve[-10:])
    assert st["rl"]["initialReward"] < 0.35 and late > st["rl"]["initialReward"] + 0.3, st["rl"]

    # 5) serving: the RL job's output, pinned; the provenance chain in status and on /v1/models
    pinned_rl = assert_pinned(jobs, chat, rl)
    st = wait(lambda: (lambda s: kstatus_done(s) and s["phase"] == "Ready" and (s.get("model") or {}).get(
        "provenance") and s)(jobs.status("InferenceDeployment", names["InferenceDeployment"])), 300,
        "the InferenceDeployment to be Ready with the model's provenance")
    assert st["model"]["uri"] == pinned_rl["source"]["uri"]
    uids = {k: (jobs.get(k, names[k]) or {})["metadata"]["uid"] for k in CHAIN[1:3]}
    uids["PretrainJob"] = old_base["metadata"]["uid"]  # what was consumed, not the re-created object
    expected = [("RLJob", names["RLJob"], uids["RLJob"]),
                ("ContextExtensionJob", names["ContextExtensionJob"], uids["ContextExtensionJob"]),
                ("PretrainJob", names["PretrainJob"], uids["PretrainJob"])]
    shown = prov.chain(st["model"]["provenance"])
    assert [(p["kind"], p["name"], p["uid"]) for p in shown] == expected
    assert shown[0]["metrics"]["reward"] > 0.5 and "loss" in shown[2]["metrics"]
    assert 0 <= shown[1]["evals"]["needleScore"] <= 1
    assert shown[0]["source"]["uri"] == jobs.status("ContextExtensionJob", names["ContextExtensionJob"])[
        "output"]["uri"]

    url = ready_router(jobs, names["InferenceDeployment"])
    card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
    served = prov.chain(card["provenance"])
    assert [(p["kind"], p["name"], p["uid"]) for p in served] == expected
    assert served[0]["output"] == st["model"]["uri"] and served[2]["source"] is None
    assert served[1]["evals"]["stages"][-1]["seqLen"] == 256
    # greedy completions through the router: the post-trained model adds
    served_name = chat["spec"]["servedModelName"]
    right = 0
    for rec in lifecycle_data.tasks.arithmetic_records(lifecycle_data.MAX_OPERAND):
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": served_name, "prompt": rec["prompt"], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        right += r.json()["choices"][0]["text"].strip() == rec["reference"]
    assert right >= 8, f"{right}/16 right"

    # 6) `kubectl get kubeforge`: the category groups the four kinds
    crds = jobs.kube.list(Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", namespaced=False), None)
    categories = {c["spec"]["names"]["kind"]: c["spec"]["names"].get("categories", []) for c in crds
                  if c["spec"]["group"] == "kubeforge.dev"}
    assert all("kubeforge" in categories[k] for k in CHAIN), categories
    for kind in CHAIN:
        table = jobs.table(PLURALS[kind])
        assert [r["cells"][0] for r in table["rows"]] == [names[kind]]


def test_a_failed_pretraining_fails_every_consumer_with_a_clear_condition(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle) -> None:
    docs = documents(jobs)
    base = docs["PretrainJob"]
    base["spec"]["data"]["uri"] = "s3://kubeforge/data/lifecycle/missing/"  # nothing there: the runtime refuses
    base["spec"]["runPolicy"]["maxRestarts"] = 0
    order = apply_shuffled(jobs, docs)
    names = {k: d["metadata"]["name"] for k, d in docs.items()}
    try:
        st = jobs.wait_phase("PretrainJob", names["PretrainJob"], {"Succeeded", "Failed"}, timeout=300)
        assert st["phase"] == "Failed", st
        for kind, source_kind in zip(CHAIN[1:], CHAIN[:-1], strict=True):
            st = jobs.wait_phase(kind, names[kind], {"Failed"}, timeout=120)
            c = conditions(st)
            assert (c["Stalled"]["status"], c["Stalled"]["reason"]) == ("True", "SourceFailed"), st
            assert f"{source_kind} {names[source_kind]} failed" in c["Stalled"]["message"]
            assert c["Ready"]["status"] == "False" and c["Reconciling"]["status"] == "False"
            if kind != "InferenceDeployment":
                assert c["Failed"]["reason"] == "SourceFailed"
            assert st.get("source") is None and not jobs.pods(names[kind])
            # the event: the reason for a job, the phase for a deployment (which recovers if the name does)
            assert ("Failed" if kind == "InferenceDeployment" else "SourceFailed") in jobs.event_reasons(names[kind])
    except AssertionError as exc:
        raise AssertionError(f"documents applied in the order {order}: {exc}\n"
                             f"{diagnose(cluster, jobs, docs, operator)}") from None

