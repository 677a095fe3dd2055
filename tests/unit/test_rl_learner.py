"""The RLJob runtime for real: torchrun on CPU (gloo), a tiny Llama read from a real S3 server, prompts from
S3, rewards, the clipped update, checkpoints with the PretrainJob store, SIGTERM, resume and export."""

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
from kubeforge.runtime.rl import learner as rl_learner
from kubeforge.runtime.rl import policy, tasks
from kubeforge.storage import CheckpointStore, make_client
from kubeforge.storage import s3 as s3mod

ROOT = Path(__file__).resolve().parents[2]


class Run:
    """One learner pod: the launcher as a subprocess with its own progress and termination files."""

    def __init__(self, tmp: Path, tag: str, job: dict[str, Any], s3_env: dict[str, str], nproc: int = 1,
                 extra_env: dict[str, str] | None = None) -> None:
        self.dir = tmp / tag
        self.dir.mkdir(parents=True)
        spec = localrun.write_job(job, self.dir / "job.json")
        self.progress_file = self.dir / "progress.jsonl"
        self.term = self.dir / "termination-log"
        env = localrun.runtime_env(s3_env, spec, tmp / "work", self.progress_file, self.term)
        env.update(extra_env or {})
        self.log = (self.dir / "out.log").open("w")
        argv = localrun.launch_argv(nproc, localrun.free_port(), module="kubeforge.runtime.rl.learner")
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def progress(self) -> list[dict[str, Any]]:
        return localrun.read_progress(self.progress_file)

    def wait_for(self, pred: Any, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.progress():
                if pred(p):
                    return p
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"condition not reached; rc={self.proc.poll()}\n{self.output()[-3000:]}")

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "out.log").read_text()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tasks.weak_base_model(tmp_path_factory.mktemp("base") / "model")


def upload_task(s3_client: Any, bucket: str, model_dir: Path) -> tuple[str, str]:
    s3mod.upload_dir(s3_client, model_dir, f"s3://{bucket}/base")
    body = "".join(json.dumps(r) + "\n" for r in tasks.arithmetic_records())
    s3_client.put_object(Bucket=bucket, Key="prompts/add.jsonl", Body=body.encode())
    return f"s3://{bucket}/base", f"s3://{bucket}/prompts/"


def rl_job(model_uri: str, data_uri: str, ckpt_uri: str, **algorithm: Any) -> dict[str, Any]:
    """examples/rl-tiny.yaml's algorithm, reward and rollout, on this test's S3 server."""
    import yaml

    example = yaml.safe_load((ROOT / "examples" / "rl-tiny.yaml").read_text())["spec"]
    spec = {
        "model": {"uri": model_uri},
        "data": {"uri": data_uri},
        "algorithm": {**example["algorithm"], **algorithm},
        "reward": example["reward"],
        "rollout": example["rollout"],
        "checkpoint": {"uri": ckpt_uri, "intervalSteps": 25, "keep": 2},
    }
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "RLJob",
            "metadata": {"name": "rl", "namespace": "default", "uid": "11111111-0000-0000-0000-000000000000"},
            "spec": spec}


def curve_mean(points: list[dict[str, Any]], last: int = 10) -> float:
    tail = points[-last:]
    return sum(p["reward"] for p in tail) / len(tail)


def test_prompt_set_is_deterministic_and_resumable() -> None:
    recs = [rl_learner.PromptRecord(str(i), None) for i in range(5)]
    a = rl_learner.PromptSet(recs, seed=3)
    first = [r.prompt for r in a.take(2, 0, 2)] + [r.prompt for r in a.take(2, 0, 2)]
    b = rl_learner.PromptSet(recs, seed=3)
    b.cursor = 4
    assert [r.prompt for r in b.take(2, 0, 2)] == first[2:]
    other_rank = rl_learner.PromptSet(recs, seed=3)
    assert not set(r.prompt for r in other_rank.take(2, 1, 2)) & set(first[:2])
    with pytest.raises(rl_learner.InvalidSpec, match="line 2"):
        rl_learner.parse_prompts(['{"prompt": "x"}', "junk"], "text")


def test_sampler_logprobs_equal_the_learners(base_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubeforge.runtime.tinymodel import byte_tokenizer

    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base_model)
    prompts = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in ("1+2=", "33+4=")]
    comps = policy.sample(model, prompts, 4, 5, 1.0, tok.eos_token_id, tok.pad_token_id, version=7,
                          generator=torch.Generator().manual_seed(0))
    assert {c.version for c in comps} == {7} and [c.prompt_index for c in comps] == [0] * 4 + [1] * 4
    batch = policy.pack([c.prompt_ids for c in comps], [c.completion_ids for c in comps], tok.pad_token_id)
    with torch.no_grad():
        lp = policy.completion_logprobs(model, batch)
    for i, c in enumerate(comps):
        assert lp[i, :len(c.logprobs)].tolist() == pytest.approx(c.logprobs, abs=1e-5)


