"""ppo's value head under a 2-process gloo gang: one real Learner.step per rank on different prompts and
rewards, and the value heads (and the policy) are identical on both ranks afterwards, and they moved."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kubeforge.runtime import localrun


class LengthReward:
    """A reward that differs between ranks' completions, so the value heads' local gradients differ."""

    def score(self, prompts, completions, references):
        from kubeforge.runtime.rl.rewards import Scores

        return Scores([float(len(c) % 3) / 2 for c in completions])


def _step(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    from kubeforge.api.common import OptimizerSpec
    from kubeforge.api.kinds import RLJobSpec
    from kubeforge.runtime import dist as kdist
    from kubeforge.runtime.rl import learner as rl
    from kubeforge.runtime.tinymodel import build_model, byte_tokenizer, tiny_llama_config
    from kubeforge.runtime.training import build_optimizer, build_scheduler

    denv = kdist.DistEnv.from_env()
    choice = kdist.choose("ddp", "auto", False)
    device = kdist.init(choice, denv)
    spec = RLJobSpec.model_validate({
        "model": {"uri": "s3://bucket/m"}, "data": {"uri": "s3://bucket/p"},
        "algorithm": {"name": "ppo", "groupSize": 4, "promptsPerStep": 4, "lr": 1e-2, "klCoef": 0.0},
        "reward": {"verifiable": {"check": "exact_match"}}, "rollout": {"engine": "reference", "maxNewTokens": 6},
        "weightSync": {"method": "http"}, "checkpoint": {"uri": "s3://bucket/c"}})
    tok = byte_tokenizer()
    model = build_model(tiny_llama_config(), seed=0)
    rl.ValueHead.attach(model)
    model = kdist.wrap(model, choice, device, denv)
    opt_spec = OptimizerSpec(lr=1e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", beta2=0.999)
    optimizer = build_optimizer(model, opt_spec, "cpu")
    learner = rl.Learner(spec, model, optimizer, build_scheduler(optimizer, opt_spec, 1), tok, LengthReward(),
                         None, denv, choice, tok.eos_token_id, tok.pad_token_id, seed=0)
    prompts = rl.PromptSet([rl.PromptRecord(f"{a}+{b}=", None) for a in range(4) for b in range(4)], seed=rank)
    learner.step(prompts)
    base = kdist.unwrap(model)
    torch.save({"head": base.kf_value_head.state_dict(), "embed": base.model.embed_tokens.weight.detach()},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ppo_value_heads_are_identical_on_every_rank_after_a_step(tmp_path) -> None:
    mp.spawn(_step, args=(localrun.free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in ("weight", "bias"):
        assert torch.equal(r0["head"][k], r1["head"][k]), k
    assert float(r0["head"]["weight"].abs().sum()) > 0  # the zero-initialised head was updated
    assert torch.equal(r0["embed"], r1["embed"])
