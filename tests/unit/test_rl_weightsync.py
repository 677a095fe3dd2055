"""Weight sync to a real reference engine over HTTP: after a push the engine's log-probabilities of the same
tokens equal the learner's, its greedy output is the learner's, and a stale engine is caught."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch

from kubeforge.runtime.rl import policy
from kubeforge.runtime.rl.weightsync import EngineClient, StaleEngine, push_weights, state_dict_bytes
from kubeforge.runtime.serve.testing import engine_proc
from kubeforge.runtime.tinymodel import byte_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("rl-sync") / "model", seed=5)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = engine_proc(str(model_dir), log_path=str(tmp_path_factory.mktemp("rl-sync-log") / "engine.log"))
    yield proc.wait()
    proc.stop()


def _learner_step(model: torch.nn.Module, batch: policy.Batch) -> None:
    """A real update: push up the log-probability of the batch's completions."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = -policy.completion_logprobs(model, batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_engine_logprobs_after_sync_equal_the_learners(model_dir: Path, engine) -> None:
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    learner = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in ("2+3=", "hello ")]
    comps = policy.sample(learner, prompts, 2, 6, 1.0, tok.eos_token_id, tok.pad_token_id, version=0,
                          generator=torch.Generator().manual_seed(1))
    batch = policy.pack([c.prompt_ids for c in comps], [c.completion_ids for c in comps], tok.pad_token_id)
    client = EngineClient(engine.url)
    assert client.version() == 0

    _learner_step(learner, batch)
    learner.eval()
    with torch.no_grad():
        mine = policy.completion_logprobs(learner, batch)

    def engine_vs_learner(version: int) -> float:
        ratios = []
        for i, c in enumerate(comps):
            theirs = client.logprobs(c.prompt_ids, c.completion_ids, version)
            ratios += [math.exp(abs(a - b)) for a, b in zip(theirs, mine[i, :len(c.completion_ids)].tolist(),
                                                            strict=True)]
        return sum(ratios) / len(ratios)

    before = engine_vs_learner(0)
    assert before > 1.05  # the engine still has the old weights

    push_weights(learner, [client], version=1)
    assert client.version() == 1
    assert engine_vs_learner(1) == pytest.approx(1.0, abs=1e-4)

    # after the reload the engine generates what the learner's weights generate (no garbage after reload)
    ids = prompts[0]
    r = httpx.post(engine.url + "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 6,
                                                         "temperature": 0, "ignore_eos": True}, timeout=60)
    greedy = policy.sample(learner, [ids], 1, 6, 0.0, -1, tok.pad_token_id, version=1)[0]
    assert r.json()["choices"][0]["text"] == tok.decode(greedy.completion_ids)

    # a stale engine is caught: the learner moved on to version 2 without pushing
    with pytest.raises(StaleEngine, match="version 1, the learner is at 2"):
        client.check(2)
    with pytest.raises(StaleEngine):
        client.logprobs(comps[0].prompt_ids, comps[0].completion_ids, version=2)


def test_bad_weights_are_refused_and_the_old_ones_stay(engine) -> None:
    client = EngineClient(engine.url)
    have = client.version()
    from kubeforge.runtime.tinymodel import build_model, tiny_llama_config

    other = build_model(tiny_llama_config(hidden_size=32, intermediate_size=64))
    with pytest.raises(httpx.HTTPStatusError):
        client.push(state_dict_bytes(other), have + 5)
    assert client.version() == have


def test_http_rollouts_carry_the_engines_version_and_stale_batches_are_marked(model_dir: Path, engine) -> None:
    from transformers import AutoModelForCausalLM

    from kubeforge.runtime.rl.rollout import HttpRollout

    tok = byte_tokenizer()
    client = EngineClient(engine.url)
    learner = AutoModelForCausalLM.from_pretrained(model_dir)
    version = client.version() + 1
    push_weights(learner, [client], version)
    rollout = HttpRollout([client], "tiny", lambda s: tok.encode(s, add_special_tokens=False), tok.eos_token_id)
    try:
        prompt = [tok.bos_token_id, *tok.encode("1+1=", add_special_tokens=False)]
        comps = rollout.sample([prompt, prompt], 3, 4, 1.0, version, seed=0)
        assert len(comps) == 6 and {c.version for c in comps} == {version}
        assert [c.prompt_index for c in comps] == [0, 0, 0, 1, 1, 1]
        for c in comps:  # token ids re-encoded from the text (+ EOS when the engine stopped on it)
            body = c.completion_ids[:-1] if c.finished else c.completion_ids
            assert len(body) <= 4
            if "\ufffd" not in c.text:  # a random model's invalid UTF-8 does not round-trip
                assert tok.decode(body) == c.text
        # the learner is at version + 1 but never pushed it: the batch is stale
        stale = rollout.sample([prompt], 2, 4, 1.0, version + 1, seed=1)
        assert {c.version for c in stale} == {-1} and rollout.stale_batches == 1
    finally:
        rollout.close()
