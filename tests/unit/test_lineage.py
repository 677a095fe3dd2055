"""model.from hand-offs: waiting, failing and pinning the source output (controller/lineage.py), and what the
training planner, the serving planner and a whole reconcile make of them."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from typing import Any

import pytest
from test_serving_render import REF_PD, SETTINGS, FakeKube

from builders import context_extension_job, pretrain_job, with_
from kubeforge.api.validation import parse_spec
from kubeforge.controller import lineage
from kubeforge.controller import serving as sv
from kubeforge.controller.conditions import rfc3339
from kubeforge.controller.reconciler import Reconciler
from kubeforge.controller.torchrun import TorchrunGang
from kubeforge.controller.training import JobContext, Observed, plan

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
OLD, NEW = "s3://kubeforge/checkpoints/base/final", "s3://kubeforge/checkpoints/base-v2/final"


def source(phase: str | None, uid: str = "uid-a", uri: str | None = OLD, generation: int = 1,
           failed: tuple[str, str] | None = None) -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase} if phase else {}
    if uri and phase == "Succeeded":
        st["output"] = {"uri": uri}
    if failed:
        st["conditions"] = [{"type": "Failed", "status": "True", "reason": failed[0], "message": failed[1]}]
    return {"kind": "PretrainJob", "metadata": {"name": "base", "namespace": "ns1", "uid": uid,
                                                "generation": generation}, "status": st}


PIN = {"kind": "PretrainJob", "name": "base", "uid": "uid-a", "generation": 1, "uri": OLD,
       "resolvedAt": "2026-12-01T11:00:00Z"}


@pytest.mark.parametrize(("consumer", "src", "uri", "waiting", "failed"), [
    (None, None, None, "waiting for PretrainJob base to exist", None),
    (None, source(None), None, "to succeed (model.from; now Pending)", None),
    (None, source("Running"), None, "to succeed (model.from; now Running)", None),
    (None, source("Succeeded", uri=None), None, "now Succeeded", None),  # no output reported yet
    (None, source("Failed", failed=("PodFailed", "pod base-worker-0 failed with exit code 1")), None, None,
     "PretrainJob base failed (PodFailed: pod base-worker-0 failed with exit code 1), so model.from has no output"),
    (None, source("Succeeded"), OLD, None, None),
    # pinned: a re-created source (another uid, another output), a failed one or none at all change nothing
    ({"source": PIN}, source("Succeeded", uid="uid-b", uri=NEW), OLD, None, None),
    ({"source": PIN}, source("Failed", uid="uid-b"), OLD, None, None),
    ({"source": PIN}, None, OLD, None, None),
    # a pin of another object (model.from was changed) is not this one's
    ({"source": {**PIN, "name": "other"}}, source("Running"), None, "now Running", None),
])
def test_resolve(consumer, src, uri, waiting, failed):
    got = lineage.resolve("PretrainJob", "base", consumer, src, T0)
    assert got.uri == uri
    assert (got.waiting is None) == (waiting is None)
    if waiting is not None:
        assert waiting in str(got.waiting)
    assert got.failed == failed
    if uri:
        assert got.pinned is not None and got.pinned.uri == uri
        pinned = consumer["source"] if consumer else {"uid": src["metadata"]["uid"], "generation": 1}
        assert (got.pinned.uid, got.pinned.generation) == (pinned["uid"], pinned["generation"])
    if uri and consumer is None:
        assert got.pinned.resolved_at == rfc3339(T0)  # type: ignore[union-attr]


# --- the training planner --------------------------------------------------------------------------------


def cej(status: dict | None = None) -> dict:
    obj = context_extension_job("long", model={"from": {"kind": "PretrainJob", "name": "base"}},
                                resources={"numNodes": 1, "processesPerNode": 1},
                                sequenceParallel={"impl": "zigzag", "degree": 1},
                                checkpoint={"uri": "s3://kubeforge/checkpoints/long",
                                            "secretRef": {"name": "kubeforge-s3"}})
    obj["metadata"].update(namespace="ns1", uid="uid-c", generation=2)
    if status is not None:
        obj["status"] = status
    return obj


def ctx(obj: dict) -> JobContext:
    spec = parse_spec(obj)
    builder = TorchrunGang(obj=obj, resources=spec.resources, scheduling=spec.scheduling,
                           module="kubeforge.runtime.extend", resolved_spec=spec.to_wire(),
                           secret_name="kubeforge-s3", s3_endpoint=None)
    return JobContext(obj=obj, spec=spec, builder=builder)


def conds(status: Any) -> dict[str, Any]:
    return {c.type: c for c in status.conditions}


def test_a_waiting_job_says_what_it_waits_for_in_kstatus_terms():
    src = lineage.resolve("PretrainJob", "base", None, source("Running"), T0)
    p = plan(ctx(cej()), Observed(source=src), T0)
    c = conds(p.status)
    assert p.create == [] and p.status.phase == "Pending" and p.status.source is None
    assert (c["Reconciling"].status, c["Reconciling"].reason) == ("True", "WaitingForModel")
    assert "PretrainJob base" in c["Reconciling"].message and "now Running" in c["Reconciling"].message
    assert (c["Ready"].status, c["Ready"].reason, c["Stalled"].status) == ("False", "WaitingForModel", "False")


def test_a_failed_source_fails_the_job_and_the_reason_stays():
    src = lineage.resolve("PretrainJob", "base", None, source("Failed", failed=("InvalidSpec", "no data")), T0)
    p = plan(ctx(cej()), Observed(source=src), T0)
    c = conds(p.status)
    assert p.status.phase == "Failed" and p.create == []
    assert (c["Failed"].reason, c["Stalled"].status, c["Stalled"].reason) == ("SourceFailed", "True", "SourceFailed")
    assert c["Reconciling"].status == "False" and "InvalidSpec: no data" in c["Stalled"].message
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "SourceFailed")]
    # the next reconciles (terminal) keep the cause in Stalled instead of a bare "Failed"
    again = plan(ctx(cej(p.status.to_wire())), Observed(source=src), T0)
    assert conds(again.status)["Stalled"].reason == "SourceFailed" and again.events == []


def test_the_first_resolution_is_pinned_in_the_status_with_an_event():
    src = lineage.resolve("PretrainJob", "base", None, source("Succeeded", generation=4), T0)
    p = plan(ctx(cej()), Observed(source=src), T0)
    assert p.status.source is not None and p.status.phase == "Starting"
    assert p.status.source.to_wire() == {"kind": "PretrainJob", "name": "base", "uid": "uid-a", "generation": 4,
                                         "uri": OLD, "resolvedAt": rfc3339(T0)}
    assert p.status.resolved_model_uri == OLD
    assert ("Normal", "SourceResolved") in [(e.type, e.reason) for e in p.events]
    assert conds(p.status)["Reconciling"].reason == "Starting"


# --- whole reconciles against an in-memory API ------------------------------------------------------------


def spec_uri(kube: FakeKube, name: str) -> str:
    cm = next(o for (k, _, n), o in kube.store.items() if k == "ConfigMap" and n.startswith(name))
    return json.loads(next(iter(cm["data"].values())))["spec"]["model"]["uri"]


def test_a_started_consumer_keeps_its_source_when_the_source_is_re_created():
    kube = FakeKube(cej(), source("Running"))
    r = Reconciler(kube, SETTINGS, clock=lambda: T0)  # type: ignore[arg-type]
    r.reconcile("ContextExtensionJob", "ns1", "long")
    assert not [c for c in kube.calls if c[0] == "create"]  # waits: nothing made
    kube.store[("PretrainJob", "ns1", "base")] = source("Succeeded")
    r.reconcile("ContextExtensionJob", "ns1", "long")
    st = kube.store[("ContextExtensionJob", "ns1", "long")]["status"]
    assert st["source"]["uid"] == "uid-a" and spec_uri(kube, "long") == OLD
    # the source is deleted and re-created under its name, producing something else
    kube.store[("PretrainJob", "ns1", "base")] = source("Succeeded", uid="uid-b", uri=NEW)
    r.reconcile("ContextExtensionJob", "ns1", "long")
    st = kube.store[("ContextExtensionJob", "ns1", "long")]["status"]
    assert st["source"]["uid"] == "uid-a" and st["resolvedModelUri"] == OLD and spec_uri(kube, "long") == OLD
    del kube.store[("PretrainJob", "ns1", "base")]
    r.reconcile("ContextExtensionJob", "ns1", "long")
    assert kube.store[("ContextExtensionJob", "ns1", "long")]["status"]["phase"] != "Pending"


def served(obj: dict) -> dict:
    out = copy.deepcopy(obj)
    out["spec"]["model"] = {"from": {"kind": "PretrainJob", "name": "base"}, "secretRef": {"name": "kubeforge-s3"}}
    return out


def init_uri(kube: FakeKube) -> str:
    dep = kube.store[("Deployment", "ns1", "tiny-decode")]
    return str(dep["spec"]["template"]["spec"]["initContainers"][0]["command"][3])


def test_serving_waits_fails_and_pins():
    kube = FakeKube(served(REF_PD), source("Failed", failed=("BackoffLimitExceeded", "maxRestarts (0) exhausted")))
    r = Reconciler(kube, SETTINGS, clock=lambda: T0)  # type: ignore[arg-type]
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    st = kube.store[("InferenceDeployment", "ns1", "tiny")]["status"]
    c = {x["type"]: x for x in st["conditions"]}
    assert st["phase"] == "Failed" and (c["Stalled"]["status"], c["Stalled"]["reason"]) == ("True", "SourceFailed")
    assert "BackoffLimitExceeded" in c["Stalled"]["message"] and c["Reconciling"]["status"] == "False"
    assert ("Warning", "Failed") in kube.events and not [x for x in kube.calls if x[0] == "create"]
    # not terminal: the name re-created and succeeding is served, and pinned
    kube.store[("PretrainJob", "ns1", "base")] = source("Succeeded", uid="uid-b", uri=NEW, generation=2)
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    st = kube.store[("InferenceDeployment", "ns1", "tiny")]["status"]
    assert (st["source"]["uid"], st["source"]["generation"], st["source"]["uri"]) == ("uid-b", 2, NEW)
    assert init_uri(kube) == NEW and st["model"]["uri"] == NEW and ("Normal", "SourceResolved") in kube.events
    # re-created once more: what is served does not move
    kube.store[("PretrainJob", "ns1", "base")] = source("Succeeded", uid="uid-c", uri=OLD)
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    st = kube.store[("InferenceDeployment", "ns1", "tiny")]["status"]
    assert st["source"]["uid"] == "uid-b" and init_uri(kube) == NEW and st["resolvedModelUri"] == NEW


# --- provenance in the serving status ---------------------------------------------------------------------


def engine_pod(role: str, message: str | None, created: str = "2026-12-01T12:00:00Z", code: int = 0) -> dict:
    term = {"exitCode": code, **({"message": message} if message is not None else {})}
    return {"metadata": {"name": f"tiny-{role}-x", "creationTimestamp": created,
                         "labels": {"kubeforge.dev/job-name": "tiny", "kubeforge.dev/role": role}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                       "initContainerStatuses": [{"name": sv.FETCH_CONTAINER, "state": {"terminated": term}}]}}


def test_the_fetch_containers_provenance_reaches_status_model():
    prov = {"kind": "RLJob", "name": "rl", "metrics": {"reward": 0.9},
            "source": {"uri": OLD, "provenance": {"kind": "PretrainJob", "name": "base"}}}
    msg = json.dumps({"uri": OLD, "provenance": prov})
    newer = json.dumps({"uri": OLD, "provenance": {**prov, "name": "rl-newer"}})
    pods = [engine_pod("decode", msg), engine_pod("prefill", newer, created="2026-12-01T12:05:00Z"),
            engine_pod("decode", "model fetch failed: no objects", code=1), engine_pod("decode", "not json"),
            engine_pod("router", json.dumps({"provenance": {"kind": "junk"}}), created="2026-12-02T00:00:00Z")]
    assert sv.served_provenance(pods) == {**prov, "name": "rl-newer"}
    assert sv.served_provenance(pods[2:4]) is None
    spec = parse_spec(REF_PD)
    st = sv.plan_serving(REF_PD, spec, sv.ServingObserved(source=lineage.Source(uri=OLD), pods=pods[:1]), T0).status
    assert st.model is not None and st.model.uri == OLD and st.model.provenance == prov
    # pods replaced (none reports yet): the provenance already known for this URI stays
    obj = with_(REF_PD, "status", st.to_wire())
    st2 = sv.plan_serving(obj, spec, sv.ServingObserved(source=lineage.Source(uri=OLD)), T0).status
    assert st2.model is not None and st2.model.provenance == prov
    # another model: the old provenance does not describe it
    st3 = sv.plan_serving(obj, spec, sv.ServingObserved(source=lineage.Source(uri=NEW)), T0).status
    assert st3.model is not None and st3.model.uri == NEW and st3.model.provenance is None


def test_pretrain_job_unaffected_without_model_from():
    obj = pretrain_job("p", "ns1")
    obj["metadata"].update(uid="u", generation=1)
    src = lineage.Source(uri=None)
    spec = parse_spec(obj)
    builder = TorchrunGang(obj=obj, resources=spec.resources, scheduling=spec.scheduling,
                           module="kubeforge.runtime.pretrain", resolved_spec=spec.to_wire(), secret_name=None,
                           s3_endpoint=None)
    p = plan(JobContext(obj=obj, spec=spec, builder=builder), Observed(source=src), T0)
    assert p.status.source is None and p.status.phase == "Starting"
