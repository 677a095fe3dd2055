"""Health as GitOps tools read it, from statuses the real planners write: kstatus (Flux, kubectl wait,
cli-utils) and the Argo CD health scripts shipped in charts/kubeforge/argocd/ (run in Lua 5.1, as Argo CD's
gopher-lua is)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import test_serving_render as sr
from lupa import lua51
from test_training_planner import T0, ctx, gang, job, pod, running_status

from kubeforge.controller.conditions import set_kstatus
from kubeforge.controller.training import Observed, plan

ARGOCD = Path(__file__).resolve().parents[2] / "charts" / "kubeforge" / "argocd"


def kstatus(obj: dict[str, Any]) -> str:
    """cli-utils kstatus' generic rules for a custom resource: InProgress, Failed or Current."""
    status = obj.get("status") or {}
    gen, observed = obj["metadata"].get("generation"), status.get("observedGeneration")
    if gen is not None and observed is not None and observed < gen:
        return "InProgress"
    conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if conds.get("Reconciling") == "True":
        return "InProgress"
    if conds.get("Stalled") == "True":
        return "Failed"
    return "Current"


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    script = "inferencedeployment-health.lua" if obj["kind"] == "InferenceDeployment" else "job-health.lua"
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute((ARGOCD / script).read_text())
    return hs["status"], hs["message"]


def with_status(obj: dict[str, Any], status: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["status"] = status.to_wire()
    return out


def test_a_running_job_is_current_for_kstatus_and_progressing_for_argocd():
    obj = job({"phase": "Starting", "gangCreatedAt": "2026-11-23T12:00:00Z"})
    running = with_status(obj, plan(ctx(obj), Observed(pods=gang()), T0).status)
    assert running["status"]["phase"] == "Running"
    assert kstatus(running) == "Current"  # a Flux wait returns once the gang runs, not after the run
    assert argocd_health(running)[0] == "Progressing"


def test_a_starting_job_is_in_progress():
    obj = job()
    starting = with_status(obj, plan(ctx(obj), Observed(), T0).status)
    assert kstatus(starting) == "InProgress" and argocd_health(starting)[0] == "Progressing"


def test_a_failed_job_is_failed_and_degraded():
    obj = job(running_status(restarts=3))
    failed = with_status(obj, plan(ctx(obj), Observed(pods=[pod(0), pod(1, "Failed", exit_code=1)]), T0).status)
    assert kstatus(failed) == "Failed"
    status, message = argocd_health(failed)
    assert status == "Degraded" and "maxRestarts" in message


def test_a_succeeded_job_is_healthy():
    obj = job(running_status())
    report = '{"outputUri": "s3://kubeforge/checkpoints/ptj/final", "step": 20}'
    pods = [pod(0, "Succeeded", exit_code=0, message=report), pod(1, "Succeeded", exit_code=0)]
    done = with_status(obj, plan(ctx(obj), Observed(pods=pods), T0).status)
    assert done["status"]["phase"] == "Succeeded"
    assert kstatus(done) == "Current" and argocd_health(done)[0] == "Healthy"


def test_a_stalled_serving_pool_is_not_reconciling_and_is_degraded():
    bad = sr.pod(sr.REF_PD, "decode", 0, ready=False, initContainerStatuses=[
        {"name": "fetch-model", "restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])
    st = sr.plan(sr.REF_PD, [sr.pod(sr.REF_PD, "prefill", 0), bad, sr.pod(sr.REF_PD, "router", 0)]).status
    obj = with_status(sr.REF_PD, st)
    conds = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conds["Stalled"] == "True" and conds["Reconciling"] == "False"
    assert kstatus(obj) == "Failed" and argocd_health(obj)[0] == "Degraded"


def test_a_ready_inference_deployment_is_healthy_and_a_new_generation_progressing():
    ready = sr.settle(sr.REF_PD, sr.plan(sr.REF_PD, [sr.pod(sr.REF_PD, r, 0) for r in sr.ALL_UP],
                                         deps=sr.deployments(sr.REF_PD, {})))
    ready = sr.settle(ready, sr.plan(ready, [sr.pod(sr.REF_PD, r, 0) for r in sr.ALL_UP],
                                     deps=sr.deployments(sr.REF_PD, {})))
    assert kstatus(ready) == "Current" and argocd_health(ready)[0] == "Healthy"
    changed = copy.deepcopy(ready)
    changed["metadata"]["generation"] = 2
    assert kstatus(changed) == "InProgress" and argocd_health(changed)[0] == "Progressing"


@pytest.mark.parametrize("kind", ["PretrainJob", "InferenceDeployment"])
def test_an_object_the_operator_has_not_seen_is_progressing(kind):
    assert argocd_health({"kind": kind, "metadata": {"generation": 1}})[0] == "Progressing"


def test_stalled_wins_over_reconciling():
    conds: list = []
    set_kstatus(conds, ready=False, reconciling=True, stalled=True, reason="X", message="m", generation=1, now=T0)
    by = {c.type: c.status for c in conds}
    assert by == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
