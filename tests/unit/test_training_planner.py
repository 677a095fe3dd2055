"""The training-job planner: a pure function of (job, observed pods/Workload, now)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from builders import pretrain_job, with_
from kubeforge import contract
from kubeforge.api.validation import parse_spec
from kubeforge.controller import kueue
from kubeforge.controller.conditions import rfc3339
from kubeforge.controller.torchrun import TorchrunGang
from kubeforge.controller.training import SURVIVOR_GRACE_S, JobContext, Observed, Source, plan

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def job(status: dict | None = None, **spec) -> dict:
    obj = pretrain_job("ptj", "ns1", **spec)
    obj["metadata"].update(uid="uid-1", generation=3)
    obj["spec"]["checkpoint"]["secretRef"] = {"name": "kubeforge-s3"}
    if status is not None:
        obj["status"] = status
    return obj


def ctx(obj: dict) -> JobContext:
    spec = parse_spec(obj)
    builder = TorchrunGang(obj=obj, resources=spec.resources, scheduling=spec.scheduling,
                           module="kubeforge.runtime.pretrain", resolved_spec=spec.to_wire(),
                           secret_name="kubeforge-s3", s3_endpoint=None,
                           grace_seconds=spec.run_policy.termination_grace_period_seconds)
    return JobContext(obj=obj, spec=spec, builder=builder, workload_version="v1beta2")


def pod(rank: int, phase: str = "Running", attempt: int = 0, exit_code: int | None = None, message: str = "",
        reason: str | None = None, deleting: bool = False, annotations: dict | None = None) -> dict:
    p = {
        "metadata": {
            "name": f"ptj-worker-{rank}",
            "labels": {contract.LABEL_REPLICA_INDEX: str(rank), contract.LABEL_ATTEMPT: str(attempt)},
            "annotations": annotations or {},
        },
        "status": {"phase": phase},
    }
    if exit_code is not None:
        p["status"]["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "message": message}}}]
    if reason:
        p["status"]["reason"] = reason
    if deleting:
        p["metadata"]["deletionTimestamp"] = rfc3339(T0)
    return p


def gang(phase: str = "Running", attempt: int = 0) -> list[dict]:
    return [pod(0, phase, attempt), pod(1, phase, attempt)]


@pytest.mark.parametrize(("model_secret", "data_secret", "expected"), [
    (None, None, [{"secretRef": {"name": "kubeforge-s3"}}]),
    # the checkpoint Secret is not rendered twice
    ("kubeforge-s3", "kubeforge-s3", [{"secretRef": {"name": "kubeforge-s3"}}]),
    ("hub-models", None, [{"secretRef": {"name": "kubeforge-s3"}},
                          {"prefix": contract.MODEL_CREDENTIALS_PREFIX, "secretRef": {"name": "hub-models"}}]),
    ("hub-models", "corpora", [
        {"secretRef": {"name": "kubeforge-s3"}},
        {"prefix": contract.MODEL_CREDENTIALS_PREFIX, "secretRef": {"name": "hub-models"}},
        {"prefix": contract.DATA_CREDENTIALS_PREFIX, "secretRef": {"name": "corpora"}}]),
])
def test_model_and_data_credentials_reach_the_pods_apart_from_the_checkpoint_ones(model_secret, data_secret,
                                                                                  expected):
    c = ctx(job())
    c.builder.model_secret_name, c.builder.data_secret_name = model_secret, data_secret
    p = plan(c, Observed(), T0)
    for pod_ in (m for m in p.create if m["kind"] == "Pod"):
        assert pod_["spec"]["containers"][0]["envFrom"] == expected


def running_status(**extra) -> dict:
    return {"phase": "Running", "attempt": 0, "gangCreatedAt": rfc3339(T0 - timedelta(minutes=5)),
            "startTime": rfc3339(T0 - timedelta(minutes=4)), **extra}


def cond(status, type_):
    return next((c for c in status.conditions if c.type == type_), None)


# --- creating the gang -----------------------------------------------------------------------------------


def test_new_job_creates_the_whole_gang_with_its_support_objects():
    p = plan(ctx(job()), Observed(), T0)
    kinds = [m["kind"] for m in p.create]
    assert kinds == ["Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Pod", "Pod"]
    pods = [m for m in p.create if m["kind"] == "Pod"]
    assert [m["metadata"]["name"] for m in pods] == ["ptj-worker-0", "ptj-worker-1"]
    for rank, m in enumerate(pods):
        labels = m["metadata"]["labels"]
        assert labels[contract.LABEL_JOB_NAME] == "ptj" and labels[contract.LABEL_JOB_KIND] == "PretrainJob"
        assert labels[contract.LABEL_ROLE] == "worker" and labels[contract.LABEL_REPLICA_INDEX] == str(rank)
        assert labels[contract.LABEL_ATTEMPT] == "0"
        assert m["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        cmd = m["spec"]["containers"][0]["command"]
        assert cmd[:3] == ["python", "-m", "kubeforge.runtime.launch"]
        assert f"--node-rank={rank}" in cmd and "--nnodes=2" in cmd and cmd[-2:] == ["-m", "kubeforge.runtime.pretrain"]
        assert "--master-addr=ptj-worker-0.ptj.ns1.svc" in cmd
        env = {e["name"]: e for e in m["spec"]["containers"][0]["env"]}
        assert env["NODE_RANK"]["value"] == str(rank) and env["MASTER_ADDR"]["value"] == "ptj-worker-0.ptj.ns1.svc"
        assert env[contract.ENV_POD_NAME]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert m["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "kubeforge-s3"}}]
        assert m["spec"]["restartPolicy"] == "Never" and m["spec"]["subdomain"] == "ptj"
        assert m["spec"]["serviceAccountName"] == "ptj-runtime"
    role = next(m for m in p.create if m["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "resourceNames": ["ptj-worker-0", "ptj-worker-1"], "verbs": ["patch"]}]
    spec_file = json.loads(next(m for m in p.create if m["kind"] == "ConfigMap")["data"]["job.json"])
    assert spec_file["kind"] == "PretrainJob" and spec_file["spec"]["training"]["totalSteps"] == 20
    assert p.status.phase == "Starting" and p.status.gang_created_at == rfc3339(T0)
    assert [e.reason for e in p.events] == ["GangCreated"]
    assert p.status.observed_generation == 3


def test_replanning_with_the_gang_present_creates_nothing():
    first = plan(ctx(job()), Observed(), T0)
    again = plan(ctx(job(first.status.to_wire())), Observed(pods=gang("Pending")), T0 + timedelta(seconds=5))
    assert again.create == [] and again.delete_pods == []
    assert again.status.phase == "Starting" and again.events == []


def test_all_pods_running_is_running():
    p = plan(ctx(job({"phase": "Starting", "gangCreatedAt": rfc3339(T0)})), Observed(pods=gang()), T0)
    assert p.status.phase == "Running" and p.status.start_time == rfc3339(T0)
    assert cond(p.status, "Admitted").reason == "GangScheduled" and cond(p.status, "Running").status == "True"
    # converged: kstatus Current while the job runs (Ready is for the finished job)
    assert cond(p.status, "Ready").status == "False" and cond(p.status, "Reconciling").status == "False"


# --- failures --------------------------------------------------------------------------------------------


def test_a_failed_pod_tears_down_the_whole_gang_with_backoff():
    pods = [pod(0), pod(1, "Failed", exit_code=1, message="NCCL timeout")]
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0)
    assert sorted(p.delete_pods) == ["ptj-worker-0", "ptj-worker-1"]
    assert p.status.attempt == 1 and p.status.restarts == 1 and p.status.preemptions == 0
    assert p.status.backoff_until == rfc3339(T0 + timedelta(seconds=10)) and p.status.phase == "Restarting"
    assert p.events[0].type == "Warning" and p.events[0].reason == "PodFailed"
    assert "ptj-worker-1 failed with exit code 1: NCCL timeout" in p.events[0].message
    # the survivor cannot save without its peer: a short grace, not runPolicy's 300 s
    assert p.delete_grace_seconds == SURVIVOR_GRACE_S < 300
    short = job(running_status(), runPolicy={"terminationGracePeriodSeconds": 10})
    assert plan(ctx(short), Observed(pods=pods), T0).delete_grace_seconds == 10


def test_a_gang_stopped_whole_keeps_its_pods_own_grace_to_save():
    pods = [pod(0, "Failed", reason="Evicted"), pod(1)]
    assert plan(ctx(job(running_status())), Observed(pods=pods), T0).delete_grace_seconds is None
    suspended = job(running_status(), runPolicy={"suspend": True})
    p = plan(ctx(suspended), Observed(pods=gang()), T0)
    assert p.delete_pods and p.delete_grace_seconds is None


def test_next_gang_waits_for_old_pods_and_backoff_then_uses_the_next_attempt():
    status = running_status(attempt=1, restarts=1, phase="Restarting", gangCreatedAt=None,
                            backoffUntil=rfc3339(T0 + timedelta(seconds=10)))
    terminating = [pod(0, deleting=True), pod(1, "Failed", exit_code=1, deleting=True)]
    p = plan(ctx(job(status)), Observed(pods=terminating), T0)
    assert p.create == [] and p.status.phase == "Restarting"
    p = plan(ctx(job(status)), Observed(), T0 + timedelta(seconds=5))
    assert p.create == [] and p.status.phase == "Restarting"
    p = plan(ctx(job(status)), Observed(), T0 + timedelta(seconds=11))
    pods = [m for m in p.create if m["kind"] == "Pod"]
    assert {m["metadata"]["labels"][contract.LABEL_ATTEMPT] for m in pods} == {"1"}
    assert p.status.phase == "Starting"


def test_backoff_doubles_per_restart_and_is_capped():
    pods = [pod(0, "Failed", exit_code=137), pod(1)]
    p = plan(ctx(job(running_status(restarts=2), runPolicy={"maxRestarts": 5, "backoffSeconds": 10})),
             Observed(pods=pods), T0)
    assert p.status.backoff_until == rfc3339(T0 + timedelta(seconds=40))
    c = ctx(job(running_status(restarts=4), runPolicy={"maxRestarts": 9, "backoffSeconds": 100}))
    c.backoff_cap_seconds = 300
    assert plan(c, Observed(pods=pods), T0).status.backoff_until == rfc3339(T0 + timedelta(seconds=300))


def test_exhausted_restart_budget_fails_the_job():
    pods = [pod(0), pod(1, "Failed", exit_code=1)]
    p = plan(ctx(job(running_status(restarts=3))), Observed(pods=pods), T0)
    assert p.status.phase == "Failed" and p.status.completion_time == rfc3339(T0)
    failed = cond(p.status, "Failed")
    assert failed.status == "True" and failed.reason == "BackoffLimitExceeded"
    assert "maxRestarts (3) exhausted" in failed.message
    assert cond(p.status, "Stalled").status == "True" and cond(p.status, "Reconciling").status == "False"
    assert sorted(p.delete_pods) == ["ptj-worker-0"]  # the failed one is already done


def test_invalid_spec_exit_code_fails_at_once_without_restarts():
    pods = [pod(0, "Failed", exit_code=contract.EXIT_INVALID_SPEC, message="data.uri holds no objects"), pod(1)]
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0)
    assert p.status.phase == "Failed" and p.status.restarts == 0
    assert cond(p.status, "Failed").reason == "InvalidSpec"
    assert "ptj-worker-0: data.uri holds no objects" in cond(p.status, "Failed").message


def test_exit_78_takes_the_reason_the_runtime_wrote():
    msg = json.dumps({"reason": "CheckpointsUnusable", "message": "every checkpoint was rejected"})
    pods = [pod(0, "Failed", exit_code=contract.EXIT_INVALID_SPEC, message=msg), pod(1)]
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0)
    assert p.status.phase == "Failed" and p.status.restarts == 0
    assert cond(p.status, "Failed").reason == "CheckpointsUnusable"
    assert cond(p.status, "Failed").message == "ptj-worker-0: every checkpoint was rejected"


def test_a_failed_pod_being_deleted_is_still_a_failure():
    """The operator deleted the gang of a failure and died before its status write: the next reconcile sees
    the failed pod terminating. That is a failure (restart budget), not a preemption."""
    pods = [pod(0, deleting=True), pod(1, "Failed", exit_code=1, message="NCCL timeout", deleting=True)]
    p = plan(ctx(job(running_status(restarts=3))), Observed(pods=pods), T0)
    assert p.status.phase == "Failed" and p.status.preemptions == 0
    assert cond(p.status, "Failed").reason == "BackoffLimitExceeded"


def test_a_partially_created_gang_is_completed_not_torn_down():
    """A create that failed half-way (a ResourceQuota refusing the second pod) leaves part of the gang: the
    next reconcile creates the missing pods instead of deleting the present ones and starting over."""
    status = running_status(phase="Starting", startTime=None)
    p = plan(ctx(job(status)), Observed(pods=[pod(0, "Pending")]), T0)
    assert p.delete_pods == [] and p.status.preemptions == 0 and p.status.attempt == 0
    assert [m["metadata"]["name"] for m in p.create if m["kind"] == "Pod"] == ["ptj-worker-1"]


def test_pods_of_a_previous_object_with_the_same_name_are_waited_for():
    """A job deleted and created again (GitOps) under the same name: the old object's pods, still
    terminating, are not the new one's; it waits for them instead of adopting them."""
    old = [dict(pod(r, deleting=True), metadata=dict(pod(r, deleting=True)["metadata"],
                                                         ownerReferences=[{"uid": "old-uid"}])) for r in (0, 1)]
    p = plan(ctx(job()), Observed(pods=[], foreign=old), T0)
    assert [m for m in p.create if m["kind"] == "Pod"] == [] and p.delete_pods == []
    assert "previous" in p.status.message and p.requeue_after


