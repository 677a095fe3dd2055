"""One colocated RL step of kubeforge's learner code on the available device (CUDA in bf16, else CPU in fp32):
sample G completions per prompt with the policy's own weights (policy.sample, KV cache), score them, take
the GRPO step (policy.pack / completion_logprobs / algorithms.policy_loss) and report

- sampling tokens/s, learner tokens/s (forward + backward of the packed batch), step time;
- the train/inference log-probability mismatch: the sampler's log-probabilities of the tokens it drew
  against the learner's recomputation of the same tokens (mean |dlogp|, and mean exp|dlogp|, which is 1 when
  they agree), the first thing that goes wrong when a sampler and a learner disagree (dtype, kernels, cache).

    python bench/bench_rl_device.py [--size tiny|small|base] [--steps 3] [--prompts 16] [--group 8] [--new 64]

No S3, operator or cluster: the learner's own functions on one device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from kubeforge.runtime.rl import algorithms as alg  # noqa: E402
from kubeforge.runtime.rl.policy import completion_logprobs, model_device, pack, sample  # noqa: E402

SIZES = {  # (hidden, layers, heads, kv heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "small": (512, 8, 8, 4, 1408),
    "base": (1024, 16, 16, 8, 2816),  # ~250 M parameters with a 32k vocabulary
}


def build(size: str, vocab: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, heads, kv, inter = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build(a.size, a.vocab, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, a.vocab, (12 + i % 5,), generator=gen).tolist()] for i in range(a.prompts)]
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), {dtype}, "
          f"{params / 1e6:.1f} M parameters, {a.prompts} prompts x {a.group}, up to {a.new} new tokens")
    print(f"{'step':>4} {'sample s':>9} {'sample tok/s':>12} {'learn s':>8} {'learn tok/s':>11} "
          f"{'mean|dlogp|':>11} {'exp|dlogp|':>10} {'loss':>9}")
    for step in range(a.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        comps = sample(model, prompts, a.group, a.new, 1.0, eos_id=2, pad_id=0, version=step, generator=gen)
        if cuda:
            torch.cuda.synchronize()
        t_sample = time.perf_counter() - t0
        new_tokens = sum(len(c.completion_ids) for c in comps)
        # a programmatic reward with signal in every group: the share of even token ids in the completion
        rewards = torch.tensor([sum(t % 2 == 0 for t in c.completion_ids) / max(1, len(c.completion_ids))
                                for c in comps], device=device)
        batch = pack([c.prompt_ids for c in comps], [c.completion_ids for c in comps], 0, model_device(model))
        t1 = time.perf_counter()
        with torch.no_grad():
            old_lp = completion_logprobs(model, batch, 1.0)
        sampler_lp = torch.zeros_like(old_lp)
        for i, c in enumerate(comps):
            sampler_lp[i, :len(c.logprobs)] = torch.tensor(c.logprobs, device=device)
        mask = batch.completion_mask
        diff = ((old_lp - sampler_lp).abs() * mask).sum() / mask.sum()
        ratio = (torch.exp((old_lp - sampler_lp).abs()) * mask).sum() / mask.sum()
        adv = alg.advantages_for("grpo", rewards, a.group)
        lp = completion_logprobs(model, batch, 1.0)
        loss, _ = alg.policy_loss(lp, old_lp, adv, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        t_learn = time.perf_counter() - t1
        learn_tokens = int(batch.attention_mask.sum())
        print(f"{step:>4} {t_sample:>9.2f} {new_tokens / t_sample:>12.0f} {t_learn:>8.2f} "
              f"{learn_tokens / t_learn:>11.0f} {float(diff):>11.4f} {float(ratio):>10.4f} {float(loss.detach()):>9.4f}",
              flush=True)
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
