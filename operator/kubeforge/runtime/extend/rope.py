"""RoPE for progressive context extension: the θ schedule, the per-stage RoPE parameters written into the
Hugging Face config *before* the model is built, and our own inverse frequencies for every method (checked
against transformers' ROPE_INIT_FUNCTIONS in the tests).

Methods (spec.scaling.method):
- theta: raise rope_theta per stage; `auto` uses critical-dimension scaling
  θ' = θ^(ln(L'/2π) / ln(L/2π)) from the base model's θ and context L (Gradient, EasyContext).
- ntk: NTK-aware θ' = θ·s^(d/(d-2)) with s = L'/L, fixed for the stage (transformers' `dynamic` type would
  change the frequencies with each shard's own largest position, so shards would disagree).
- linear, yarn, llama3: a rope_type with factor s = L'/L and original_max_position_embeddings = L.

`max_position_embeddings` becomes the stage's seqLen in every case; for yarn and llama3 the base context
stays in `original_max_position_embeddings`, which removes the usual ambiguity of YaRN's max position.
transformers 5 reads `rope_parameters`; the legacy `rope_theta`/`rope_scaling` keys are written as well so
4.x reads the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_THETA = 10000.0
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0


def auto_theta(theta: float, base_len: int, seq_len: int) -> float:
    """Critical-dimension θ for a context of seq_len, from a model with base θ trained at base_len."""
    if seq_len <= base_len:
        return float(theta)
    return float(theta) ** (math.log(seq_len / (2 * math.pi)) / math.log(base_len / (2 * math.pi)))


def ntk_theta(theta: float, head_dim: int, factor: float) -> float:
    """NTK-aware θ for a length ratio `factor`."""
    return float(theta) * max(1.0, factor) ** (head_dim / (head_dim - 2))


@dataclass(frozen=True)
class BaseRope:
    """What the source model was trained with."""

    theta: float
    max_position_embeddings: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any], original_max_position_embeddings: int | None = None) -> BaseRope:
        params = config.get("rope_parameters") or {}
        if isinstance(params, dict) and "rope_type" not in params and "full_attention" in params:
            params = params["full_attention"]  # per-layer-type configs
        theta = params.get("rope_theta") or config.get("rope_theta") or DEFAULT_THETA
        if params.get("rope_type", "default") not in ("default", None) or config.get("rope_scaling"):
            raise ValueError("the source model already uses a RoPE scaling type; extend it with method theta "
                             "from a model with plain RoPE")
        max_pos = original_max_position_embeddings or params.get("original_max_position_embeddings") \
            or config.get("max_position_embeddings")
        if not max_pos:
            raise ValueError("the source config has no max_position_embeddings; set "
                             "scaling.originalMaxPositionEmbeddings")
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        return cls(theta=float(theta), max_position_embeddings=int(max_pos), head_dim=head_dim)


def stage_rope(base: BaseRope, method: str, seq_len: int, rope_theta: int | str = "auto") -> dict[str, Any]:
    """The transformers 5 `rope_parameters` of a stage."""
    factor = seq_len / base.max_position_embeddings
    if method == "theta":
        theta = auto_theta(base.theta, base.max_position_embeddings, seq_len) if rope_theta == "auto" \
            else float(rope_theta)
        return {"rope_type": "default", "rope_theta": theta}
    if rope_theta != "auto":
        raise ValueError(f"ropeTheta is only for scaling method theta, not {method}")
    if method == "ntk":
        return {"rope_type": "default", "rope_theta": ntk_theta(base.theta, base.head_dim, factor)}
    params: dict[str, Any] = {"rope_type": method, "rope_theta": base.theta, "factor": max(1.0, factor)}
    if method in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = base.max_position_embeddings
    if method == "llama3":
        params["low_freq_factor"] = LLAMA3_LOW_FREQ_FACTOR
        params["high_freq_factor"] = LLAMA3_HIGH_FREQ_FACTOR
    if method not in ("linear", "yarn", "llama3"):
        raise ValueError(f"unknown scaling method {method!r}")
    return params


def apply_to_config(config: dict[str, Any], params: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """A copy of a Hugging Face config dict carrying the stage's RoPE and max_position_embeddings."""
    out = dict(config)
    out["rope_parameters"] = dict(params)
    out["max_position_embeddings"] = int(seq_len)
    out["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if params.get("rope_type", "default") == "default":
        out.pop("rope_scaling", None)
    else:
        out["rope_scaling"] = scaling
    return out


def inv_freq(params: dict[str, Any], head_dim: int) -> list[float]:
    """The inverse frequencies these parameters give, computed here independently of transformers."""
    base, kind = float(params["rope_theta"]), params.get("rope_type", "default")
    freqs = [1.0 / base ** (i / head_dim) for i in range(0, head_dim, 2)]
    if kind == "default":
        return freqs
    factor = float(params["factor"])
    if kind == "linear":
        return [f / factor for f in freqs]
    orig = float(params["original_max_position_embeddings"])
    if kind == "llama3":
        low_wl, high_wl = orig / params["low_freq_factor"], orig / params["high_freq_factor"]
        out = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < high_wl:
                out.append(f)
            elif wl > low_wl:
                out.append(f / factor)
            else:
                smooth = (orig / wl - params["low_freq_factor"]) / (params["high_freq_factor"] -
                                                                   params["low_freq_factor"])
                out.append((1 - smooth) * f / factor + smooth * f)
        return out
    if kind == "yarn":
        beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def dim_for(rotations: float) -> float:
            return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, f in enumerate(freqs):
            ramp = min(1.0, max(0.0, (i - low) / (high - low)))  # 0: keep (extrapolate), 1: interpolate
            out.append(f / factor * ramp + f * (1 - ramp))
        return out
    raise ValueError(f"unknown rope_type {kind!r}")


def longest_wavelength(params: dict[str, Any], head_dim: int) -> float:
    """Tokens per turn of the slowest rotating pair: positions further apart than this alias."""
    return 2 * math.pi / min(inv_freq(params, head_dim))