def test_sigterm_grace_comes_from_the_run_policy():
    """The pods' grace must cover finishing a step plus a whole checkpoint upload, which only the user can
    size (model, bandwidth): runPolicy.terminationGracePeriodSeconds, stored with its default."""
    default = [m for m in plan(ctx(job()), Observed(), T0).create if m["kind"] == "Pod"]
    assert {m["spec"]["terminationGracePeriodSeconds"] for m in default} == {300}
    big = job(runPolicy={"terminationGracePeriodSeconds": 1800})
    pods = [m for m in plan(ctx(big), Observed(), T0).create if m["kind"] == "Pod"]
    assert {m["spec"]["terminationGracePeriodSeconds"] for m in pods} == {1800}


def test_eviction_restarts_without_spending_the_budget():
    pods = [pod(0, "Failed", reason="Evicted"), pod(1)]
    p = plan(ctx(job(running_status(restarts=3))), Observed(pods=pods), T0)
    assert p.status.phase == "Restarting" and p.status.restarts == 3 and p.status.preemptions == 1
    assert p.status.backoff_until is None and p.events[0].reason == "Preempted"


def test_a_pod_deleted_by_someone_else_restarts_the_gang():
    p = plan(ctx(job(running_status())), Observed(pods=[pod(0), pod(1, deleting=True)]), T0)
    assert p.status.attempt == 1 and p.status.preemptions == 1 and p.delete_pods == ["ptj-worker-0"]
    p = plan(ctx(job(running_status())), Observed(pods=[pod(0)]), T0)
    assert p.status.attempt == 1 and p.events[0].reason == "PodMissing"


