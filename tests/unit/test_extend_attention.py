"""Sequence-parallel attention equals full causal attention, forward and backward, on CPU with gloo in fp64.

Real process groups: each case spawns `degree` processes joined over gloo (torch.multiprocessing), every
rank computes its shard, and the shards are gathered and compared with full attention on one process.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kubeforge.runtime.extend import attention as sp

TOL = 1e-10


def _spawn(fn: Any, degree: int, *args: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(degree, os.path.join(tmp, "rdzv"), fn, args), nprocs=degree, join=True)


def _entry(rank: int, degree: int, rdzv: str, fn: Any, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=degree)
    try:
        fn(rank, degree, *args)
    finally:
        dist.destroy_process_group()


def _inputs(heads: int, kv_heads: int, seq: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, heads, seq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, seq, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, seq, 16, generator=g, dtype=torch.float64)
    dout = torch.randn(2, heads, seq, 16, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _reference(heads: int, kv_heads: int, seq: int) -> tuple[torch.Tensor, ...]:
    q, k, v, dout = _inputs(heads, kv_heads, seq)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    # the textbook formula, GQA by repeating key/value heads: independent of the code under test
    kr, vr = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    s = q @ kr.transpose(-1, -2) / 4.0
    s = s.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ vr
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check_shards(rank: int, degree: int, impl: str, heads: int, kv_heads: int, seq: int) -> None:
    q, k, v, dout = _inputs(heads, kv_heads, seq)
    layout = "zigzag" if impl == "zigzag" else "ring"
    mine = [sp.shard(t, degree, rank, layout, dim=2).clone().requires_grad_() for t in (q, k, v)]
    group = dist.group.WORLD
    if impl == "ulysses":
        out = sp.ulysses_attention(*mine, group)
    else:
        out = sp.ring_attention(*mine, group, impl)
    out.backward(sp.shard(dout, degree, rank, layout, dim=2))
    got = [out.detach(), *(t.grad for t in mine)]
    want = _reference(heads, kv_heads, seq)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        parts = [torch.empty_like(g) for _ in range(degree)]
        dist.all_gather(parts, g.contiguous())
        full = sp.unshard(parts, layout, dim=2)
        err = (full - w).abs().max().item()
        assert err <= TOL, f"{impl} degree {degree} rank {rank}: {name} differs by {err:.3g}"


# (impl, heads, kv_heads, seq): GQA, MHA, multi-query, and (ulysses) fewer kv heads than the degree
CASES = [
    ("ring", 4, 2, 64), ("ring", 4, 4, 96),
    ("zigzag", 4, 2, 64), ("zigzag", 2, 1, 96),
    ("ulysses", 4, 2, 64), ("ulysses", 4, 4, 96),
]


def _check_all(rank: int, degree: int) -> None:
    for case in CASES:
        _check_shards(rank, degree, *case)


@pytest.mark.parametrize("degree", [2, 4])
def test_sequence_parallel_attention_equals_full_attention(degree: int) -> None:
    # one process group per degree for every case: spawning is the slow part
    _spawn(_check_all, degree)


@pytest.mark.parametrize("impl", ["ring", "zigzag"])
def test_shard_layouts_round_trip(impl: str) -> None:
    x = torch.arange(48).reshape(1, 48)
    parts = [sp.shard(x, 4, r, impl) for r in range(4)]
    assert torch.equal(sp.unshard(parts, impl), x)
    if impl == "zigzag":
        assert sp.shard_indices(16, 2, 0, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
        assert sp.shard_indices(16, 2, 1, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_zigzag_refuses_a_length_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="2 x degree"):
        sp.shard_indices(20, 4, 0, "zigzag")


def test_full_attention_matches_torch_sdpa() -> None:
    q, k, v, _ = _inputs(4, 2, 32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (sp.full_attention(q, k, v) - want).abs().max().item() <= TOL
