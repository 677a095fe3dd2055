"""weightSync.method nccl, the learner's side and the code that runs inside vLLM, over gloo on CPU: the learner's
NcclWeightSync drives kubeforge's worker extension through /collective_rpc and /reset_prefix_cache of a real
reference engine process (the same extension class vLLM loads with --worker-extension-cls, with a Hugging Face
model in place of vLLM's model runner), tensors broadcast in buckets over a real torch.distributed group.
What cannot run here: vLLM's own model runner (`load_weights` onto fused GPU layers) and NCCL itself."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch

from kubeforge.runtime import localrun
from kubeforge.runtime.rl import policy
from kubeforge.runtime.rl.broadcast import TensorMeta, bucket_plan, flatten, unflatten
from kubeforge.runtime.rl.vllm_sync import EngineRpcError, NcclWeightSync, RpcEngineClient, full_named_tensors
from kubeforge.runtime.rl.weightsync import EngineClient, StaleEngine
from kubeforge.runtime.serve.testing import engine_proc
from kubeforge.runtime.tinymodel import byte_tokenizer, save_tiny_model


@pytest.mark.parametrize(("metas", "limit", "want"), [
    ([("a", "float32", (4,)), ("b", "float32", (4,)), ("c", "float32", (4,))], 32, [[0, 1], [2]]),
    ([("a", "float32", (4,)), ("b", "bfloat16", (4,)), ("c", "bfloat16", (4,))], 1 << 20, [[0], [1, 2]]),
    ([("a", "float32", (100,)), ("b", "float32", (1,))], 16, [[0], [1]]),  # too big: a bucket of its own
    ([("a", "float16", (2, 3)), ("b", "float16", (3,))], 18, [[0, 1]]),
])
def test_bucket_plan(metas, limit, want) -> None:
    plan = bucket_plan([TensorMeta(n, d, s) for n, d, s in metas], limit)
    assert plan == want


def test_flatten_unflatten_round_trip() -> None:
    ts = [torch.randn(2, 3), torch.randn(5), torch.randn(1, 1, 4)]
    metas = [TensorMeta(str(i), "float32", tuple(t.shape)) for i, t in enumerate(ts)]
    for a, b in zip(ts, unflatten(flatten(ts), metas), strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("rl-nccl") / "model", seed=5)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = engine_proc(str(model_dir), log_path=str(tmp_path_factory.mktemp("rl-nccl-log") / "engine.log"))
    yield proc.wait()
    proc.stop()


def _updated_learner(model_dir: Path, batch: policy.Batch) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    learner = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-2)
    for _ in range(3):
        loss = -policy.completion_logprobs(learner, batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return learner.eval()


def test_broadcast_sync_makes_the_engine_the_learner_and_resets_its_cache(model_dir: Path, engine) -> None:
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in ("2+3=", "hello ")]
    comps = policy.sample(base, prompts, 2, 6, 1.0, tok.eos_token_id, tok.pad_token_id, version=0,
                          generator=torch.Generator().manual_seed(1))
    batch = policy.pack([c.prompt_ids for c in comps], [c.completion_ids for c in comps], tok.pad_token_id)
    learner = _updated_learner(model_dir, batch)
    with torch.no_grad():
        mine = policy.completion_logprobs(learner, batch)
    rpc = RpcEngineClient(engine.url)
    http = EngineClient(engine.url)  # the reference engine's HTTP fence follows the extension's version
    assert rpc.workers() == 1 and rpc.version() == 0

    def engine_vs_learner(version: int) -> float:
        ratios = []
        for i, c in enumerate(comps):
            theirs = http.logprobs(c.prompt_ids, c.completion_ids, version)
            ratios += [math.exp(abs(a - b)) for a, b in zip(theirs, mine[i, :len(c.completion_ids)].tolist(),
                                                            strict=True)]
        return sum(ratios) / len(ratios)

    assert engine_vs_learner(0) > 1.05  # the engine still has the base weights

    # a first request with the base weights: were its prefix entries reused after the sync, the greedy output
    # below would not be the learner's
    prompt = prompts[0]
    httpx.post(engine.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2,
                                                     "temperature": 0}, timeout=60).raise_for_status()
    sync = NcclWeightSync([rpc], "127.0.0.1", localrun.free_port(), "gloo", bucket_bytes=64 << 10, timeout_s=120)
    try:
        tensors = full_named_tensors(learner)
        assert len(bucket_plan([TensorMeta(n, "float32", tuple(t.shape)) for n, t in tensors], 64 << 10)) > 2
        assert sync.push(tensors, version=1) == len(tensors)
        assert rpc.version() == 1 and http.version() == 1
        assert engine_vs_learner(1) == pytest.approx(1.0, abs=1e-4)

        # no garbage after reload: the engine's greedy output is the learner's
        r = httpx.post(engine.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                             "temperature": 0, "ignore_eos": True}, timeout=60)
        greedy = policy.sample(learner, [prompt], 1, 6, 0.0, -1, tok.pad_token_id, version=1)[0]
        assert r.json()["choices"][0]["text"] == tok.decode(greedy.completion_ids)

        # the group stays up: a second push moves the engine back to the base weights under version 2
        sync.push(full_named_tensors(base), version=2)
        assert rpc.version() == 2
        base_lp = policy.completion_logprobs(base, batch).detach()
        theirs = http.logprobs(comps[0].prompt_ids, comps[0].completion_ids, 2)
        assert theirs == pytest.approx(base_lp[0, :len(comps[0].completion_ids)].tolist(), abs=1e-5)

        # a stale engine is caught the same way as over HTTP
        with pytest.raises(StaleEngine, match="version 2, the learner is at 3"):
            rpc.check(3)
    finally:
        sync.close()


def test_unknown_methods_and_bad_updates_are_refused(model_dir: Path, engine) -> None:
    rpc = RpcEngineClient(engine.url)
    with pytest.raises(EngineRpcError, match="unknown method"):
        rpc.rpc("load_model")  # only the extension's kubeforge_* methods are served
    with pytest.raises(EngineRpcError, match="not called"):
        rpc.rpc("kubeforge_update_weights", '{"version": 9, "tensors": []}')
    assert rpc.version() != 9