def test_grpo_learns_addition_and_resumes(s3_env: dict[str, str], s3_client: Any, bucket: str,
                                          base_model: Path, tmp_path: Path) -> None:
    model_uri, data_uri = upload_task(s3_client, bucket, base_model)
    job = rl_job(model_uri, data_uri, f"s3://{bucket}/ckpt")
    first = Run(tmp_path, "run1", job, s3_env)
    first.wait_for(lambda p: (p.get("lastCheckpoint") or {}).get("step") == 25)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 143, first.output()[-3000:]
    stopped = first.progress()[-1]
    assert stopped["step"] >= 25 and stopped["rl"]["policyVersion"] == stopped["step"]
    # the base policy's reward, recorded at step 1 (the curve keeps only recent points: by the time the
    # SIGTERM lands its first point may be later than step 1 on a fast or a slow machine alike)
    assert stopped["rl"]["initialReward"] < 0.2, stopped["rl"]

    second = Run(tmp_path, "run2", job, s3_env)
    assert second.wait() == 0, second.output()[-3000:]
    out = second.output()
    assert f"resumed at step {stopped['step']}" in out
    final = second.progress()[-1]
    assert final["step"] == 100 and final["outputUri"] == f"s3://{bucket}/ckpt/final"
    assert curve_mean(final["rl"]["rewardCurve"]) > 0.7, final["rl"]["rewardCurve"]
    assert final["rl"]["rewardFailures"] == 0 and final["rl"]["droppedStale"] == 0
    assert final["rl"]["initialReward"] == stopped["rl"]["initialReward"]  # kept across the resume
    store = CheckpointStore(f"s3://{bucket}/ckpt", client=make_client(env=s3_env))
    steps = [c.step for c in store.committed_checkpoints()]
    assert steps[-1] == 100
    # provenance of the exported policy: the base model it started from, the prompts, the rewards
    store.download_final(tmp_path / "final")
    prov = json.loads((tmp_path / "final" / "kubeforge-provenance.json").read_text())
    assert (prov["kind"], prov["name"], prov["steps"]) == ("RLJob", "rl", 100)
    assert prov["source"]["uri"] == model_uri and prov["data"] == [data_uri]
    assert prov["metrics"]["initialReward"] == stopped["rl"]["initialReward"]
    assert prov["metrics"]["reward"] == pytest.approx(final["reward"], rel=1e-5)
    assert prov["evals"]["rewardCurve"] == final["rl"]["rewardCurve"]
    assert prov["evals"]["reward"] == "verifiable:exact_match"


def test_disaggregated_learner_pushes_weights_to_a_real_engine_and_stops_it(
        s3_env: dict[str, str], s3_client: Any, bucket: str, base_model: Path, tmp_path: Path) -> None:
    from kubeforge.runtime.serve.testing import engine_proc

    model_uri, data_uri = upload_task(s3_client, bucket, base_model)
    job = rl_job(model_uri, data_uri, f"s3://{bucket}/disagg", steps=6, klCoef=0.0)
    job["spec"]["rollout"]["placement"] = "disaggregated"
    job["spec"]["weightSync"] = {"method": "http", "intervalSteps": 2}
    engine = engine_proc(str(base_model), name="policy", log_path=str(tmp_path / "engine.log")).wait()
    try:
        run = Run(tmp_path, "disagg", job, s3_env, extra_env={"KUBEFORGE_ROLLOUT_URLS": engine.url})
        assert run.wait() == 0, run.output()[-3000:]
        final = run.progress()[-1]
        assert final["step"] == 6 and final["rl"]["policyVersion"] == 6
        assert final["rl"]["engineVersions"] == [6] and final["rl"]["droppedStale"] == 0
        # steps 2, 4, 6 sampled from an engine one version behind: kept with importance weights
        assert final["rl"]["importanceCorrected"] == 3 * 16 * 8
        assert engine.proc.wait(30) == 0  # the learner stopped the engine when it was done
    finally:
        engine.stop()


@pytest.mark.parametrize("algorithm", [
    {"name": "ppo", "klCoef": 0.0, "gamma": 1.0, "gaeLambda": 0.95},
    {"name": "rloo", "klCoef": 0.04, "klEstimator": "k1"},
    {"name": "dapo", "klCoef": 0.0, "clipRangeHigh": 0.28},
    {"name": "grpo", "scaleRewards": "none"},
], ids=lambda a: a["name"] + "-" + a.get("scaleRewards", ""))
def test_every_algorithm_trains_and_exports(s3_env: dict[str, str], s3_client: Any, bucket: str, base_model: Path,
                                            tmp_path: Path, algorithm: dict[str, Any]) -> None:
    model_uri, data_uri = upload_task(s3_client, bucket, base_model)
    job = rl_job(model_uri, data_uri, f"s3://{bucket}/{algorithm['name']}", steps=4, **algorithm)
    run = Run(tmp_path, "run", job, s3_env)
    assert run.wait() == 0, run.output()[-3000:]
    final = run.progress()[-1]
    assert final["step"] == 4 and final["rl"]["policyVersion"] == 4 and final["outputUri"]
    assert (final["rl"]["kl"] != 0) == (algorithm.get("klCoef", 0.04) > 0)  # a reference only when klCoef > 0
    # the exported policy is a plain causal LM (ppo's value head is not part of it)
    from transformers import AutoModelForCausalLM

    local = tmp_path / "out"
    s3mod.download_dir(s3_client, final["outputUri"], local)
    AutoModelForCausalLM.from_pretrained(local)


