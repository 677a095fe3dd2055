"""RLJob in the controller: the learner gang is PretrainJob's planner with the RL runtime; the judge's URL
reaches the runtime; rank 0's RL report lands in status.rl."""

from __future__ import annotations

from datetime import datetime, timezone

from kubeforge.api.registry import BY_KIND
from kubeforge.api.status import JobStatus
from kubeforge.api.validation import parse_spec, validate
from kubeforge.controller.rl import RUNTIME_MODULE, with_judge_url
from kubeforge.controller.torchrun import TorchrunGang
from kubeforge.controller.training import JobContext, Observed, Source, merge_progress, plan

T0 = datetime(2026, 12, 4, 12, 0, 0, tzinfo=timezone.utc)


def rl_job(**spec) -> dict:
    base = {
        "model": {"uri": "s3://kubeforge/models/base"},
        "data": {"uri": "s3://kubeforge/data/rl-add/"},
        "algorithm": {"name": "grpo", "groupSize": 8, "promptsPerStep": 16, "steps": 50},
        "reward": {"verifiable": {"check": "exact_match"}},
        "rollout": {"engine": "reference", "placement": "colocated"},
        "weightSync": {"method": "http"},
        "checkpoint": {"uri": "s3://kubeforge/checkpoints/rl", "secretRef": {"name": "kubeforge-s3"}},
        "resources": {"numNodes": 1, "processesPerNode": 2},
    }
    base.update(spec)
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "RLJob",
            "metadata": {"name": "rl", "namespace": "ns1", "uid": "uid-rl", "generation": 1}, "spec": base}


def test_rl_job_plans_a_torchrun_gang_running_the_learner() -> None:
    obj = rl_job()
    assert validate(obj) == []
    spec = parse_spec(obj)
    builder = TorchrunGang(obj=obj, resources=spec.resources, scheduling=spec.scheduling, module=RUNTIME_MODULE,
                           resolved_spec=spec.to_wire(), secret_name="kubeforge-s3", s3_endpoint=None)
    result = plan(JobContext(obj=obj, spec=spec, builder=builder, workload_version="v1beta2"),
                  Observed(pods=[], source=Source(uri=spec.model.uri)), T0)
    pods = [c for c in result.create if c["kind"] == "Pod"]
    assert len(pods) == 1
    command = " ".join(pods[0]["spec"]["containers"][0]["command"] + pods[0]["spec"]["containers"][0].get("args", []))
    assert "kubeforge.runtime.rl.learner" in command and "--nproc-per-node=2" in command


def test_judge_deployment_becomes_a_url_in_the_resolved_spec() -> None:
    obj = rl_job(reward={"judge": {"inferenceDeployment": "judge", "rubric": "be strict"}})
    wire = parse_spec(obj).to_wire()
    resolved = with_judge_url(wire, "http://judge.ns1.svc:8000/v1")
    assert resolved["reward"]["judge"] == {"url": "http://judge.ns1.svc:8000/v1", "rubric": "be strict"}
    assert wire["reward"]["judge"]["inferenceDeployment"] == "judge"  # the input is not changed
    assert with_judge_url(wire, None) is wire


def test_rl_report_lands_in_status() -> None:
    status = JobStatus()
    merge_progress(status, {"step": 7, "totalSteps": 50, "tokens": 900, "reward": 0.41, "rl": {
        "rewardStd": 0.3, "kl": 0.01, "responseLength": 2.0, "rewardFailures": 3, "droppedStale": 0,
        "policyVersion": 7, "engineVersions": [7, 7], "rewardCurve": [{"step": 6, "reward": 0.4}]}})
    assert status.progress.reward == 0.41 and status.progress.percent == 14
    assert status.rl.reward_failures == 3 and status.rl.engine_versions == [7, 7]
    assert status.rl.reward_curve[0].reward == 0.4
    merge_progress(status, {"step": 8, "totalSteps": 50, "rl": {"rewardCurve": "junk"}})
    assert status.progress.step == 8 and status.rl.policy_version == 7  # a bad block keeps the last good one


def test_reward_printer_column() -> None:
    cols = {c.name: c.json_path for c in BY_KIND["RLJob"].columns}
    assert cols["Reward"] == ".status.progress.reward" and cols["Step"] == ".status.progress.step"


def test_disaggregated_job_adds_a_rollout_pool_to_the_gang() -> None:
    from kubeforge.controller.rl import RLGang

    obj = rl_job(rollout={"engine": "reference", "placement": "disaggregated", "replicas": 2,
                          "resources": {"requests": {"cpu": "500m"}}})
    assert validate(obj) == []
    spec = parse_spec(obj)
    builder = RLGang(rl_spec=spec, obj=obj, resources=spec.resources, scheduling=spec.scheduling,
                     module=RUNTIME_MODULE, resolved_spec=spec.to_wire(), secret_name="kubeforge-s3", s3_endpoint=None)
    assert builder.gang_size() == 3 and builder.pod_names() == ["rl-worker-0"]
    result = plan(JobContext(obj=obj, spec=spec, builder=builder, workload_version="v1beta2"),
                  Observed(pods=[], source=Source(uri=spec.model.uri)), T0)
    pods = {c["metadata"]["name"]: c for c in result.create if c["kind"] == "Pod"}
    assert set(pods) == {"rl-worker-0", "rl-rollout-0", "rl-rollout-1"}
    assert [pods[n]["metadata"]["labels"]["kubeforge.dev/replica-index"] for n in sorted(pods)] == ["1", "2", "0"]
    env = {e["name"]: e.get("value") for e in pods["rl-worker-0"]["spec"]["containers"][0]["env"]}
    assert env["KUBEFORGE_ROLLOUT_URLS"] == ("http://rl-rollout-0.rl-rollout.ns1.svc:8000,"
                                             "http://rl-rollout-1.rl-rollout.ns1.svc:8000")
    engine = pods["rl-rollout-1"]
    assert engine["spec"]["subdomain"] == "rl-rollout" and engine["spec"]["hostname"] == "rl-rollout-1"
    assert engine["metadata"]["labels"]["kubeforge.dev/role"] == "rollout"
    assert "kubeforge.runtime.serve.engine" in engine["spec"]["containers"][0]["command"]
    assert engine["spec"]["initContainers"][0]["command"][-2:] == ["s3://kubeforge/models/base", "/models/policy"]
    assert engine["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    services = {c["metadata"]["name"]: c for c in result.create if c["kind"] == "Service"}
    assert services["rl-rollout"]["spec"]["selector"]["kubeforge.dev/role"] == "rollout"
    assert services["rl-rollout"]["spec"]["clusterIP"] == "None"
    sets = {s.name: s.count for s in builder.pod_sets(0)}
    assert sets == {"worker": 1, "rollout": 2}
    # the CRD defaults no image: the engines run the operator's image, and they are Pod Security restricted
    for c in [*engine["spec"]["initContainers"], *engine["spec"]["containers"]]:
        assert c["image"] == builder.default_image and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert engine["spec"]["securityContext"]["runAsNonRoot"] is True
