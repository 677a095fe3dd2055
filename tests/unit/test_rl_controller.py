"""RLJob in the controller: the learner gang is PretrainJob's planner with the RL runtime; the judge's URL
reaches the runtime; rank 0's RL report lands in status.rl."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

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
        "rewardStd": 0.3, "kl": 0.01, "responseLength": 2.0, "rewardFailures": 3, "droppedStale": 0, "importanceCorrected": 5,
        "policyVersion": 7, "engineVersions": [7, 7], "rewardCurve": [{"step": 6, "reward": 0.4}]}})
    assert status.progress.reward == 0.41 and status.progress.percent == 14
    assert status.rl.reward_failures == 3 and status.rl.engine_versions == [7, 7]
    assert status.rl.importance_corrected == 5
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

    # only the job's own pods reach the engines (their weight endpoints replace the policy being trained)
    (policy,) = [c for c in result.create if c["kind"] == "NetworkPolicy"]
    selects = policy["spec"]["podSelector"]["matchLabels"]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"] and len(policy["spec"]["ingress"]) == 1
    for name, p in pods.items():
        labels = p["metadata"]["labels"]
        assert (selects.items() <= labels.items()) == name.startswith("rl-rollout-")
        assert allowed.items() <= labels.items()  # learners and engines of this job
    assert not allowed.items() <= {**pods["rl-worker-0"]["metadata"]["labels"],
                                   "kubeforge.dev/job-name": "another-job"}.items()  # another job's pods
    assert policy["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    colocated = rl_job()
    cspec = parse_spec(colocated)
    cgang = RLGang(rl_spec=cspec, obj=colocated, resources=cspec.resources, scheduling=cspec.scheduling,
                   module=RUNTIME_MODULE, resolved_spec=cspec.to_wire(), secret_name="kubeforge-s3", s3_endpoint=None)
    assert not [c for c in cgang.support_children("builtin") if c["kind"] == "NetworkPolicy"]


def _vllm_rollout_job(**rollout) -> dict:
    from test_workload_pods import _stored

    return _stored(rl_job(rollout={"engine": "vllm", "placement": "disaggregated", "replicas": 2,
                                   "resources": {"limits": {"nvidia.com/gpu": 2}}, **rollout},
                          weightSync={"method": "nccl", "intervalSteps": 2},
                          resources={"numNodes": 1, "processesPerNode": 1,
                                     "limits": {"nvidia.com/gpu": 1}}))


def _rl_gang(obj: dict):
    from kubeforge.controller.rl import RLGang
    from kubeforge.settings import OperatorSettings

    spec = parse_spec(obj)
    settings = OperatorSettings()
    return RLGang(rl_spec=spec, serve_image=settings.serve_image, obj=obj, resources=spec.resources,
                  scheduling=spec.scheduling, module=RUNTIME_MODULE, resolved_spec=spec.to_wire(),
                  secret_name="kubeforge-s3", s3_endpoint=None, default_image=settings.trainer_image), settings


def test_vllm_rollout_engines_render_the_weight_update_path_the_pinned_vllm_parses() -> None:
    from test_vllm_cli import vllm_parser

    from kubeforge.controller import vllm
    from kubeforge.controller.rl import weight_sync_port
    from kubeforge.runtime.rl import vllm_worker

    obj = _vllm_rollout_job()
    builder, settings = _rl_gang(obj)
    pods = {p["metadata"]["name"]: p for p in builder.pods(0, {}, "builtin")}
    assert set(pods) == {"rl-worker-0", "rl-rollout-0", "rl-rollout-1"}
    parser = vllm_parser()
    for i in (0, 1):
        engine = pods[f"rl-rollout-{i}"]["spec"]["containers"][0]
        argv = engine["command"]
        assert argv[:2] == ["vllm", "serve"]
        args = parser.parse_args(argv[2:])  # raises on an option vLLM 0.18.0 does not have
        assert args.model_tag == "/models/policy" and args.served_model_name == ["policy"]
        assert args.port == "8000" and args.tensor_parallel_size == "2"  # one worker per GPU of the pod
        assert args.worker_extension_cls == vllm_worker.EXTENSION_CLASS == vllm.RL_WORKER_EXTENSION
        assert args.generation_config == "vllm" and args.logprobs_mode == "processed_logprobs"
        assert args.seed == str(i)  # algorithm.seed + engine index: the engines sample apart
        env = {e["name"]: e.get("value") for e in engine["env"]}
        assert env["VLLM_SERVER_DEV_MODE"] == "1"  # /collective_rpc and /reset_prefix_cache
        assert env[vllm_worker.STOP_PID_ENV] == "1"
        assert engine["image"] == settings.serve_image
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert engine["readinessProbe"]["httpGet"]["path"] == "/v1/models"
        fetch = pods[f"rl-rollout-{i}"]["spec"]["initContainers"][0]
        assert fetch["image"] == settings.serve_image and "kubeforge.runtime.fetch" in fetch["command"]
    # the extension vLLM is told to load is importable by that name and has the methods the learner calls
    module, _, cls = vllm.RL_WORKER_EXTENSION.rpartition(".")
    ext = getattr(__import__(module, fromlist=[cls]), cls)
    assert {"kubeforge_init_weight_group", "kubeforge_update_weights", "kubeforge_policy_version"} <= set(dir(ext))
    learner = pods["rl-worker-0"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in learner["env"]}
    port = weight_sync_port(obj["metadata"]["uid"])
    assert env["KUBEFORGE_WEIGHT_SYNC_PORT"] == str(port)
    assert {"name": "weight-sync", "containerPort": port} in learner["ports"]
    assert env["KUBEFORGE_ROLLOUT_URLS"].count("rl-rollout.team-a.svc:8000") == 2


def test_reference_rollouts_render_no_weight_sync_port() -> None:
    obj = rl_job(rollout={"engine": "reference", "placement": "disaggregated"})
    builder, _ = _rl_gang(obj)
    learner = builder.pods(0, {}, "builtin")[0]["spec"]["containers"][0]
    assert "KUBEFORGE_WEIGHT_SYNC_PORT" not in {e["name"] for e in learner["env"]}


PTJ_REF = {"kind": "PretrainJob", "name": "rm-train"}


def _source_obj(phase: str | None, uri: str | None = None) -> dict:
    status: dict = {"phase": phase} if phase else {}
    if uri:
        status["output"] = {"uri": uri}
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": "rm-train", "namespace": "ns1"}, "status": status}


@pytest.mark.parametrize(("src", "want"), [
    (None, Source(waiting="waiting for PretrainJob rm-train to exist (reward.model.from)")),
    (_source_obj("Running"),
     Source(waiting="waiting for PretrainJob rm-train to succeed (reward.model.from; now Running)")),
    (_source_obj("Succeeded"),  # succeeded but no output recorded yet
     Source(waiting="waiting for PretrainJob rm-train to succeed (reward.model.from; now Succeeded)")),
    (_source_obj("Failed"), Source(failed="PretrainJob rm-train failed, so reward.model.from has no output")),
    (_source_obj("Succeeded", "s3://kubeforge/rm/final"), Source(uri="s3://kubeforge/rm/final")),
])
def test_reward_model_from_resolves_like_model_from(src, want) -> None:
    from kubeforge.controller.sources import source_of

    assert source_of("PretrainJob", "rm-train", src, "reward.model.from") == want


def test_resolved_reward_model_reaches_the_runtime_as_a_uri_and_a_failed_source_fails_the_job() -> None:
    from kubeforge.controller.rl import RLGang, with_reward_model_uri

    obj = rl_job(reward={"model": {"from": PTJ_REF}})
    assert validate(obj) == []
    spec = parse_spec(obj)
    wire = with_reward_model_uri(spec.to_wire(), "s3://kubeforge/rm/final")
    assert wire["reward"]["model"] == {"uri": "s3://kubeforge/rm/final"}
    assert spec.to_wire()["reward"]["model"]["from"]["name"] == "rm-train"  # the input is not changed
    builder = RLGang(rl_spec=spec, obj=obj, resources=spec.resources, scheduling=spec.scheduling,
                     module=RUNTIME_MODULE, resolved_spec=wire, secret_name="kubeforge-s3", s3_endpoint=None)
    result = plan(JobContext(obj=obj, spec=spec, builder=builder, workload_version="v1beta2"),
                  Observed(pods=[], source=Source(uri=spec.model.uri)), T0)
    cms = [c for c in result.create if c["kind"] == "ConfigMap"]
    rendered = json.loads(next(iter(cms[0]["data"].values())))
    assert rendered["spec"]["reward"]["model"] == {"uri": "s3://kubeforge/rm/final"}
    # the runtime reads that spec: a reward model by URI is what it fetches
    from kubeforge.api.kinds import RLJobSpec

    assert RLJobSpec.model_validate(rendered["spec"]).reward.model.uri == "s3://kubeforge/rm/final"

    failed = plan(JobContext(obj=obj, spec=spec, builder=builder, workload_version="v1beta2"),
                  Observed(pods=[], source=Source(failed="PretrainJob rm-train failed, so reward.model.from has no "
                                                         "output")), T0)
    assert failed.status.phase == "Failed" and not [c for c in failed.create if c["kind"] == "Pod"]
    assert any(c.reason == "SourceFailed" for c in failed.status.conditions)
