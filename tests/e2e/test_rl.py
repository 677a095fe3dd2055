"""RLJob end to end on the dev cluster: the real operator, a learner pod running torch on CPU, prompts and the
base model in the cluster's S3 server, a killed learner resumed from its last commit; and an LLM judge served
by an InferenceDeployment in the same namespace."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest

from kubeforge.devcluster.testing import ClusterHandle, pod_processes
from kubeforge.runtime.rl import tasks

from .conftest import REPO, Jobs, Operator, example, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KIND = "RLJob"
LEARNER = b"kubeforge.runtime.rl.learner"


@pytest.fixture(scope="module", autouse=True)
def task(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return tasks.upload(cluster.s3_client(), "s3://kubeforge", tmp_path_factory.mktemp("rl-task"))


def with_checkpoint_in_namespace(obj: dict, jobs: Jobs) -> dict:
    """The example in this test's namespace, its pods running this checkout's code (the dev cluster's pods
    otherwise import the package the shared venv was installed from)."""
    obj = copy.deepcopy(obj)
    obj["spec"]["checkpoint"]["uri"] = f"s3://kubeforge/checkpoints/{jobs.ns}/{obj['metadata']['name']}"
    code = {"name": "PYTHONPATH", "value": str(REPO / "operator")}
    for holder in (obj["spec"].setdefault("resources", {}), obj["spec"].setdefault("rollout", {}).setdefault(
            "resources", {})):
        holder["env"] = [*holder.get("env", []), code]
    return obj


def kill_learner(namespace: str, pod: str) -> int:
    pids = wait(lambda: [p for p in pod_processes(namespace, pod, LEARNER)
                         if p not in pod_processes(namespace, pod, b"kubeforge.runtime.launch")], 60,
                f"the learner process of {pod}")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def diagnose(cluster: ClusterHandle, jobs: Jobs, name: str) -> str:
    """The job's status and its pods' phases and log tails, for a failure message."""
    import json

    out = [f"status: {json.dumps(jobs.status(KIND, name), indent=1)[-4000:]}"]
    for p in jobs.pods(name):
        pod = p["metadata"]["name"]
        out.append(f"--- pod {pod}: {p.get('status', {}).get('phase')}")
        try:
            out.append(cluster.pod_log(jobs.ns, pod)[-3000:])
        except Exception as exc:  # noqa: BLE001 - a diagnostic
            out.append(f"(no log: {exc})")
    return "\n".join(out)


def curve_mean(points: list[dict], n: int = 10) -> float:
    tail = points[-n:]
    return sum(p["reward"] for p in tail) / len(tail)


def test_rl_tiny_learns_addition_and_survives_a_killed_learner(operator: Operator, jobs: Jobs,
                                                              cluster: ClusterHandle) -> None:
    obj = with_checkpoint_in_namespace(example("rl-tiny.yaml"), jobs)
    name = obj["metadata"]["name"]
    jobs.create(obj)
    try:
        learns_and_resumes(jobs, obj, name)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(cluster, jobs, name)}\noperator log:\n{operator.log()[-3000:]}") \
            from None


def learns_and_resumes(jobs: Jobs, obj: dict, name: str) -> None:
    st = wait(lambda: (jobs.status(KIND, name).get("lastCheckpoint") or {}).get("step", 0) >= 20
              and jobs.status(KIND, name), 240, "a committed checkpoint")
    assert st["rl"]["initialReward"] < 0.2, st["rl"]  # the base policy
    (pod,) = [p["metadata"]["name"] for p in jobs.pods(name)]
    kill_learner(jobs.ns, pod)
    wait(lambda: jobs.status(KIND, name).get("attempt") == 1, 60, "the gang to be recreated")
    resumed = wait(lambda: (lambda s: s.get("attempt") == 1 and s.get("phase") == "Running"
                            and (s.get("progress") or {}).get("step", 0) >= 20 and s)(jobs.status(KIND, name)),
                   180, "progress from the new learner")
    assert resumed["progress"]["step"] >= resumed["lastCheckpoint"]["step"] >= 20

    st = jobs.wait_phase(KIND, name, {"Succeeded", "Failed"}, timeout=600)
    assert st["phase"] == "Succeeded" and st["restarts"] == 1, st
    steps = obj["spec"]["algorithm"]["steps"]
    assert st["progress"]["step"] == steps and st["progress"]["percent"] == 100
    rl = st["rl"]
    assert curve_mean(rl["rewardCurve"]) > 0.7, rl["rewardCurve"]
    assert rl["policyVersion"] == steps and rl["rewardFailures"] == 0
    assert rl["responseLength"] >= 1 and rl["rewardStd"] >= 0 and rl["kl"] >= 0
    assert st["output"]["uri"] == f"{obj['spec']['checkpoint']['uri']}/final"

    table = jobs.table("rljobs")
    names = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(names, table["rows"][0]["cells"]))
    assert row["Step"] == steps and row["Reward"] == pytest.approx(st["progress"]["reward"])


def test_judge_example_waits_for_its_inference_deployment_and_counts_junk_replies(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle) -> None:
    import yaml

    from kubeforge.controller.kube import RESOURCES

    judge, job = (d for d in yaml.safe_load_all((Path(__file__).parents[2] / "examples/rl-judge-tiny.yaml")
                                                .read_text()) if d)
    job = with_checkpoint_in_namespace(job, jobs)
    jobs.create(job)  # first the job: it must wait for a judge that does not exist yet
    st = wait(lambda: (lambda s: s.get("phase") == "Pending" and "rl-judge" in (s.get("message") or "") and s)(
        jobs.status(KIND, "rl-judged")), 60, "the RLJob to wait for its judge")
    assert not jobs.pods("rl-judged")
    jobs.create(judge)
    st = jobs.wait_phase(KIND, "rl-judged", {"Succeeded", "Failed"}, timeout=600)
    assert st["phase"] == "Succeeded", diagnose(cluster, jobs, "rl-judged")
    served = jobs.kube.get(RESOURCES["InferenceDeployment"], jobs.ns, "rl-judge")
    assert served["status"]["phase"] == "Ready"
    # the tiny judge is no judge: whatever it replies, an unparsable reply is a counted failure scoring 0,
    # never a crash, and the run completes
    rl = st["rl"]
    assert rl["policyVersion"] == job["spec"]["algorithm"]["steps"] and rl["rewardFailures"] >= 0
    assert 0.0 <= st["progress"]["reward"] <= 1.0


def test_disaggregated_rollout_pool_gets_the_weights_and_finishes_with_the_learner(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle) -> None:
    obj = with_checkpoint_in_namespace(example("rl-tiny.yaml"), jobs)
    obj["metadata"]["name"] = name = "rl-disagg"
    obj["spec"]["checkpoint"]["uri"] += "-disagg"
    obj["spec"]["algorithm"]["steps"] = 8
    obj["spec"]["rollout"].update(placement="disaggregated", replicas=2)
    obj["spec"]["rollout"]["resources"]["requests"] = {"cpu": "500m", "memory": "1Gi"}
    obj["spec"]["weightSync"] = {"method": "http", "intervalSteps": 2}
    jobs.create(obj)
    st = jobs.wait_phase(KIND, name, {"Succeeded", "Failed"}, timeout=600)
    assert st["phase"] == "Succeeded", diagnose(cluster, jobs, name)
    roles = sorted(p["metadata"]["labels"]["kubeforge.dev/role"] for p in jobs.pods(name))
    assert roles == ["rollout", "rollout", "worker"]
    assert all(p["status"]["phase"] == "Succeeded" for p in jobs.pods(name))
    assert st["rl"]["engineVersions"] == [8, 8] and st["rl"]["droppedStale"] == 0
    # the engines admit only this job's pods (the API server stored the policy as rendered; the dev cluster's
    # network enforces no NetworkPolicy, so this checks what a cluster whose plugin does gets)
    from kubeforge.controller.kube import RESOURCES

    policy = jobs.kube.get(RESOURCES["NetworkPolicy"], jobs.ns, f"{name}-rollout")
    assert policy is not None, "the rollout engines' NetworkPolicy"
    selected = policy["spec"]["podSelector"]["matchLabels"]
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for p in jobs.pods(name):
        labels = p["metadata"]["labels"]
        assert (selected.items() <= labels.items()) == (labels["kubeforge.dev/role"] == "rollout")
        assert admitted.items() <= labels.items()