def test_builtin_gang_not_placed_in_time_is_released():
    status = {"phase": "Starting", "attempt": 0, "gangCreatedAt": rfc3339(T0)}
    obj = job(status, scheduling={"scheduleTimeoutSeconds": 60})
    pods = [pod(0, "Running"), pod(1, "Pending")]
    assert plan(ctx(obj), Observed(pods=pods), T0 + timedelta(seconds=30)).delete_pods == []
    p = plan(ctx(obj), Observed(pods=pods), T0 + timedelta(seconds=61))
    assert sorted(p.delete_pods) == ["ptj-worker-0", "ptj-worker-1"]
    assert p.status.restarts == 0 and p.status.preemptions == 1 and p.events[0].reason == "GangScheduleTimeout"
    assert p.status.backoff_until == rfc3339(T0 + timedelta(seconds=71))


def test_no_progress_within_the_deadline_is_a_hang():
    old = rfc3339(T0 - timedelta(seconds=200))
    pods = [pod(0, annotations={contract.PROGRESS_ANNOTATION: json.dumps({"step": 3, "time": old})}), pod(1)]
    obj = job(running_status(), runPolicy={"progressDeadlineSeconds": 120})
    p = plan(ctx(obj), Observed(pods=pods), T0)
    assert p.status.restarts == 1 and p.events[0].reason == "ProgressDeadlineExceeded"
    fresh = [pod(0, annotations={contract.PROGRESS_ANNOTATION: json.dumps({"step": 3, "time": rfc3339(T0)})}), pod(1)]
    assert plan(ctx(obj), Observed(pods=fresh), T0).status.phase == "Running"


