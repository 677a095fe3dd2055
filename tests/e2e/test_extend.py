"""ContextExtensionJob end to end on the dev cluster: examples/extend-tiny.yaml waits for the tiny
PretrainJob it extends, runs three stages with zigzag ring attention over two pods, survives a worker
killed in stage 2 (the new gang resumes in stage 2 from its last checkpoint), and exports a model whose
config carries the last stage's RoPE and length."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest

from kubeforge.devcluster.testing import ClusterHandle, pod_processes

from .conftest import REPO, Jobs, Operator, example, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KIND = "ContextExtensionJob"
RUNTIME = b"kubeforge.runtime.extend"


@pytest.fixture(scope="module", autouse=True)
def corpus(cluster: ClusterHandle) -> str:
    cluster.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                    "data/tiny-corpus.jsonl")
    return "s3://kubeforge/data/tiny-corpus.jsonl"


def _in_namespace(obj: dict, jobs: Jobs) -> dict:
    obj = copy.deepcopy(obj)
    name = obj["metadata"]["name"]
    obj["spec"]["checkpoint"]["uri"] = f"s3://kubeforge/checkpoints/{jobs.ns}/{name}"
    # the dev cluster's pods run this checkout's runtime, whichever checkout the venv was installed from
    env = obj["spec"]["resources"].setdefault("env", [])
    env.append({"name": "PYTHONPATH", "value": str(REPO / "operator")})
    return obj


def kill_extend_worker(namespace: str, pod: str) -> int:
    """SIGKILL torchrun's worker process (not the launcher) of one pod, as an OOM kill would."""
    pids = wait(lambda: [p for p in pod_processes(namespace, pod, RUNTIME)
                         if p not in pod_processes(namespace, pod, b"kubeforge.runtime.launch")], 60,
                f"the training process of {pod}")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def _diagnose(jobs: Jobs, cluster: ClusterHandle) -> str:
    """Status and the tail of every extend-tiny pod's log, for a failure message."""
    out = [json.dumps(jobs.status(KIND, "extend-tiny"), indent=1)[-3000:]]
    for p in jobs.pods("extend-tiny"):
        name = p["metadata"]["name"]
        try:
            out.append(f"--- {name}\n" + cluster.pod_log(jobs.ns, name)[-3000:])
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            out.append(f"--- {name}: no log ({exc})")
    return "\n".join(out)


@pytest.mark.timeout(1500)  # a pre-training, three stages with evals and a restart, on a shared CPU
def test_example_extends_the_tiny_model_in_three_stages_and_resumes_after_a_kill(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle, tmp_path: Path):
    source = _in_namespace(example("pretrain-tiny.yaml"), jobs)
    extend = _in_namespace(example("extend-tiny.yaml"), jobs)
    assert extend["spec"]["model"]["from"] == {"kind": "PretrainJob", "name": source["metadata"]["name"]}
    jobs.create(extend)  # first: it must wait for its source
    st = wait(lambda: (lambda s: s.get("phase") == "Pending" and s)(jobs.status(KIND, "extend-tiny")), 60,
              "the extension to wait for its source")
    assert "waiting for PretrainJob pretrain-tiny" in st["message"] and not jobs.pods("extend-tiny")
    jobs.create(source)
    src = jobs.wait_phase("PretrainJob", "pretrain-tiny", {"Succeeded", "Failed"}, timeout=300)
    assert src["phase"] == "Succeeded", src

    # stage 2 has committed a checkpoint of its own: kill a worker of the gang
    def in_stage_two() -> dict | None:
        s = jobs.status(KIND, "extend-tiny")
        if s.get("phase") in ("Failed", "Succeeded"):
            raise AssertionError(f"finished before a kill in stage 2\n{_diagnose(jobs, cluster)}")
        stage1_end = 8
        ok = (s.get("currentStage", "").startswith("2/3")
              and (s.get("lastCheckpoint") or {}).get("step", 0) > stage1_end)
        return s if ok else None

    try:
        st = wait(in_stage_two, 600, "a checkpoint inside stage 2")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnose(jobs, cluster)}") from None
    assert st["resolvedModelUri"] == src["output"]["uri"]
    assert st["stages"][0]["state"] == "Succeeded" and "needleScore" in st["stages"][0]["evals"]
    saved, reported = st["lastCheckpoint"]["step"], st["progress"]["updatedAt"]
    kill_extend_worker(jobs.ns, "extend-tiny-worker-1")
    wait(lambda: jobs.status(KIND, "extend-tiny").get("attempt") == 1, 90, "the gang to be torn down")

    # the new gang's first report: stage 2 (or later), at or past the checkpoint committed before the kill
    def resumed() -> dict | None:
        s = jobs.status(KIND, "extend-tiny")
        p = s.get("progress") or {}
        fresh = s.get("attempt") == 1 and (p.get("updatedAt") or "") > reported
        return s if fresh else None

    try:
        st = wait(resumed, 300, "progress from the new gang")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnose(jobs, cluster)}") from None
    assert st["progress"]["stage"] >= 2 and st["progress"]["step"] >= saved > 8, st
    assert st["stages"][0]["state"] == "Succeeded" and st["restarts"] == 1

    st = jobs.wait_phase(KIND, "extend-tiny", {"Succeeded", "Failed"}, timeout=600)
    assert st["phase"] == "Succeeded" and st["restarts"] == 1, _diagnose(jobs, cluster)
    assert [s["state"] for s in st["stages"]] == ["Succeeded"] * 3
    assert [s["seqLen"] for s in st["stages"]] == [256, 512, 1024]
    thetas = [s["ropeTheta"] for s in st["stages"]]
    assert thetas == sorted(thetas) and thetas[0] > 10000
    for s in st["stages"]:
        assert s["stepsDone"] == s["steps"] and s["loss"] > 0 and s["tokensPerSecond"] > 0
        assert set(s["evals"]["perplexity"]) == {"256", "1024"} and 0 <= s["evals"]["needleScore"] <= 1
    assert st["currentStage"] == "3/3 1024" and st["progress"]["step"] == 20

    table = jobs.table("contextextensionjobs")
    names = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(names, table["rows"][0]["cells"]))
    assert row["Phase"] == "Succeeded" and row["Stage"] == "3/3 1024" and row["Restarts"] == 1

    # the export: the last stage's RoPE and length, loadable with transformers; evals next to it
    from transformers import AutoModelForCausalLM

    s3 = cluster.s3_client()
    prefix = st["output"]["uri"].removeprefix("s3://kubeforge/") + "/"
    for o in s3.list_objects_v2(Bucket="kubeforge", Prefix=prefix)["Contents"]:
        s3.download_file("kubeforge", o["Key"], str(tmp_path / o["Key"].rsplit("/", 1)[1]))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 1024
    assert cfg["rope_parameters"]["rope_theta"] == pytest.approx(thetas[-1], rel=1e-6)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.max_position_embeddings == 1024
    ckpt = extend["spec"]["checkpoint"]["uri"].removeprefix("s3://kubeforge/")
    png = s3.get_object(Bucket="kubeforge", Key=f"{ckpt}/evals/stage-3/niah.png")["Body"].read()
    assert png[:4] == b"\x89PNG"
