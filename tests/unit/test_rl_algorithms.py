"""Advantage and loss math against hand-computed tables."""

from __future__ import annotations

import math

import pytest
import torch

from kubeforge.runtime.rl import algorithms as alg


def approx(t: torch.Tensor, want: list[float], abs_: float = 1e-4) -> None:
    assert t.tolist() == pytest.approx(want, abs=abs_)


def test_grpo_group_scaling() -> None:
    # group [1,0,0,0]: mean .25, unbiased std sqrt((.75^2 + 3 x .25^2) / 3) = .5
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    a = alg.group_advantages(r, 4, "group")
    # group [1,1,0,0]: mean .5, std sqrt(4 x .25 / 3) = .57735
    approx(a, [1.5, -0.5, -0.5, -0.5, 0.866, 0.866, -0.866, -0.866], 2e-3)


def test_grpo_batch_and_none_scaling() -> None:
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    approx(alg.group_advantages(r, 4, "none"), [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    batch_std = math.sqrt((3 * 0.625**2 + 5 * 0.375**2) / 7)  # batch mean .375
    want = [x / (batch_std + 1e-4) for x in [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]]
    approx(alg.group_advantages(r, 4, "batch"), want)


def test_all_equal_group_has_zero_advantage_and_is_dropped_by_dapo() -> None:
    r = torch.tensor([1.0, 1, 1, 0, 0, 0, 1, 0, 0])
    approx(alg.group_advantages(r, 3), [0, 0, 0, 0, 0, 0, 1.1546, -0.5773, -0.5773], 2e-3)
    assert alg.informative_groups(r, 3).tolist() == [False, False, True]


def test_rloo_leave_one_out() -> None:
    r = torch.tensor([1.0, 0, 0, 0, 2, 4, 6, 8])
    # [1,0,0,0]: 1 - 0, 0 - 1/3; [2,4,6,8]: 2 - 6, 4 - 16/3, 6 - 14/3, 8 - 4
    approx(alg.rloo_advantages(r, 4), [1, -1 / 3, -1 / 3, -1 / 3, -4, -4 / 3, 4 / 3, 4])
    with pytest.raises(ValueError):
        alg.rloo_advantages(r, 1)
    with pytest.raises(ValueError):
        alg.group_advantages(r, 3)


def test_kl_estimators() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    approx(alg.kl_estimate(logp, ref, "k1"), [0.0, -1.0, 1.0])
    # k3 = e^d - d - 1 with d = ref - logp = [0, 1, -1]
    approx(alg.kl_estimate(logp, ref, "k3"), [0.0, math.e - 2, math.exp(-1)])


def test_policy_loss_clip_table() -> None:
    # one completion, 4 tokens, the last one padding; ratios e^{dlogp}
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 9.0]]))
    mask = torch.tensor([[1, 1, 1, 0]])
    # A = +1: per token max(-r, -clip(r, .8, 1.2)) = [-1, -1.2, -.5]; token mean -0.9
    loss, st = alg.policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2)
    assert float(loss) == pytest.approx(-0.9)
    assert st.clip_fraction == pytest.approx(1 / 3)
    # A = -1: max(r, clip(r)) = [1, 1.5, .8]; mean 1.1
    loss, _ = alg.policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2)
    assert float(loss) == pytest.approx(1.1)
    # dapo clip-higher .28: A = +1 -> [-1, -1.28, -.5]
    loss, _ = alg.policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.28)
    assert float(loss) == pytest.approx(-(1 + 1.28 + 0.5) / 3)


def test_policy_loss_is_token_mean_over_the_batch() -> None:
    # two completions of 1 and 3 tokens, ratio 1: loss = -(1 x 2 + 3 x 0) / 4 tokens = -0.5
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = alg.policy_loss(old.clone(), old, torch.tensor([2.0, 0.0]), mask)
    assert float(loss) == pytest.approx(-0.5)


def test_policy_loss_kl_only_when_coefficient_positive() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2)
    base, st0 = alg.policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask)
    assert float(base) == 0 and st0.kl == 0
    loss, st = alg.policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask, ref_logp=ref, kl_coef=0.1)
    assert st.kl == pytest.approx((math.e - 2) / 2)
    assert float(loss) == pytest.approx(0.1 * (math.e - 2) / 2)
    with pytest.raises(ValueError):
        alg.policy_loss(logp, logp, torch.tensor([0.0]), mask, kl_coef=0.1)


def test_outcome_rewards_on_last_token() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    out = alg.outcome_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert out.tolist() == [[0, 1, 0], [0, 0, 2], [0, 0, 0]]


def test_gae_table() -> None:
    # rewards [0, 0, 1], values [.5, .6, .7], gamma 1, lambda .5:
    # deltas: d2 = 1 - .7 = .3; d1 = 0 + .7 - .6 = .1; d0 = 0 + .6 - .5 = .1
    # A2 = .3; A1 = .1 + .5 x .3 = .25; A0 = .1 + .5 x .25 = .225
    r = torch.tensor([[0.0, 0, 1]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = alg.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=0.5)
    approx(adv[0], [0.225, 0.25, 0.3])
    approx(ret[0], [0.725, 0.85, 1.0])
    # padding: a 2-token completion ignores the third value
    adv, _ = alg.gae(torch.tensor([[0.0, 1, 0]]), torch.tensor([[0.5, 0.6, 9.0]]),
                     torch.tensor([[1, 1, 0]]), gamma=0.9, lam=1.0)
    # A1 = 1 - .6 = .4; A0 = 0 + .9 x .6 - .5 + .9 x .4 = .4
    approx(adv[0], [0.4, 0.4, 0.0])


def test_value_loss_clipped() -> None:
    old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[1.0, -0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(.01, .01) = .01; 0.5 x mean = .8125
    assert float(alg.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)) == pytest.approx(0.8125)


def test_whiten() -> None:
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = alg.whiten(x, torch.tensor([[1, 1, 0]]))
    approx(w[0], [-1.0, 1.0, 0.0], 1e-3)


def test_truncated_is_weights_table() -> None:
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.5, 0.5, 0.5]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.1], [0.1, 0.1, 0.1]]))
    # row 0: ratios 2, .5, 9 -> truncated at 2.5: 2, .5, 2.5; row 1 has no sampler log-probs: weight 1
    w = alg.truncated_is_weights(old, sampler, torch.tensor([True, False]), cap=2.5)
    approx(w[0], [2.0, 0.5, 2.5])
    approx(w[1], [1.0, 1.0, 1.0])


def test_policy_loss_weights_each_tokens_surrogate() -> None:
    # ratio 1 everywhere (logp = old): surrogate -A per token; weights 2 and .5 on a one-completion batch
    logp = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    plain, _ = alg.policy_loss(logp, logp.detach(), adv, mask)
    weighted, _ = alg.policy_loss(logp, logp.detach(), adv, mask, is_weights=torch.tensor([[2.0, 0.5]]))
    assert float(plain.detach()) == pytest.approx(-1.0)
    assert float(weighted.detach()) == pytest.approx(-(2.0 + 0.5) / 2)
    weighted.backward()
    approx(logp.grad[0], [-1.0, -0.25])  # d/dlogp of -w x A x ratio / 2, weights held constant