# --- success, deadlines, suspension ----------------------------------------------------------------------


def test_success_records_output_and_progress():
    final = json.dumps({"outputUri": "s3://kubeforge/checkpoints/ptj/final", "step": 20, "loss": 2.5})
    report = json.dumps({"step": 20, "totalSteps": 20, "tokens": 5120, "loss": 2.5, "time": rfc3339(T0)})
    pods = [pod(0, "Succeeded", exit_code=0, message=final, annotations={contract.PROGRESS_ANNOTATION: report}),
            pod(1, "Succeeded", exit_code=0)]
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0)
    assert p.status.phase == "Succeeded" and p.status.output.uri == "s3://kubeforge/checkpoints/ptj/final"
    assert p.status.progress.step == 20 and p.status.progress.percent == 100
    assert cond(p.status, "Succeeded").status == "True" and cond(p.status, "Ready").status == "True"
    assert p.delete_pods == []


def test_progress_annotation_becomes_status():
    report = {"step": 5, "totalSteps": 20, "tokens": 1280, "loss": 3.1, "tokensPerSecond": 51.2,
              "time": rfc3339(T0), "lastCheckpoint": {"uri": "s3://kubeforge/c/step-00000005", "step": 5}}
    pods = [pod(0, annotations={contract.PROGRESS_ANNOTATION: json.dumps(report)}), pod(1)]
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0)
    prog = p.status.progress
    assert (prog.step, prog.percent, prog.loss, prog.eta) == (5, 25, 3.1, "1m15s")
    assert p.status.last_checkpoint.step == 5


def test_a_non_finite_loss_in_a_report_keeps_the_status_writable():
    """Python's json reads a bare NaN (an older runtime wrote them); the API server rejects one, so the status
    would freeze on the first diverged step."""
    raw = '{"step": 7, "totalSteps": 20, "tokens": 10, "loss": NaN, "tokensPerSecond": Infinity}'
    pods = [pod(0, annotations={contract.PROGRESS_ANNOTATION: raw}), pod(1)]
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0)
    assert p.status.progress.step == 7 and p.status.progress.loss is None
    json.dumps(p.status.to_wire(), allow_nan=False)  # what the API server accepts


def test_ttl_deletes_the_finished_job():
    status = {"phase": "Succeeded", "completionTime": rfc3339(T0)}
    obj = job(status, runPolicy={"ttlSecondsAfterFinished": 60})
    assert not plan(ctx(obj), Observed(), T0 + timedelta(seconds=30)).delete_job
    assert plan(ctx(obj), Observed(), T0 + timedelta(seconds=61)).delete_job


