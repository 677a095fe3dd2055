"""PretrainJob end to end on a real control plane: real pods (local processes), real torch training on CPU,
checkpoints in a real S3 server, and the real operator, restarted and killed along the way."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import pytest

from kubeforge.controller.kube import Resource
from kubeforge.devcluster.testing import ClusterHandle

from .conftest import REPO, Jobs, Operator, example, kill_worker, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KIND = "PretrainJob"


@pytest.fixture(scope="module", autouse=True)
def corpus(cluster: ClusterHandle) -> str:
    cluster.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                    "data/tiny-corpus.jsonl")
    return "s3://kubeforge/data/tiny-corpus.jsonl"


def tiny(jobs: Jobs, name: str, steps: int = 60, interval: int = 20, **spec) -> dict:
    obj = copy.deepcopy(example("pretrain-tiny.yaml"))
    obj["metadata"]["name"] = name
    obj["spec"]["training"]["totalSteps"] = steps
    obj["spec"]["checkpoint"]["uri"] = f"s3://kubeforge/checkpoints/{jobs.ns}/{name}"
    obj["spec"]["checkpoint"]["intervalSteps"] = interval
    for key, value in spec.items():
        obj["spec"][key] = {**obj["spec"].get(key, {}), **value}
    return obj


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions", [])}


def test_example_trains_to_completion_and_exports_a_loadable_model(operator: Operator, jobs: Jobs,
                                                                   cluster: ClusterHandle, tmp_path: Path):
    obj = tiny(jobs, "pretrain-tiny")
    jobs.create(obj)
    pods = wait(lambda: len(jobs.pods("pretrain-tiny")) == 2 and jobs.pods("pretrain-tiny"), 60, "2 pods")
    for p in pods:
        labels = p["metadata"]["labels"]
        assert labels["kubeforge.dev/job-kind"] == KIND and labels["kubeforge.dev/attempt"] == "0"
        assert p["metadata"]["ownerReferences"][0]["name"] == "pretrain-tiny"
    st = jobs.wait_phase(KIND, "pretrain-tiny", {"Succeeded", "Failed"}, timeout=400)
    assert st["phase"] == "Succeeded", st
    assert st["progress"]["step"] == 60 and st["progress"]["percent"] == 100 and st["progress"]["tokens"] > 0
    assert st["progress"]["loss"] < 4.0  # ln(259) = 5.56 at random init
    assert st["lastCheckpoint"]["step"] == 60 and st["restarts"] == 0
    assert st["output"]["uri"] == f"{obj['spec']['checkpoint']['uri']}/final"
    conds = conditions(st)
    assert conds["Succeeded"]["status"] == "True" and conds["Ready"]["status"] == "True"
    assert conds["Reconciling"]["status"] == "False" and conds["Stalled"]["status"] == "False"
    assert {"GangCreated", "Succeeded"} <= set(jobs.event_reasons("pretrain-tiny"))

    table = jobs.table("pretrainjobs")
    names = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(names, table["rows"][0]["cells"]))
    assert row["Phase"] == "Succeeded" and row["Progress"] == 100 and row["Step"] == 60 and row["Restarts"] == 0

    # the exported model loads with transformers after download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s3 = cluster.s3_client()
    prefix = st["output"]["uri"].removeprefix("s3://kubeforge/") + "/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kubeforge", Prefix=prefix)["Contents"]]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {k.rsplit("/", 1)[1] for k in keys}
    for key in keys:
        s3.download_file("kubeforge", key, str(tmp_path / key.rsplit("/", 1)[1]))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    out = model.generate(**tok("The ", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(tok("The ")["input_ids"])


def test_killed_worker_restarts_the_gang_which_resumes_from_the_last_checkpoint(operator: Operator, jobs: Jobs):
    jobs.create(tiny(jobs, "resume", steps=240, interval=10))
    st = wait(lambda: (jobs.status(KIND, "resume").get("lastCheckpoint") or {}).get("step", 0) >= 10
              and jobs.status(KIND, "resume"), 150, "a committed checkpoint")
    before = st["progress"]
    kill_worker(jobs.ns, "resume-worker-1")
    st = wait(lambda: jobs.status(KIND, "resume").get("attempt") == 1 and jobs.status(KIND, "resume"), 60,
              "the gang to be torn down")
    assert st["restarts"] == 1
    assert "PodFailed" in jobs.event_reasons("resume")
    # the first progress of the new gang continues from a checkpoint, not from step 0
    first = wait(lambda: (lambda s: s.get("attempt") == 1 and s.get("phase") == "Running"
                          and s["progress"]["step"] != before["step"] and s["progress"])(jobs.status(KIND, "resume")),
                 150, "progress from the new gang")
    committed = jobs.status(KIND, "resume")["lastCheckpoint"]["step"]
    assert first["step"] >= 10 and committed >= 10
    assert first["loss"] < 4.5, "the loss restarted from its initial value: the checkpoint was not loaded"
    st = jobs.wait_phase(KIND, "resume", {"Succeeded", "Failed"}, timeout=400)
    assert st["phase"] == "Succeeded" and st["restarts"] == 1 and st["progress"]["step"] == 240
    assert {p["metadata"]["labels"]["kubeforge.dev/attempt"] for p in jobs.pods("resume")} == {"1"}


def test_invalid_spec_exit_code_fails_at_once(operator: Operator, jobs: Jobs):
    obj = tiny(jobs, "nodata")
    obj["spec"]["data"]["uri"] = f"s3://kubeforge/nothing-here/{jobs.ns}/"
    jobs.create(obj)
    st = jobs.wait_phase(KIND, "nodata", {"Failed", "Succeeded"}, timeout=120)
    assert st["phase"] == "Failed" and st["restarts"] == 0
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "InvalidSpec" and "nodata-worker-" in failed["message"]
    assert conditions(st)["Stalled"]["status"] == "True"


def test_exhausted_restarts_fail_the_job(operator: Operator, jobs: Jobs):
    # a scratch directory that cannot be created: every attempt crashes the same way
    obj = tiny(jobs, "crashy", runPolicy={"maxRestarts": 1, "backoffSeconds": 1})
    obj["spec"]["resources"]["env"] = [{"name": "KUBEFORGE_WORKDIR", "value": "/proc/kubeforge-cannot-exist"}]
    jobs.create(obj)
    st = jobs.wait_phase(KIND, "crashy", {"Failed", "Succeeded"}, timeout=150)
    assert st["phase"] == "Failed" and st["restarts"] == 1
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "BackoffLimitExceeded" and "maxRestarts (1) exhausted" in failed["message"]


def test_no_progress_within_the_deadline_restarts_the_gang(operator: Operator, jobs: Jobs):
    # 1 s is far shorter than a worker needs to import torch and report its first step: a "hang" every time
    obj = tiny(jobs, "hung", runPolicy={"progressDeadlineSeconds": 1, "maxRestarts": 1, "backoffSeconds": 1})
    jobs.create(obj)
    st = jobs.wait_phase(KIND, "hung", {"Failed"}, timeout=120)
    assert st["restarts"] == 1
    assert "ProgressDeadlineExceeded" in jobs.event_reasons("hung")
    assert "no progress reported for 1s" in conditions(st)["Failed"]["message"]


def test_suspend_checkpoints_and_resume_continues(operator: Operator, jobs: Jobs):
    jobs.create(tiny(jobs, "pausable", steps=120, interval=100))
    wait(lambda: (jobs.status(KIND, "pausable").get("progress") or {}).get("step", 0) >= 15, 150, "15 steps")
    jobs.patch_spec(KIND, "pausable", {"runPolicy": {"suspend": True}})
    st = jobs.wait_phase(KIND, "pausable", {"Suspended"}, timeout=60)
    wait(lambda: not jobs.pods("pausable"), 90, "the pods to be gone")
    st = jobs.status(KIND, "pausable")
    saved = st["lastCheckpoint"]["step"]
    assert st["phase"] == "Suspended" and 15 <= saved < 100, "SIGTERM must write a checkpoint off the interval"
    assert conditions(st)["Suspended"]["status"] == "True" and st["restarts"] == 0
    jobs.patch_spec(KIND, "pausable", {"runPolicy": {"suspend": False}})
    first = wait(lambda: (lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step", 0) > saved
                          and s["progress"])(jobs.status(KIND, "pausable")), 150, "progress after resume")
    assert first["step"] > saved and first["loss"] < 4.5
    st = jobs.wait_phase(KIND, "pausable", {"Succeeded", "Failed"}, timeout=300)
    assert st["phase"] == "Succeeded" and st["restarts"] == 0


def test_active_deadline_fails_and_ttl_cleans_up(operator: Operator, jobs: Jobs):
    jobs.create(tiny(jobs, "late", steps=100000, runPolicy={"activeDeadlineSeconds": 8, "ttlSecondsAfterFinished": 5}))
    st = jobs.wait_phase(KIND, "late", {"Failed"}, timeout=120)
    assert conditions(st)["Failed"]["reason"] == "DeadlineExceeded"
    wait(lambda: jobs.get(KIND, "late") is None, 60, "the TTL to delete the job")
    wait(lambda: not [p for p in jobs.pods("late") if not p["metadata"].get("deletionTimestamp")], 60,
         "its pods to be garbage-collected")


def test_gang_that_cannot_be_placed_whole_holds_no_gpu(operator: Operator, jobs: Jobs):
    # 3 pods x 2 GPUs on a cluster of 2 nodes x 2 GPUs: two pods fit, the third never does
    obj = tiny(jobs, "toowide", scheduling={"scheduleTimeoutSeconds": 6}, runPolicy={"backoffSeconds": 60})
    obj["spec"]["resources"].update(numNodes=3, requests={"nvidia.com/gpu": 2, "cpu": "100m"})
    obj["spec"]["training"]["globalBatchSize"] = 6
    jobs.create(obj)
    wait(lambda: sum(bool(p["spec"].get("nodeName")) for p in jobs.pods("toowide")) == 2, 60,
         "two of the three pods to be placed")
    wait(lambda: "GangScheduleTimeout" in jobs.event_reasons("toowide"), 60, "the gang timeout")
    wait(lambda: not jobs.pods("toowide"), 60, "the partial gang to be released")
    st = jobs.status(KIND, "toowide")
    assert st["restarts"] == 0 and st["preemptions"] >= 1 and st["phase"] == "Restarting"


def test_operator_killed_at_any_moment_converges_without_duplicate_pods(operator: Operator, jobs: Jobs):
    seen: dict[str, set[str]] = {}
    most_alive = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            alive = [p for p in jobs.pods("crashes") if not p["metadata"].get("deletionTimestamp")]
            most_alive[0] = max(most_alive[0], len(alive))
            for p in alive:
                seen.setdefault(p["metadata"]["name"], set()).add(p["metadata"]["uid"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        jobs.create(tiny(jobs, "crashes", steps=150, interval=50))
        for delay in (0.3, 1.5, 4.0, 7.0):  # kill during creation, start-up and training
            time.sleep(delay)
            operator.kill()
            time.sleep(1)
            operator.start()
        st = jobs.wait_phase(KIND, "crashes", {"Succeeded", "Failed"}, timeout=400)
    finally:
        stop.set()
        watcher.join()
    assert st["phase"] == "Succeeded" and st["restarts"] == 0 and st["attempt"] == 0
    assert most_alive[0] == 2 and sorted(seen) == ["crashes-worker-0", "crashes-worker-1"]
    assert all(len(uids) == 1 for uids in seen.values()), seen


def test_admission_refuses_bad_specs_with_field_paths(operator: Operator, jobs: Jobs):
    """Two layers, as a user meets them: the CRD's CEL rules (the API server itself) refuse what they can state,
    and the webhook refuses the rest, here a change inside model.config, which CEL cannot compare by value."""
    from kubernetes.client.exceptions import ApiException

    obj = tiny(jobs, "bad")
    obj["spec"]["training"]["globalBatchSize"] = 7
    with pytest.raises(ApiException) as err:
        jobs.create(obj)
    body = json.loads(err.value.body)
    assert err.value.status == 422
    assert [c["field"] for c in body["details"]["causes"]] == ["spec.training.globalBatchSize"]
    assert "must be a multiple of microBatchSize x numNodes x processesPerNode (4)" in body["message"]
    res = Resource("kubeforge.dev", "v1alpha1", "pretrainjobs")
    assert jobs.kube.get(res, jobs.ns, "bad") is None

    good = tiny(jobs, "good", runPolicy={"suspend": True})
    jobs.create(good)
    with pytest.raises(ApiException) as err:
        jobs.kube.merge_patch(res, jobs.ns, "good", {"spec": {"model": {"config": {"hidden_size": 128}}}})
    assert err.value.status in (400, 422)
    assert "spec.model: is immutable" in err.value.body and "admission webhook" in err.value.body
    # a change that keeps every value (10000 for 10000.0) is no change: accepted
    jobs.kube.merge_patch(res, jobs.ns, "good", {"spec": {"model": {"config": {"rope_theta": 10000}}}})