def test_disaggregated_learner_broadcasts_weights_through_the_worker_extension(
        s3_env: dict[str, str], s3_client: Any, bucket: str, base_model: Path, tmp_path: Path) -> None:
    """weightSync.method nccl as the operator renders it for vLLM engines, over gloo: the learner drives the
    engine's worker extension through /collective_rpc (the reference engine serves it with the same class)."""
    from kubeforge.runtime.serve.testing import engine_proc

    model_uri, data_uri = upload_task(s3_client, bucket, base_model)
    job = rl_job(model_uri, data_uri, f"s3://{bucket}/disagg-nccl", steps=5, klCoef=0.0)
    job["spec"]["rollout"].update(placement="disaggregated", engine="vllm")
    job["spec"]["weightSync"] = {"method": "nccl", "intervalSteps": 2}
    engine = engine_proc(str(base_model), name="policy", log_path=str(tmp_path / "engine.log")).wait()
    try:
        run = Run(tmp_path, "disagg-nccl", job, s3_env, extra_env={
            "KUBEFORGE_ROLLOUT_URLS": engine.url, "KUBEFORGE_POD_IP": "127.0.0.1",
            "KUBEFORGE_WEIGHT_SYNC_PORT": str(localrun.free_port())})
        assert run.wait() == 0, run.output()[-3000:]
        final = run.progress()[-1]
        assert final["step"] == 5 and final["rl"]["policyVersion"] == 5
        # pushed at start (0) and after steps 2 and 4: the engine serves version 4, one behind the learner
        assert final["rl"]["engineVersions"] == [4] and final["rl"]["droppedStale"] == 0
        assert final["rl"]["importanceCorrected"] == 2 * 16 * 8  # steps 2 and 4 lag one version
        assert "weight-sync group of 2 ranks (gloo)" in run.output()
        assert engine.proc.wait(30) == 0  # the learner stopped the engine when it was done
    finally:
        engine.stop()


def _comp(version: int, n_tokens: int = 2, logprobs: list[float] | None = None) -> policy.Completion:
    return policy.Completion(0, [1], list(range(3, 3 + n_tokens)), "", version, False, logprobs or [])


@pytest.mark.parametrize(("version", "logprobs", "lag_limit", "off_policy", "admitted"), [
    (7, None, 0, "tis", True),            # the learner's own version
    (6, [-1.0, -2.0], 1, "tis", True),    # one behind, within maxLag, sampler log-probs known: weighted
    (6, None, 1, "tis", False),           # ... but no sampler log-probs: cannot be weighted
    (6, [-1.0], 1, "tis", False),         # ... log-probs not of its tokens
    (6, [-1.0, -2.0], 1, "drop", False),  # offPolicy drop
    (5, [-1.0, -2.0], 1, "tis", False),   # two behind, past maxLag
    (-1, [-1.0, -2.0], 3, "tis", False),  # an engine changed under the batch
    (8, None, 3, "tis", False),           # newer than the learner: never
])
def test_stale_completions_are_dropped_or_importance_corrected(version, logprobs, lag_limit, off_policy,
                                                               admitted) -> None:
    assert rl_learner.admit([_comp(version, logprobs=logprobs)], 7, lag_limit, off_policy) == [admitted]


def test_max_lag_defaults_to_what_the_sync_interval_causes() -> None:
    from kubeforge.api.kinds import RLJobSpec

    job = rl_job("s3://bucket/m", "s3://bucket/p", "s3://bucket/c")
    spec = RLJobSpec.model_validate({**job["spec"], "weightSync": {"method": "http", "intervalSteps": 4}})
    assert rl_learner.max_lag(spec) == 3
    spec = RLJobSpec.model_validate({**job["spec"], "weightSync": {"method": "http", "intervalSteps": 4,
                                                                   "maxLag": 1}})
    assert rl_learner.max_lag(spec) == 1


def test_sampler_logprobs_pad_and_mark_the_completions_that_have_them() -> None:
    lp, has = rl_learner.sampler_logprobs([_comp(1, 2, [-1.0, -2.0]), _comp(1, 1), _comp(1, 2, [-3.0])], 3)
    assert lp.tolist() == [[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert has.tolist() == [True, False, False]