def test_active_deadline_fails_with_deadline_exceeded():
    obj = job(running_status(), runPolicy={"activeDeadlineSeconds": 60})
    p = plan(ctx(obj), Observed(pods=gang()), T0)
    assert p.status.phase == "Failed" and cond(p.status, "Failed").reason == "DeadlineExceeded"
    assert sorted(p.delete_pods) == ["ptj-worker-0", "ptj-worker-1"]


def test_suspend_stops_the_gang_and_resume_starts_the_next_attempt():
    obj = job(running_status(), runPolicy={"suspend": True})
    p = plan(ctx(obj), Observed(pods=gang()), T0)
    assert sorted(p.delete_pods) == ["ptj-worker-0", "ptj-worker-1"] and p.status.phase == "Suspended"
    assert p.status.attempt == 1 and p.status.restarts == 0 and p.status.preemptions == 0
    assert "stopping 2 pods" in p.status.message
    obj = job(p.status.to_wire(), runPolicy={"suspend": True})
    p = plan(ctx(obj), Observed(), T0 + timedelta(seconds=30))
    assert p.status.phase == "Suspended" and cond(p.status, "Suspended").status == "True"
    assert cond(p.status, "Reconciling").status == "False"
    resumed = plan(ctx(job(p.status.to_wire())), Observed(), T0 + timedelta(seconds=60))
    assert [m["metadata"]["labels"][contract.LABEL_ATTEMPT] for m in resumed.create if m["kind"] == "Pod"] == ["1", "1"]


def test_conditions_move_transition_time_only_on_flips():
    p1 = plan(ctx(job({"phase": "Starting", "gangCreatedAt": rfc3339(T0)})), Observed(pods=gang()), T0)
    later = T0 + timedelta(minutes=1)
    p2 = plan(ctx(job(p1.status.to_wire())), Observed(pods=gang()), later)
    assert cond(p2.status, "Running").last_transition_time == rfc3339(T0)
    assert p2.status.to_wire() == p1.status.to_wire()


# --- model.from --------------------------------------------------------------------------------------------


def test_waits_for_the_source_job():
    p = plan(ctx(job()), Observed(source=Source(waiting="waiting for PretrainJob base to succeed")), T0)
    assert p.create == [] and p.status.phase == "Pending" and "PretrainJob base" in p.status.message
    p = plan(ctx(job()), Observed(source=Source(failed="PretrainJob base failed")), T0)
    assert p.status.phase == "Failed" and cond(p.status, "Failed").reason == "SourceFailed"


