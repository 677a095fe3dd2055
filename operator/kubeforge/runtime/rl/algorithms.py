"""Advantages and losses of grpo, rloo, dapo and ppo, as pure tensor functions.

Shapes: `rewards` [N] with N = prompts x groupSize, completions of one prompt adjacent; token tensors
[N, T] over completion tokens with `mask` 1 on real tokens (EOS included) and 0 on padding.

- grpo: A = (r - mean_group) / (std_group + eps); `scale` batch divides by the batch std instead, none not
  at all (Dr. GRPO). std is the unbiased one, as in TRL.
- rloo: A_i = r_i - mean of the other G-1 rewards of its group.
- dapo: grpo advantages with clip-higher (clip_high > clip_low) and dynamic sampling: groups whose rewards
  are all equal carry no signal and are dropped (`informative_groups`).
- ppo: a critic's values, GAE over the completion tokens with the outcome reward on the last token,
  whitened advantages, clipped value loss.
All policy losses are token-mean: the sum over every completion token of the batch over their count.
KL against the reference: k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased,
non-negative estimator), applied only when the coefficient is > 0.
Off-policy correction of completions a lagging engine sampled: truncated importance sampling, each token's
surrogate weighted by min(pi_old / pi_sampler, cap) (detached), as verl's and OpenRLHF's "TIS".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-4


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """grpo/dapo advantages, one per completion."""
    g = _grouped(rewards.float(), group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centred = centred / (std + EPS)
    elif scale == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else torch.zeros(())
        centred = centred / (std + EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}: group, batch or none")
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline: each reward minus the mean of the rest of its group."""
    if group_size < 2:
        raise ValueError("rloo needs groupSize >= 2")
    g = _grouped(rewards.float(), group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """dapo's dynamic sampling: True for each group whose rewards are not all equal."""
    g = _grouped(rewards.float(), group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) > 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from the sampled tokens' log-probabilities."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {kind!r}: k1 or k3")


@dataclass
class LossStats:
    pg_loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate (PPO/GRPO), token-mean, plus kl_coef x KL to the reference when kl_coef > 0.
    `advantages` is [N] (one per completion) or [N, T] (per token, ppo)."""
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.float()
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    surrogate = torch.maximum(unclipped, clipped)
    if is_weights is not None:  # behaviour-policy correction: a constant per token
        surrogate = surrogate * is_weights.detach()
    pg = masked_mean(surrogate, mask)
    loss = pg
    kl_value = torch.zeros(())
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference log-probabilities")
        kl_value = masked_mean(kl_estimate(logp, ref_logp, kl_kind), mask)
        loss = loss + kl_coef * kl_value
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        stats = LossStats(float(pg), float(kl_value), float(clip_frac), float(masked_mean(ratio, mask)))
    return loss, stats


def truncated_is_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, has_sampler: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """[N, T] min(exp(old - sampler), cap) where the sampler's log-probability is known (`has_sampler` [N]),
    1 elsewhere (a completion the learner's own weights sampled)."""
    w = torch.clamp(torch.exp(old_logp.float() - sampler_logp.float()), max=cap)
    return torch.where(has_sampler.bool().unsqueeze(1), w, torch.ones_like(w))


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] outcome rewards placed on each completion's last real token: [N, T]."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    last = (mask.long().cumsum(dim=1).argmax(dim=1))  # index of the last 1
    has = mask.sum(dim=1) > 0
    out[torch.arange(mask.size(0))[has], last[has]] = rewards.float()[has]
    return out


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens; values past a completion's end are 0.
    Returns (advantages, returns = advantages + values), both [N, T] and zero on padding."""
    mask = mask.float()
    values = values.float() * mask
    n, t = values.shape
    adv = torch.zeros(n, t)
    last = torch.zeros(n)
    for i in reversed(range(t)):
        next_v = values[:, i + 1] if i + 1 < t else torch.zeros(n)
        delta = token_rewards[:, i] + gamma * next_v - values[:, i]
        last = (delta + gamma * lam * last) * mask[:, i]
        adv[:, i] = last
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """0.5 x max((v - R)^2, (clip(v, v_old +- clip) - R)^2), token-mean (PPO's clipped value loss)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask.float())


def advantages_for(name: str, rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Per-completion advantages of a critic-free algorithm."""
    if name in ("grpo", "dapo"):
        return group_advantages(rewards, group_size, "group" if name == "dapo" else scale)
    if name == "rloo":
        return rloo_advantages(rewards, group_size)
    raise ValueError(f"{name} has no critic-free advantages")

