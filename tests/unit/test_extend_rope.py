"""The θ schedule and every scaling method's inverse frequencies, against transformers' own RoPE functions."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kubeforge.runtime.extend import rope
from kubeforge.runtime.tinymodel import tiny_llama_config

K, M = 1024, 1024 * 1024


@pytest.mark.parametrize(("seq_len", "expected"), [
    # issue 9's table for θ=500k trained at 8192 (Gradient's Llama-3 recipe used 15.3M/207M/1.06B/2.80B)
    (64 * K, 22.4e6), (256 * K, 283e6), (512 * K, 1.01e9), (1 * M, 3.58e9), (4 * M, 45.2e9),
])
def test_auto_theta_follows_critical_dimension_scaling(seq_len: int, expected: float) -> None:
    got = rope.auto_theta(500_000, 8192, seq_len)
    assert got == pytest.approx(expected, rel=5e-3)


def test_auto_theta_keeps_theta_at_or_below_the_base_length() -> None:
    assert rope.auto_theta(10_000, 128, 128) == 10_000
    assert rope.auto_theta(10_000, 128, 256) > 10_000


BASE = rope.BaseRope(theta=500_000.0, max_position_embeddings=8192, head_dim=64)


def _hf_config(params: dict, seq_len: int) -> LlamaConfig:
    d = rope.apply_to_config({"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 1,
                              "intermediate_size": 64, "vocab_size": 32}, params, seq_len)
    return LlamaConfig(**d)


@pytest.mark.parametrize("method", ["linear", "yarn", "llama3"])
def test_scaling_inv_freq_matches_transformers(method: str) -> None:
    params = rope.stage_rope(BASE, method, 64 * K)
    assert params["factor"] == 8.0
    want, _ = ROPE_INIT_FUNCTIONS[method](_hf_config(params, 64 * K))
    got = torch.tensor(rope.inv_freq(params, 64), dtype=torch.float64)
    torch.testing.assert_close(got, want.double().to(got.dtype), rtol=1e-6, atol=0)


def test_theta_inv_freq_matches_the_model_default() -> None:
    params = rope.stage_rope(BASE, "theta", 64 * K)
    cfg = _hf_config(params, 64 * K)
    want = LlamaForCausalLM(cfg).model.rotary_emb.inv_freq
    torch.testing.assert_close(torch.tensor(rope.inv_freq(params, 64), dtype=torch.float64), want.double(), rtol=1e-6, atol=0)


def test_ntk_theta_equals_transformers_dynamic_ntk_at_the_stage_length() -> None:
    # transformers' dynamic NTK with factor 1 at seq_len L' is the static NTK-aware θ for L'/L
    params = rope.stage_rope(BASE, "ntk", 64 * K)
    base_cfg = _hf_config({"rope_type": "dynamic", "rope_theta": BASE.theta, "factor": 1.0}, 8192)
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](base_cfg, seq_len=64 * K)
    torch.testing.assert_close(torch.tensor(rope.inv_freq(params, 64), dtype=torch.float64), want.double(), rtol=1e-5, atol=0)


def test_explicit_theta_wins_and_is_refused_for_other_methods() -> None:
    assert rope.stage_rope(BASE, "theta", 64 * K, 15_300_000)["rope_theta"] == 15_300_000
    with pytest.raises(ValueError, match="only for scaling method theta"):
        rope.stage_rope(BASE, "yarn", 64 * K, 15_300_000)


def test_rope_set_in_the_config_before_building_reaches_the_model_and_its_saved_config(tmp_path) -> None:
    cfg = tiny_llama_config()
    base = rope.BaseRope.from_config(cfg)
    params = rope.stage_rope(base, "yarn", 4 * base.max_position_embeddings)
    model = LlamaForCausalLM(LlamaConfig(**rope.apply_to_config(cfg, params, 4 * base.max_position_embeddings)))
    want = torch.tensor(rope.inv_freq(params, base.head_dim), dtype=torch.float64)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), want, rtol=1e-6, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.max_position_embeddings == 4 * base.max_position_embeddings
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    assert reloaded.config.rope_parameters["original_max_position_embeddings"] == base.max_position_embeddings
    torch.testing.assert_close(reloaded.model.rotary_emb.inv_freq.double(), want, rtol=1e-6, atol=0)


def test_longest_wavelength_grows_with_theta() -> None:
    short = rope.longest_wavelength({"rope_type": "default", "rope_theta": 10_000.0}, 64)
    assert short == pytest.approx(2 * math.pi * 10_000 ** (62 / 64))
    assert rope.longest_wavelength(rope.stage_rope(BASE, "theta", 1 * M), 64) > 1 * M
