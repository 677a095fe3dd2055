"""The policy as a sampler and a scorer of tokens: batched sampling with the learner's own weights
(colocated rollouts) and per-token log-probabilities of completions (old, reference and new policy).

Sequences are laid out as [left-padded prompt | right-padded completion]; position ids follow the attention
mask, so padding changes nothing a token sees. Log-probabilities use logits / temperature, the
distribution the completions were sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Completion:
    """One sampled completion, stamped with the policy version that produced it."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    version: int
    finished: bool  # ended with EOS (not cut at maxNewTokens)
    logprobs: list[float] = field(default_factory=list)  # the sampler's, when it reports them


@dataclass
class Batch:
    """Completions packed for the learner: ids [N, P+T], attention [N, P+T], completion mask [N, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: int


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         device: torch.device | str | None = None) -> Batch:
    p = max(len(x) for x in prompts)
    t = max(1, max(len(x) for x in completions))
    n = len(prompts)
    ids = torch.full((n, p + t), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p + t), dtype=torch.long)
    cmask = torch.zeros((n, t), dtype=torch.float32)
    for i, (pr, co) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, p - len(pr):p] = torch.tensor(pr, dtype=torch.long)
        attn[i, p - len(pr):p] = 1
        if co:
            ids[i, p:p + len(co)] = torch.tensor(co, dtype=torch.long)
            attn[i, p:p + len(co)] = 1
            cmask[i, :len(co)] = 1
    if device is not None:  # built on the host, moved once (a GPU learner trains on the device)
        ids, attn, cmask = ids.to(device), attn.to(device), cmask.to(device)
    return Batch(ids, attn, cmask, p)


def completion_logprobs(model: Any, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) of every completion token: [N, T] (0 on padding). Differentiable."""
    pos = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                use_cache=False)
    logits = out.logits[:, batch.prompt_len - 1:-1].float()
    if temperature > 0:
        logits = logits / temperature
    targets = batch.input_ids[:, batch.prompt_len:]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp * batch.completion_mask


@torch.no_grad()
def sample(model: Any, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
           eos_id: int, pad_id: int, version: int, generator: torch.Generator | None = None,
           decode: Any = None) -> list[Completion]:
    """group_size completions of every prompt (adjacent), sampled with a KV cache from `model`."""
    from transformers import DynamicCache

    was_training = model.training
    model.eval()
    expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(group_size)]
    plen = max(len(p) for _, p in expanded)
    n = len(expanded)
    ids = torch.full((n, plen), pad_id, dtype=torch.long)
    attn = torch.zeros((n, plen), dtype=torch.long)
    for row, (_, p) in enumerate(expanded):
        ids[row, plen - len(p):] = torch.tensor(p)
        attn[row, plen - len(p):] = 1
    dev = model_device(model)
    ids, attn = ids.to(dev), attn.to(dev)
    cache = DynamicCache()
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
    logits = out.logits[:, -1].float()
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    gen: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    next_pos = pos[:, -1] + 1
    for _ in range(max_new_tokens):
        if temperature > 0:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            # drawn on the host with the host generator, so a run samples the same tokens on CPU and GPU and
            # the generator's state (checkpointed with the learner) means the same thing on both
            tok = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(dev)
        else:
            logp = torch.log_softmax(logits, dim=-1)
            tok = logp.argmax(dim=-1)
        chosen = logp.gather(1, tok.unsqueeze(1)).squeeze(1).tolist()
        tok_host, done_host = tok.tolist(), done.tolist()
        for row in range(n):
            if not done_host[row]:
                gen[row].append(tok_host[row])
                lps[row].append(chosen[row])
                if tok_host[row] == eos_id:
                    done[row] = True
        if bool(done.all()):
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(1) | 1], dim=1)
        out = model(input_ids=tok.unsqueeze(1), attention_mask=attn, position_ids=next_pos.unsqueeze(1),
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    if was_training:
        model.train()
    result = []
    for row, (pi, p) in enumerate(expanded):
        toks = gen[row]
        finished = bool(toks) and toks[-1] == eos_id
        text_ids = toks[:-1] if finished else toks
        text = decode(text_ids) if decode else ""
        result.append(Completion(pi, list(p), toks, text, version, finished, lps[row]))
    return result