# --- gang backends ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "api_version", "scheduler"), [
    ("volcano", "scheduling.volcano.sh/v1beta1", "volcano"),
    ("coscheduling", "scheduling.x-k8s.io/v1alpha1", "scheduler-plugins-scheduler"),
])
def test_podgroup_backends(backend, api_version, scheduler):
    obj = job(scheduling={"gang": backend, "scheduleTimeoutSeconds": 90},
              resources={"numNodes": 2, "processesPerNode": 1, "requests": {"nvidia.com/gpu": 4}})
    p = plan(ctx(obj), Observed(), T0)
    group = next(m for m in p.create if m["kind"] == "PodGroup")
    assert group["apiVersion"] == api_version and group["metadata"]["name"] == "ptj-gang"
    assert group["spec"]["minMember"] == 2 and group["spec"]["minResources"] == {"nvidia.com/gpu": "8"}
    for m in (m for m in p.create if m["kind"] == "Pod"):
        assert m["spec"]["schedulerName"] == scheduler
        assert m["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
        if backend == "volcano":
            assert m["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "ptj-gang"
        else:
            assert m["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "ptj-gang"
            assert group["spec"]["scheduleTimeoutSeconds"] == 90


def workload(admitted: bool = False, evicted: bool = False, admission: bool = True) -> dict:
    conds = []
    if admitted:
        conds.append({"type": "Admitted", "status": "True", "reason": "Admitted", "message": "",
                      "lastTransitionTime": rfc3339(T0)})
    if evicted:
        conds.append({"type": "Evicted", "status": "True", "reason": "Preempted", "message": "by a higher priority",
                      "lastTransitionTime": rfc3339(T0)})
    status = {"conditions": conds}
    if admission and (admitted or evicted):
        status["admission"] = {"clusterQueue": "cq", "podSetAssignments": [
            {"name": "worker", "count": 2, "flavors": {"nvidia.com/gpu": "a100", "cpu": "a100"}}]}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": "ptj-workload", "namespace": "ns1", "generation": 1, "resourceVersion": "41"},
            "spec": {"active": True}, "status": status}


FLAVOR = {"a100": {"spec": {"nodeLabels": {"gpu": "a100"},
                            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}


def kjob(status=None):
    return job(status, scheduling={"queueName": "team-a", "priority": 100})


def test_kueue_creates_a_workload_and_no_pod_until_admitted():
    p = plan(ctx(kjob()), Observed(), T0)
    assert [m for m in p.create if m["kind"] == "Pod"] == [] and p.status.phase == "Queued"
    wl = p.workload
    assert wl["apiVersion"] == "kueue.x-k8s.io/v1beta2" and wl["spec"]["queueName"] == "team-a"
    assert wl["metadata"]["labels"][kueue.QUEUE_LABEL] == "team-a" and wl["spec"]["priority"] == 100
    assert wl["spec"]["podSets"][0]["name"] == "worker" and wl["spec"]["podSets"][0]["count"] == 2
    assert wl["metadata"]["ownerReferences"][0]["kind"] == "PretrainJob"
    p = plan(ctx(kjob()), Observed(workload=workload()), T0)
    assert p.create == [] and p.status.phase == "Queued"
    assert cond(p.status, "Admitted").status == "False"


def test_kueue_admission_places_pods_on_the_flavor():
    p = plan(ctx(kjob()), Observed(workload=workload(admitted=True), flavors=FLAVOR), T0)
    pods = [m for m in p.create if m["kind"] == "Pod"]
    assert len(pods) == 2 and cond(p.status, "Admitted").status == "True"
    for m in pods:
        assert m["spec"]["nodeSelector"] == {"gpu": "a100"}
        assert m["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_kueue_eviction_stops_pods_then_gives_quota_back_and_requeues():
    p = plan(ctx(kjob(running_status())), Observed(pods=gang(), workload=workload(evicted=True)), T0)
    assert sorted(p.delete_pods) == ["ptj-worker-0", "ptj-worker-1"] and p.status.phase == "Queued"
    assert p.status.restarts == 0 and p.status.preemptions == 1 and p.workload_status_patch is None
    p = plan(ctx(kjob(p.status.to_wire())), Observed(workload=workload(evicted=True)), T0)
    patch = p.workload_status_patch["status"]
    assert patch["admission"] is None
    assert {c["type"]: c["status"] for c in patch["conditions"]}["QuotaReserved"] == "False"
    readmitted = plan(ctx(kjob(p.status.to_wire())), Observed(workload=workload(admitted=True), flavors=FLAVOR), T0)
    assert [m["metadata"]["labels"][contract.LABEL_ATTEMPT] for m in readmitted.create if m["kind"] == "Pod"] == ["1", "1"]


def test_kueue_workload_marked_finished_when_the_job_ends():
    p = plan(ctx(kjob({"phase": "Succeeded", "completionTime": rfc3339(T0), "message": "done"})),
             Observed(workload=workload(admitted=True)), T0)
    conds = {c["type"]: c for c in p.workload_status_patch["status"]["conditions"]}
    assert conds["Finished"]["status"] == "True" and conds["Finished"]["reason"] == "Succeeded"


def test_kueue_suspend_deactivates_the_workload():
    obj = with_(kjob(running_status()), "spec.runPolicy", {"suspend": True})
    p = plan(ctx(obj), Observed(pods=gang(), workload=workload(admitted=True)), T0)
    assert p.workload["spec"]["active"] is False and p.status.phase == "Suspended"


def ready_gang(attempt: int = 0) -> list[dict]:
    out = gang("Running", attempt)
    for p in out:
        p["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return out


def test_kueue_pods_ready_reported_once_the_whole_gang_is_ready():
    """waitForPodsReady: Kueue evicts a Workload whose PodsReady condition does not turn True in time."""
    starting = plan(ctx(kjob(running_status())), Observed(pods=gang(), workload=workload(admitted=True)), T0)
    patch = starting.workload_status_patch
    pr = {c["type"]: c for c in patch["status"]["conditions"]}["PodsReady"]
    assert (pr["status"], pr["reason"]) == ("False", "WaitForStart")
    # a stale read must not overwrite what Kueue wrote since: the patch is guarded by the resourceVersion
    assert patch["metadata"]["resourceVersion"] == "41"
    ready = plan(ctx(kjob(running_status())), Observed(pods=ready_gang(), workload=workload(admitted=True)), T0)
    pr = {c["type"]: c for c in ready.workload_status_patch["status"]["conditions"]}["PodsReady"]
    assert (pr["status"], pr["reason"]) == ("True", "PodsReady")
    wl = workload(admitted=True)
    wl["status"]["conditions"].append(pr)
    again = plan(ctx(kjob(running_status())), Observed(pods=ready_gang(), workload=wl), T0)
    assert again.workload_status_patch is None  # nothing to say twice


def test_kueue_suspend_gives_the_quota_back_once_the_pods_are_gone():
    obj = with_(kjob(running_status()), "spec.runPolicy", {"suspend": True})
    stopping = plan(ctx(obj), Observed(pods=gang(), workload=workload(admitted=True)), T0)
    assert stopping.workload_status_patch is None  # pods still hold the resources
    stopped = plan(ctx(with_(obj, "status", stopping.status.to_wire())),
                   Observed(workload=workload(admitted=True)), T0)
    patch = stopped.workload_status_patch["status"]
    assert patch["admission"] is None and stopped.status.phase == "Suspended"
    assert {c["type"]: c["status"] for c in patch["conditions"]}["QuotaReserved"] == "False"


@pytest.mark.parametrize(("version", "priority", "want"), [
    ("v1beta2", kueue.WorkloadPriority(1000, "WorkloadPriorityClass", "high"),
     {"priority": 1000, "priorityClassRef": {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass",
                                              "name": "high"}}),
    ("v1beta2", kueue.WorkloadPriority(50, "PriorityClass", "batch"),
     {"priority": 50, "priorityClassRef": {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": "batch"}}),
    ("v1beta1", kueue.WorkloadPriority(1000, "WorkloadPriorityClass", "high"),
     {"priority": 1000, "priorityClassName": "high", "priorityClassSource": "kueue.x-k8s.io/workloadpriorityclass"}),
    ("v1beta2", kueue.WorkloadPriority(7), {"priority": 7}),
])
def test_workload_priority_always_carries_its_value(version, priority, want):
    """Kueue's own rule: priorityClassRef without priority is refused, so the value always comes with it."""
    wl = kueue.desired_workload(job(), version, "q", [], priority, True)
    got = {k: v for k, v in wl["spec"].items() if k.startswith("priority")}
    assert got == want


def test_kueue_queue_from_spec_label_or_namespace_default():
    obj = job()
    assert kueue.queue_name_for(obj, "team-a", None, True) == "team-a"
    obj["metadata"]["labels"] = {kueue.QUEUE_LABEL: "from-label"}
    assert kueue.queue_name_for(obj, None, None, True) == "from-label"
    obj["metadata"]["labels"] = {}
    assert kueue.queue_name_for(obj, None, None, True) == "default"
    assert kueue.queue_name_for(obj, None, None, False) is None
    assert kueue.queue_name_for(obj, None, "volcano", True) is None  # another gang backend was chosen


def test_kueue_label_queue_gates_pods_like_spec_queue():
    obj = job()
    obj["metadata"]["labels"] = {kueue.QUEUE_LABEL: "team-b"}
    c = ctx(obj)
    c.queue_name = "team-b"
    p = plan(c, Observed(), T0)
    assert p.workload["spec"]["queueName"] == "team-b" and not [m for m in p.create if m["kind"] == "Pod"]


def test_kueue_admission_check_pod_set_updates_reach_the_pods():
    wl = workload(admitted=True)
    wl["status"]["admissionChecks"] = [{"name": "prov", "state": "Ready", "podSetUpdates": [
        {"name": "worker", "labels": {"team": "a"}, "annotations": {"prov/req": "r1"},
         "nodeSelector": {"pool": "reserved"},
         "tolerations": [{"key": "reserved", "operator": "Exists", "effect": "NoSchedule"}]}]}]
    p = plan(ctx(kjob()), Observed(workload=wl, flavors=FLAVOR), T0)
    pods = [m for m in p.create if m["kind"] == "Pod"]
    assert len(pods) == 2
    for m in pods:
        assert m["spec"]["nodeSelector"] == {"gpu": "a100", "pool": "reserved"}
        assert {"key": "reserved", "operator": "Exists", "effect": "NoSchedule"} in m["spec"]["tolerations"]
        assert m["metadata"]["labels"]["team"] == "a" and m["metadata"]["annotations"]["prov/req"] == "r1"


def test_a_missing_priority_class_holds_the_job_with_a_reason():
    c = ctx(kjob())
    c.priority_error = "WorkloadPriorityClass 'urgent' does not exist; create it, or name another one"
    p = plan(c, Observed(), T0)
    assert p.workload is None and p.status.phase == "Pending" and "urgent" in p.status.message


# --- node loss -------------------------------------------------------------------------------------------


def on_node(p: dict, node: str, ready: bool = True) -> dict:
    p["spec"] = {"nodeName": node}
    p["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return p


def peer_lost(rank: int, finished: datetime) -> dict:
    msg = json.dumps({"reason": contract.REASON_PEER_LOST, "message": "RuntimeError: Connection closed by peer"})
    p = pod(rank, "Failed", exit_code=1, message=msg)
    p["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = rfc3339(finished)
    return p


def test_a_lost_node_restarts_the_gang_without_spending_the_budget_and_force_deletes_its_pods():
    pods = [on_node(pod(0), "n0"), on_node(pod(1), "n1", ready=False)]
    lost = {"n1": "node.kubernetes.io/unreachable:NoExecute since 2026-11-23T12:00:00Z"}
    p = plan(ctx(job(running_status(restarts=1))), Observed(pods=pods, lost_nodes=lost), T0)
    assert p.status.phase == "Restarting" and p.status.attempt == 1
    assert p.status.restarts == 1 and p.status.preemptions == 1 and p.status.backoff_until is None
    assert p.events[0].reason == "NodeLost" and "node n1 was lost (node.kubernetes.io/unreachable" in p.events[0].message
    # the survivor is stopped gracefully (it writes nothing it could not), the lost one goes with no grace
    assert p.delete_pods == ["ptj-worker-0"] and p.force_delete_pods == ["ptj-worker-1"]
    assert p.delete_grace_seconds == SURVIVOR_GRACE_S  # its checkpoint needed the lost rank


def test_a_previous_gangs_pod_stuck_terminating_on_a_lost_node_is_force_deleted():
    status = running_status(attempt=1, phase="Restarting", gangCreatedAt=None)
    stuck = on_node(pod(1, deleting=True), "n1", ready=False)
    p = plan(ctx(job(status)), Observed(pods=[stuck], lost_nodes={"n1": "node.kubernetes.io/unreachable"}), T0)
    assert p.force_delete_pods == ["ptj-worker-1"] and p.delete_pods == [] and p.create == []
    # without the node being declared lost the graceful delete is left to finish
    p = plan(ctx(job(status)), Observed(pods=[stuck], late_nodes={"n1"}), T0)
    assert p.force_delete_pods == [] and p.requeue_after is not None and p.requeue_after <= 5


def test_a_pod_that_only_lost_a_peer_waits_for_the_cause_then_counts_as_a_failure():
    pods = [on_node(pod(0), "n0"), peer_lost(1, T0)]
    # the other rank still looks alive: its node may be dead and not declared lost yet
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0 + timedelta(seconds=30))
    assert p.delete_pods == [] and p.status.restarts == 0 and p.status.attempt == 0
    assert "lost its connection to another rank" in (p.status.message or "") and p.requeue_after <= 5
    # the node is declared lost meanwhile: no restart spent
    lost = {"n0": "node.kubernetes.io/unreachable:NoExecute"}
    p = plan(ctx(job(running_status())), Observed(pods=pods, lost_nodes=lost), T0 + timedelta(seconds=55))
    assert p.events[0].reason == "NodeLost" and p.status.restarts == 0 and p.status.preemptions == 1
    # nothing explains it within the hold: a failure after all
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0 + timedelta(seconds=91))
    assert p.events[0].reason == "PodFailed" and p.status.restarts == 1


def test_a_real_failure_beside_a_lost_peer_is_counted_at_once():
    pods = [pod(0, "Failed", exit_code=1, message="CUDA error"), peer_lost(1, T0)]
    p = plan(ctx(job(running_status())), Observed(pods=pods), T0 + timedelta(seconds=1))
    assert p.events[0].reason == "PodFailed" and p.status.restarts == 1
    # every rank lost its peers (a partition): nothing left alive to wait for
    p = plan(ctx(job(running_status())), Observed(pods=[peer_lost(0, T0), peer_lost(1, T0)]), T0)
    assert p.events[0].reason == "PodFailed" and p.status.restarts == 1


def test_node_health_reading():
    from kubeforge.controller import pods as P

    tainted = {"spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"},
                                   {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                                    "timeAdded": "2026-11-23T12:00:00Z"}]},
               "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}
    assert P.node_lost(tainted) == "node.kubernetes.io/unreachable:NoExecute since 2026-11-23T12:00:00Z"
    assert P.node_lost(None) == "the Node object was deleted"
    only_noschedule = {"spec": {"taints": [tainted["spec"]["taints"][0]]}, "status": tainted["status"]}
    assert P.node_lost(only_noschedule) is None and not P.node_ready(only_noschedule)
    healthy = {"spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert P.node_lost(healthy) is None and P.node_ready(healthy)
    assert P.on_suspect_node(on_node(pod(0), "n0", ready=False))
    assert not P.on_suspect_node(on_node(pod(0), "n0")) and not P.on_suspect_node(pod(0))


def test_a_workload_status_update_kueue_refuses_is_an_event_and_the_job_goes_on():
    """Kueue's own rules refusing kubeforge's update of the Workload's status (a 422) is said on the job as
    a Warning event and retried a minute later; the reconcile does not fail (which would retry it forever
    and never write the job's status)."""
    from kubernetes.client.exceptions import ApiException
    from test_serving_render import SETTINGS, FakeKube

    from kubeforge.controller.kube import RESOURCES
    from kubeforge.controller.reconciler import Reconciler

    class RefusingKube(FakeKube):
        def merge_patch(self, res, ns, name, patch, subresource=None):
            if res.plural == "workloads":
                raise ApiException(status=422, reason="Unprocessable Entity")
            return super().merge_patch(res, ns, name, patch, subresource)

    kube = RefusingKube(job())
    stored = kube.get(RESOURCES["PretrainJob"], "ns1", "ptj")
    workload = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                "metadata": {"name": kueue.workload_name(stored), "namespace": "ns1"}}
    result = plan(ctx(stored), Observed(workload=workload), T0)
    result.workload, result.workload_status_patch = None, {"status": {"conditions": []}}
    Reconciler(kube, SETTINGS, clock=lambda: T0).apply(stored, result, Observed(workload=workload))  # type: ignore[arg-type]
    assert ("Warning", "WorkloadStatusRefused") in kube.events
    assert result.requeue_after is not None and result.requeue_after <= 60
    assert ("patch/status", "PretrainJob", "ptj") in kube.calls  # the job's own status is still written
