"""spec.entrypoint: validation, the rendered gang, the heartbeat deadline, the sdk, and TorchX AppDefs."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from test_training_planner import T0, pod, running_status

from builders import pretrain_entrypoint_job
from kubeforge import contract
from kubeforge.api import crdgen
from kubeforge.api.registry import BY_KIND
from kubeforge.api.validation import parse_spec, validate
from kubeforge.controller.conditions import rfc3339
from kubeforge.controller.torchrun import TorchrunGang
from kubeforge.controller.training import JobContext, Observed, plan

SCRIPT = {"script": "/workspace/train.py", "args": ["--lr", "0.1"]}


def byos(name: str = "ptj", **spec) -> dict:
    obj = pretrain_entrypoint_job(name, "ns1", **spec)
    obj["spec"]["checkpoint"]["secretRef"] = {"name": "kubeforge-s3"}
    return obj


def byos_job(status: dict | None = None, **spec) -> dict:
    obj = byos(**spec)
    obj["metadata"].update(uid="uid-1", generation=1)
    if status is not None:
        obj["status"] = status
    return obj


def ctx(obj: dict) -> JobContext:
    spec = parse_spec(obj)
    builder = TorchrunGang(obj=obj, resources=spec.resources, scheduling=spec.scheduling,
                           module="kubeforge.runtime.pretrain", resolved_spec=spec.to_wire(),
                           secret_name="kubeforge-s3", s3_endpoint=None, entrypoint=spec.entrypoint)
    return JobContext(obj=obj, spec=spec, builder=builder, workload_version="v1beta2")


# --- validation ------------------------------------------------------------------------------------------

# The invalid and valid cases live in test_validation.py's tables (the integration suite sends those to a
# real API server too, to check the CEL rules agree).


def test_the_crd_carries_the_same_rule_in_cel():
    crd = crdgen.crd_for(BY_KIND["PretrainJob"])
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["checkpoint"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any(r.startswith("has(self.entrypoint) ?") for r in rules)
    assert "has(self.module)" in spec["properties"]["entrypoint"]["x-kubernetes-validations"][0]["rule"]


# --- rendering -------------------------------------------------------------------------------------------


def test_the_gang_runs_the_users_script_under_torchrun_with_the_launcher_env():
    p = plan(ctx(byos_job()), Observed(), T0)
    pods = [m for m in p.create if m["kind"] == "Pod"]
    assert len(pods) == 2
    for rank, m in enumerate(pods):
        c = m["spec"]["containers"][0]
        assert c["command"][:3] == ["python", "-m", "kubeforge.runtime.launch"]
        assert "--nnodes=2" in c["command"] and "--max-restarts=0" in c["command"]
        assert c["command"][-3:] == ["/workspace/train.py", "--lr", "0.1"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "1" and env["PET_NODE_RANK"] == str(rank)
        assert env["PET_MASTER_ADDR"] == "ptj-worker-0.ptj.ns1.svc" and env["PET_MASTER_PORT"] == env["MASTER_PORT"]
        assert env[contract.ENV_CHECKPOINT_URI] == "s3://kubeforge/checkpoints/ptj"
        assert env[contract.ENV_HEARTBEAT_SECONDS] == "10"
        assert contract.ENV_RESUME_STEP not in env  # nothing committed yet
        assert c["envFrom"] == [{"secretRef": {"name": "kubeforge-s3"}}]
    spec_file = json.loads(next(m for m in p.create if m["kind"] == "ConfigMap")["data"]["job.json"])
    assert spec_file["spec"]["entrypoint"] == SCRIPT and "model" not in spec_file["spec"]


def test_a_module_entrypoint_and_the_resume_step_of_the_next_attempt():
    obj = byos_job({"attempt": 1, "lastCheckpoint": {"uri": "s3://kubeforge/checkpoints/ptj/step-00000040",
                                                     "step": 40}},
                   entrypoint={"module": "mypkg.train", "args": ["--steps", "100"]})
    p = plan(ctx(obj), Observed(), T0)
    c = next(m for m in p.create if m["kind"] == "Pod")["spec"]["containers"][0]
    assert c["command"][-4:] == ["-m", "mypkg.train", "--steps", "100"]
    assert {e["name"]: e.get("value") for e in c["env"]}[contract.ENV_RESUME_STEP] == "40"


def test_the_builtin_trainer_gets_no_heartbeat():
    from test_training_planner import job

    c = next(m for m in plan(ctx(job()), Observed(), T0).create if m["kind"] == "Pod")["spec"]["containers"][0]
    env = {e["name"] for e in c["env"]}
    assert contract.ENV_HEARTBEAT_SECONDS not in env and "PET_NNODES" in env


def test_a_heartbeat_keeps_a_silent_script_alive_and_its_absence_is_a_hang():
    obj = byos_job(running_status(), runPolicy={"progressDeadlineSeconds": 120})
    fresh = [pod(0, annotations={contract.HEARTBEAT_ANNOTATION: rfc3339(T0 - timedelta(seconds=30))}), pod(1)]
    assert plan(ctx(obj), Observed(pods=fresh), T0).status.phase == "Running"
    stale = [pod(0, annotations={contract.HEARTBEAT_ANNOTATION: rfc3339(T0 - timedelta(seconds=200))}), pod(1)]
    p = plan(ctx(obj), Observed(pods=stale), T0)
    assert p.status.restarts == 1 and p.events[0].reason == "ProgressDeadlineExceeded"


def test_step_reports_outrank_the_heartbeat():
    obj = byos_job(running_status(), runPolicy={"progressDeadlineSeconds": 120})
    old = rfc3339(T0 - timedelta(seconds=200))
    pods = [pod(0, annotations={contract.PROGRESS_ANNOTATION: json.dumps({"step": 3, "time": old}),
                                contract.HEARTBEAT_ANNOTATION: rfc3339(T0)}), pod(1)]
    assert plan(ctx(obj), Observed(pods=pods), T0).events[0].reason == "ProgressDeadlineExceeded"


def test_success_without_an_output_says_so():
    pods = [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)]
    p = plan(ctx(byos_job(running_status())), Observed(pods=pods), T0)
    assert p.status.phase == "Succeeded" and p.status.message == "training finished"


# --- heartbeat -------------------------------------------------------------------------------------------


def test_heartbeat_beats_only_while_the_workers_use_cpu():
    from kubeforge.runtime.heartbeat import Heartbeat

    sent: list[str] = []
    busy = subprocess.Popen([sys.executable, "-c", "import sys\nwhile sys.stdin.read(1): sum(range(10**5))"],
                            stdin=subprocess.PIPE)
    try:
        beat = Heartbeat(sent.append, interval=1.0)
        busy.stdin.write(b"x" * 200)  # type: ignore[union-attr]
        busy.stdin.flush()  # type: ignore[union-attr]
        assert beat.beat_once() and len(sent) == 1
        # blocked on stdin: no CPU, no beat (until it is given work again)
        fake_idle = Heartbeat(sent.append, interval=1.0, cpu_seconds=lambda _root: beat.last_cpu)
        fake_idle.last_cpu = beat.last_cpu
        assert not fake_idle.beat_once() and len(sent) == 1
    finally:
        busy.kill()
        busy.wait()


# --- sdk -------------------------------------------------------------------------------------------------


def test_sdk_commits_manifest_last_and_resumes_from_the_newest_commit(s3_env, s3_client, bucket, tmp_path: Path):
    from kubeforge.runtime.sdk import Run
    from kubeforge.storage import CheckpointStore

    uri = f"s3://{bucket}/ckpt/job"
    env = {**s3_env, contract.ENV_CHECKPOINT_URI: uri, contract.ENV_PROGRESS_MODE: f"file:{tmp_path}/p.jsonl",
           "RANK": "0", "WORLD_SIZE": "1"}
    run = Run(total_steps=30, env=env, handle_sigterm=False)
    assert run.restore() is None
    run.report(1, loss=2.5, tokens=64)
    for step in (10, 20):
        with run.checkpoint(step, tokens=step * 64) as d:
            (d / "state.json").write_text(json.dumps({"step": step}))
    # an interrupted upload (files, no manifest) is never resumed from
    s3_client.put_object(Bucket=bucket, Key="ckpt/job/step-00000030/state.json", Body=b"{}")
    run.finish()
    store = CheckpointStore(uri, client=s3_client)
    assert store.latest_hint() == 20 and [c.step for c in store.committed_checkpoints()] == [10, 20]

    again = Run(total_steps=30, env=env, handle_sigterm=False)
    restored = again.restore(tmp_path / "restored")
    assert restored is not None and restored.step == 20 and restored.tokens == 1280
    assert json.loads((restored.path / "state.json").read_text()) == {"step": 20}
    again.close()
    reports = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert reports[0]["step"] == 1 and reports[0]["loss"] == 2.5 and reports[0]["totalSteps"] == 30
    assert reports[-1]["lastCheckpoint"]["step"] == 20 and reports[-1]["lastCheckpoint"]["uri"].endswith(
        "step-00000020")


# --- TorchX AppDef -> PretrainJob ------------------------------------------------------------------------


def test_a_dist_ddp_app_becomes_a_valid_pretrainjob():
    from torchx.components.dist import ddp

    from kubeforge.torchx_scheduler import Opts, app_to_pretrain_job

    app = ddp("--steps", "40", "--out", "${app_id}", script="/work/train.py", j="2x1", image="trainer:1",
              env={"SEED": "3"}, max_retries=2, gpu=2, cpu=4, memMB=8192)
    cfg = Opts(checkpoint_uri="s3://kubeforge/torchx/", namespace="team-a", queue="gpu-queue",
               checkpoint_secret="kubeforge-s3")
    obj = app_to_pretrain_job(app, cfg, "train-abc")
    assert validate(obj) == []
    spec = obj["spec"]
    assert obj["metadata"]["namespace"] == "team-a"
    assert spec["entrypoint"] == {"script": "/work/train.py", "args": ["--steps", "40", "--out", "train-abc"]}
    res = spec["resources"]
    assert res["numNodes"] == 2 and res["processesPerNode"] == 1 and res["image"] == "trainer:1"
    assert res["requests"] == {"cpu": "4", "memory": "8192Mi", "nvidia.com/gpu": "2"}
    assert res["limits"] == {"nvidia.com/gpu": "2"}
    assert {"name": "SEED", "value": "3"} in res["env"]
    assert spec["scheduling"] == {"queueName": "gpu-queue"} and spec["runPolicy"] == {"maxRestarts": 2}
    assert spec["checkpoint"] == {"uri": "s3://kubeforge/torchx/train-abc", "intervalSteps": 100,
                                  "secretRef": {"name": "kubeforge-s3"}}


def test_a_module_app_and_processes_per_node():
    from torchx.components.dist import ddp

    from kubeforge.torchx_scheduler import Opts, app_to_pretrain_job

    app = ddp("--epochs", "1", m="mypkg.train", j="3x4")
    obj = app_to_pretrain_job(app, Opts(checkpoint_uri="s3://kubeforge/t"), "m-1")
    assert obj["spec"]["entrypoint"] == {"module": "mypkg.train", "args": ["--epochs", "1"]}
    assert obj["spec"]["resources"]["numNodes"] == 3 and obj["spec"]["resources"]["processesPerNode"] == 4


def test_apps_kubeforge_cannot_run_are_refused():
    from torchx.specs import AppDef, Resource, Role

    from kubeforge.torchx_scheduler import Opts, app_to_pretrain_job

    res = Resource(cpu=1, gpu=0, memMB=512)
    two = AppDef("two", roles=[Role("a", "img", entrypoint="python", args=["a.py"], resource=res),
                              Role("b", "img", entrypoint="python", args=["b.py"], resource=res)])
    with pytest.raises(ValueError, match="one gang"):
        app_to_pretrain_job(two, Opts(checkpoint_uri="s3://kubeforge/t"), "two")
    shell = AppDef("sh", roles=[Role("a", "img", entrypoint="echo", args=["hi"], resource=res)])
    with pytest.raises(ValueError, match="torchrun or python"):
        app_to_pretrain_job(shell, Opts(checkpoint_uri="s3://kubeforge/t"), "sh")


def test_the_scheduler_is_found_through_torchx_entry_points(tmp_path: Path):
    """What `pip install kubeforge[torchx]` declares, seen by TorchX's own registry in a fresh interpreter."""
    from torchx_entry_points import entry_point_env

    code = ("from torchx.schedulers import get_scheduler_factories\n"
            "s = get_scheduler_factories()['kubeforge']('session')\n"
            "print(type(s).__module__, sorted(s.run_opts()._opts))")
    env = entry_point_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "kubeforge.torchx_scheduler"
    assert "checkpoint_uri" in out.stdout and "queue" in out.stdout
