"""The ContextExtensionJob runtime as a pod runs it: torchrun with 2 processes, zigzag degree 2, three
stages against a real S3 server; a worker killed in stage 2 and the gang restarted resumes in stage 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kubeforge.runtime import localrun
from kubeforge.runtime.extend import rope
from kubeforge.runtime.extend.run import StagePlan, plan_stages, resume_point
from kubeforge.runtime.tinymodel import save_tiny_model
from kubeforge.runtime.training import InvalidSpec
from kubeforge.storage import CheckpointStore, make_client

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny-corpus.jsonl"
MODULE = "kubeforge.runtime.extend"


def _spec(**over: Any) -> Any:
    from kubeforge.api.kinds import ContextExtensionJobSpec

    spec = {"model": {"uri": "s3://bkt/m"}, "data": {"uri": "s3://bkt/d"}, "checkpoint": {"uri": "s3://bkt/c"},
            "scaling": {"originalMaxPositionEmbeddings": 128},
            "sequenceParallel": {"impl": "zigzag", "degree": 2},
            "stages": [{"seqLen": 256, "steps": 3, "batchTokens": 512},
                       {"seqLen": 512, "steps": 4, "batchTokens": 1024}]}
    spec.update(over)
    return ContextExtensionJobSpec.model_validate(spec)


BASE = rope.BaseRope(theta=10_000.0, max_position_embeddings=128, head_dim=16)


def test_stage_plan_numbers_steps_over_the_job_and_resumes_in_the_right_stage() -> None:
    stages = plan_stages(_spec(), BASE, world_size=2)
    assert [(s.start_step, s.end_step, s.grad_accum) for s in stages] == [(0, 3, 2), (3, 7, 2)]
    assert stages[1].rope["rope_theta"] == pytest.approx(rope.auto_theta(10_000, 128, 512))
    assert [resume_point(s, stages) for s in (None, 2, 3, 5, 7)] == \
        [(0, False), (0, True), (1, False), (1, True), (1, True)]
    assert isinstance(stages[0], StagePlan) and stages[0].record()["state"] == "Pending"


@pytest.mark.parametrize(("over", "world", "field"), [
    ({"stages": [{"seqLen": 258, "steps": 1, "batchTokens": 516}]}, 2, "spec.stages[0].seqLen"),
    ({"stages": [{"seqLen": 256, "steps": 1, "batchTokens": 300}]}, 2, "spec.stages[0].batchTokens"),
    ({"stages": [{"seqLen": 256, "steps": 1, "batchTokens": 256}]}, 4, "spec.stages[0].batchTokens"),
    ({"stages": [{"seqLen": 512, "steps": 1, "batchTokens": 512}, {"seqLen": 256, "steps": 1,
                                                                   "batchTokens": 512}]}, 2,
     "spec.stages[1].seqLen"),
    ({"stages": [{"seqLen": 1 << 20, "ropeTheta": 1000, "steps": 1, "batchTokens": 1 << 20}]}, 2,
     "spec.stages[0].ropeTheta"),
    ({}, 3, "spec.sequenceParallel.degree"),
])
def test_stage_plan_refuses_what_would_fail_at_step_zero(over: dict, world: int, field: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        plan_stages(_spec(**over), BASE, world_size=world)
    assert err.value.field == field


# ------------------------------------------------------------------------------------------- torchrun


def _job(bucket: str, prefix: str) -> dict[str, Any]:
    spec = {
        "model": {"uri": f"s3://{bucket}/models/tiny"},
        "data": {"uri": f"s3://{bucket}/data"},
        "checkpoint": {"uri": f"s3://{bucket}/{prefix}", "intervalSteps": 2, "keep": 2},
        "scaling": {"method": "theta", "originalMaxPositionEmbeddings": 128},
        "sequenceParallel": {"impl": "zigzag", "degree": 2},
        "optimizer": {"warmupSteps": 1},
        "stages": [{"seqLen": 256, "steps": 3, "batchTokens": 512, "lr": 1e-3},
                   {"seqLen": 512, "steps": 6, "batchTokens": 512, "lr": 1e-3},
                   {"seqLen": 1024, "steps": 2, "batchTokens": 1024, "lr": 1e-3}],
        "eval": {"perplexityLengths": [256, 1024], "needle": {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0]}},
    }
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "ContextExtensionJob",
            "metadata": {"name": "extend", "namespace": "default", "uid": "11111111-2222"}, "spec": spec}


class Pod:
    """One pod's launcher (torchrun, 2 processes) with its own progress and termination files."""

    def __init__(self, tmp: Path, tag: str, job: dict[str, Any], s3_env: dict[str, str]) -> None:
        self.dir = tmp / tag
        self.dir.mkdir(parents=True)
        spec = localrun.write_job(job, self.dir / "job.json")
        self.progress_file, self.term = self.dir / "progress.jsonl", self.dir / "termination-log"
        env = localrun.runtime_env(s3_env, spec, tmp / "work", self.progress_file, self.term)
        self.log = (self.dir / "out.log").open("w")
        self.proc = subprocess.Popen(localrun.launch_argv(2, localrun.free_port(), module=MODULE), env=env,
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, pred: Any, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in localrun.read_progress(self.progress_file):
                if pred(p):
                    return p
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"condition not reached; rc={self.proc.poll()}\n{self.output()[-4000:]}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in localrun.worker_pids(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "out.log").read_text()


def test_three_stages_kill_in_stage_two_resume_evals_and_export(s3_env: dict[str, str], s3_client: Any,
                                                               bucket: str, tmp_path: Path) -> None:
    src = save_tiny_model(tmp_path / "tiny", max_position_embeddings=128)
    for f in src.iterdir():
        s3_client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    s3_client.upload_file(str(CORPUS), bucket, "data/tiny-corpus.jsonl")
    job = _job(bucket, "extend")
    store = CheckpointStore(f"s3://{bucket}/extend", client=make_client(env=s3_env))

    # 1) run until stage 2 has committed a checkpoint past its start, then kill a worker outright
    first = Pod(tmp_path, "first", job, s3_env)
    first.wait_for(lambda p: p.get("stage") == 2 and (p.get("lastCheckpoint") or {}).get("step", 0) > 3)
    victim = localrun.worker_pids(first.proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    assert first.wait() != 0
    committed = max(c.step for c in store.committed_checkpoints())
    assert 3 < committed < 9, committed  # inside stage 2 (global steps 4..9)

    # 2) a new gang resumes in stage 2 at that step and finishes all three stages
    second = Pod(tmp_path, "second", job, s3_env)
    resumed = second.wait_for(lambda p: p.get("stage") is not None)
    assert resumed["stage"] == 2 and resumed["step"] == committed, resumed
    assert resumed["stages"][0]["state"] == "Succeeded" and "evals" in resumed["stages"][0]
    assert second.wait() == 0, second.output()[-4000:]
    assert f"resumed at step {committed}, stage 2/3" in second.output()
    done = json.loads(second.term.read_text())
    assert [s["state"] for s in done["stages"]] == ["Succeeded"] * 3 and done["step"] == 11
    last = localrun.read_progress(second.progress_file)[-1]
    assert last["outputUri"] == done["outputUri"]
    for rec in last["stages"]:
        assert rec["evals"]["perplexity"].keys() == {"256", "1024"} and 0 <= rec["evals"]["needleScore"] <= 1
        assert rec["loss"] > 0 and rec["tokensPerSecond"] > 0 and rec["stepsDone"] == rec["steps"]

    # 3) the export carries the last stage's RoPE and length, and loads with plain transformers
    from transformers import AutoModelForCausalLM

    out = tmp_path / "final"
    store.download_final(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 1024
    assert cfg["rope_parameters"]["rope_theta"] == pytest.approx(rope.auto_theta(10_000, 128, 1024))
    assert "kubeforge" not in json.dumps(cfg)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.max_position_embeddings == 1024
    assert json.loads((out / "extension.json").read_text())["stages"][2]["seqLen"] == 1024
    # provenance: the source model (it has none of its own), every stage's evals, the final loss
    prov = json.loads((out / "kubeforge-provenance.json").read_text())
    assert (prov["kind"], prov["uid"], prov["steps"]) == ("ContextExtensionJob", "11111111-2222", 11)
    assert prov["source"] == {"uri": f"s3://{bucket}/models/tiny", "provenance": None}
    assert [e["seqLen"] for e in prov["evals"]["stages"]] == [256, 512, 1024]
    assert prov["evals"]["needleScore"] == last["stages"][2]["evals"]["needleScore"]
    assert prov["metrics"]["loss"] == pytest.approx(done["loss"], rel=1e-5)
    assert (out / "evals" / "stage-1" / "niah.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "evals" / "stage-3" / "evals.json").read_text())["seqLen"] == 1024
    for n in (1, 2, 3):
        ev = json.loads(s3_client.get_object(Bucket=bucket, Key=f"extend/evals/stage-{n}/evals.json")["Body"].read())
        assert len(ev["needle"]["cells"]) == 6
        png = s3_client.get_object(Bucket=bucket, Key=f"extend/evals/stage-{n}/niah.png")["Body"].read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_at_a_stage_boundary_starts_the_next_stage_from_the_committed_weights(
        s3_env: dict[str, str], s3_client: Any, bucket: str, tmp_path: Path) -> None:
    src = save_tiny_model(tmp_path / "tiny", max_position_embeddings=128)
    for f in src.iterdir():
        s3_client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    s3_client.upload_file(str(CORPUS), bucket, "data/tiny-corpus.jsonl")
    job = _job(bucket, "boundary")
    job["spec"]["eval"] = {}
    one = json.loads(json.dumps(job))
    one["spec"]["stages"] = job["spec"]["stages"][:1]

    # a job of stage 1 alone commits its last step (3): the boundary a longer job resumes from
    first = Pod(tmp_path, "one", one, s3_env)
    assert first.wait() == 0, first.output()[-4000:]
    second = Pod(tmp_path, "two", job, s3_env)
    assert second.wait() == 0, second.output()[-4000:]
    assert "resumed at step 3, stage 2/3" in second.output()
    reports = localrun.read_progress(second.progress_file)
    assert reports[0]["stage"] == 2 and reports[0]["step"] == 3
    assert reports[0]["stages"][0]["state"] == "Succeeded" and reports[0]["stages"][0]["stepsDone"] == 3
    done = json.loads(second.term.read_text())
    assert done["step"] == 11 and [s["state"] for s in done["stages"]] == ["Succeeded"] * 3
