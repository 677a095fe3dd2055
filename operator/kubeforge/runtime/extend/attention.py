"""Sequence-parallel causal attention over torch.distributed: ring, zigzag ring and Ulysses.

Each rank of a sequence-parallel group holds a shard of every sequence (its queries, keys and values,
already rotated with the *global* position ids). The functions here return that shard's attention output,
equal to what full causal attention over the whole sequence gives for those rows.

- ring: contiguous shards; key/value blocks travel round the ring and partial results are merged with
  their log-sum-exp. Causality makes it unbalanced (rank d-1 does d blocks, rank 0 one).
- zigzag: the sequence is cut into 2d chunks and rank r holds chunks r and 2d-1-r, so every rank does the
  same work: half a block at each step but its own (EasyContext / ring-flash-attn's zigzag ring).
- ulysses: all-to-all turns sequence shards into head shards, full attention runs locally, and a second
  all-to-all turns them back (DeepSpeed-Ulysses); needs heads % degree == 0.

Forward and backward are written out (the backward sends dk/dv round the ring with their blocks), in plain
torch so the same code runs on CPU with gloo and on GPU with NCCL. `register()` makes them transformers
attention implementations ("kubeforge_ring", ...), selected with `model.set_attn_implementation`, and
`sequence_parallel(group, impl)` says which process group the model's attention runs over.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

IMPLS = ("ring", "zigzag", "ulysses")
ATTN_PREFIX = "kubeforge_"


# ------------------------------------------------------------------------------------------ layouts


def shard_indices(seq_len: int, degree: int, rank: int, impl: str) -> torch.Tensor:
    """Global token positions held by `rank`: contiguous for ring/ulysses, chunks r and 2d-1-r for zigzag."""
    if impl == "zigzag":
        if seq_len % (2 * degree):
            raise ValueError(f"zigzag needs the sequence length ({seq_len}) divisible by 2 x degree ({2 * degree})")
        c = seq_len // (2 * degree)
        return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                          torch.arange((2 * degree - 1 - rank) * c, (2 * degree - rank) * c)])
    if seq_len % degree:
        raise ValueError(f"{impl} needs the sequence length ({seq_len}) divisible by the degree ({degree})")
    n = seq_len // degree
    return torch.arange(rank * n, (rank + 1) * n)


def shard(x: torch.Tensor, degree: int, rank: int, impl: str, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor along `dim`."""
    return x.index_select(dim, shard_indices(x.size(dim), degree, rank, impl).to(x.device))


def unshard(parts: list[torch.Tensor], impl: str, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's part (inverse of shard)."""
    degree = len(parts)
    seq_len = sum(p.size(dim) for p in parts)
    full = torch.empty_like(torch.cat(parts, dim))
    for r, p in enumerate(parts):
        full.index_copy_(dim, shard_indices(seq_len, degree, r, impl).to(p.device), p)
    return full


# ----------------------------------------------------------------------------- block attention math


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q [B, Hkv, G, Sq, D] x k [B, Hkv, Sk, D] -> [B, Hkv, G, Sq, Sk], causal aligned at the start."""
    s = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return s


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one key/value block: (out [B,Hkv,G,Sq,D], lse [B,Hkv,G,Sq]) in float32/64."""
    s = _scores(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.einsum("bhgqk,bhkd->bhgqd", p, v), lse


def block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                   delta: torch.Tensor, scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* lse and delta = rowsum(dout * out)."""
    s = _scores(q, k, scale, causal)
    p = torch.exp(s - lse.unsqueeze(-1))
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, dout)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", dout, v)
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, k) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, q) * scale
    return dq, dk, dv


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a block's partial result into (out, lse) in place: softmax over the union of both key sets."""
    new = torch.logaddexp(lse, block_lse)
    # rows that saw no key yet have lse = -inf; exp(-inf - finite) = 0 keeps them clean
    a = torch.exp(lse - new).nan_to_num(0.0)
    b = torch.exp(block_lse - new).nan_to_num(0.0)
    out.mul_(a.unsqueeze(-1)).add_(block_out * b.unsqueeze(-1))
    lse.copy_(new)


# -------------------------------------------------------------------------------------- ring plans


@dataclass(frozen=True)
class Piece:
    """One unit of work: rows `q` of the local queries over rows `kv` of a key/value block."""

    q: slice
    kv: slice
    causal: bool


def ring_plan(impl: str, rank: int, src: int, local_len: int) -> list[Piece]:
    """What rank `rank` computes with the key/value block that started on rank `src`."""
    everything = slice(0, local_len)
    if src == rank:
        return [Piece(everything, everything, True)]
    if impl == "ring":
        return [Piece(everything, everything, False)] if src < rank else []
    half = local_len // 2
    if src < rank:  # both my chunks come after src's first chunk and before its second
        return [Piece(everything, slice(0, half), False)]
    return [Piece(slice(half, local_len), everything, False)]  # my second chunk sees both of src's


class _Exchange:
    """Send tensors to the next rank of the ring and receive the previous rank's, in the background, so
    the transfer overlaps the computation on the blocks at hand; `wait()` returns what arrived."""

    def __init__(self, tensors: list[torch.Tensor], group: Any, rank: int, degree: int) -> None:
        nxt = dist.get_global_rank(group, (rank + 1) % degree)
        prv = dist.get_global_rank(group, (rank - 1) % degree)
        self.sent = [t.contiguous() for t in tensors]
        self.received = [torch.empty_like(t) for t in self.sent]
        ops = [dist.P2POp(dist.isend, t, nxt, group) for t in self.sent]
        ops += [dist.P2POp(dist.irecv, r, prv, group) for r in self.received]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for req in self.requests:
            req.wait()
        return self.received


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, s, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, s, d)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, impl: str,
                group: Any) -> torch.Tensor:
        degree, rank = dist.get_world_size(group), dist.get_rank(group)
        b, h, s, d = q.shape
        kvh = k.size(1)
        work = torch.promote_types(q.dtype, torch.float32)
        qg = _grouped(q, kvh).to(work)
        out = torch.zeros_like(qg)
        lse = torch.full(qg.shape[:-1], float("-inf"), dtype=work, device=q.device)
        kk, vv = k, v
        for step in range(degree):
            nxt = _Exchange([kk, vv], group, rank, degree) if step < degree - 1 else None
            src = (rank - step) % degree
            for p in ring_plan(impl, rank, src, s):
                bo, bl = block_forward(qg[..., p.q, :], kk[..., p.kv, :].to(work), vv[..., p.kv, :].to(work),
                                       scale, p.causal)
                merge(out[..., p.q, :], lse[..., p.q], bo, bl)
            if nxt is not None:
                kk, vv = nxt.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.impl, ctx.group = scale, impl, group
        return out.reshape(b, h, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, impl, scale = ctx.group, ctx.impl, ctx.scale
        degree, rank = dist.get_world_size(group), dist.get_rank(group)
        s, kvh = q.size(2), k.size(1)
        work = out.dtype
        qg = _grouped(q, kvh).to(work)
        do = _grouped(dout, kvh).to(work)
        delta = (do * out).sum(-1)
        dq = torch.zeros_like(qg)
        kk, vv = k.to(work), v.to(work)
        dk, dv = torch.zeros_like(kk), torch.zeros_like(vv)
        for step in range(degree):
            src = (rank - step) % degree
            # the next block can travel while this one is worked on; its gradient has to wait for the work
            ahead = _Exchange([kk, vv], group, rank, degree) if step < degree - 1 else None
            for p in ring_plan(impl, rank, src, s):
                gq, gk, gv = block_backward(qg[..., p.q, :], kk[..., p.kv, :], vv[..., p.kv, :], do[..., p.q, :],
                                            lse[..., p.q], delta[..., p.q], scale, p.causal)
                dq[..., p.q, :] += gq
                dk[..., p.kv, :] += gk
                dv[..., p.kv, :] += gv
            # the block's gradient travels one hop behind it; after `degree` hops it is back with its owner
            dk, dv = _Exchange([dk, dv], group, rank, degree).wait()
            if ahead is not None:
                kk, vv = ahead.wait()
        return (dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, impl: str = "ring",
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's shard, q [B,H,S/d,D], k/v [B,Hkv,S/d,D] -> [B,H,S/d,D]."""
    if impl not in ("ring", "zigzag"):
        raise ValueError(f"unknown ring layout {impl!r}")
    if q.size(1) % k.size(1):
        raise ValueError(f"{q.size(1)} query heads are not a multiple of {k.size(1)} key/value heads")
    if impl == "zigzag" and q.size(2) % 2:
        raise ValueError("a zigzag shard holds two equal chunks, so its length must be even")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if dist.get_world_size(group) == 1:
        return full_attention(q, k, v, scale)
    return _RingAttention.apply(q, k, v, scale, impl, group)


# ----------------------------------------------------------------------------------------- ulysses


class _AllToAll(torch.autograd.Function):
    """[B, H, S/d, D] sequence shards <-> [B, H/d, S, D] head shards (scatter one dim, gather the other)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    degree = dist.get_world_size(group)
    inputs = [c.contiguous() for c in x.chunk(degree, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(degree)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any,
                      scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's contiguous shard by all-to-all over heads."""
    degree = dist.get_world_size(group)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if degree == 1:
        return full_attention(q, k, v, scale)
    heads, kv_heads = q.size(1), k.size(1)
    if heads % degree:
        raise ValueError(f"ulysses needs the attention heads ({heads}) divisible by the degree ({degree})")
    if kv_heads % degree:
        if degree % kv_heads:
            raise ValueError(f"ulysses needs the key/value heads ({kv_heads}) and the degree ({degree}) to "
                             "divide one another")
        # too few kv heads to split: repeat them so each rank gets the ones its query heads use
        k = k.repeat_interleave(degree // kv_heads, dim=1)
        v = v.repeat_interleave(degree // kv_heads, dim=1)
    qh, kh, vh = (_AllToAll.apply(t, group, 1, 2) for t in (q, k, v))
    out = full_attention(qh, kh, vh, scale)
    return _AllToAll.apply(out, group, 2, 1)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain causal attention (the reference, and degree 1), GQA-aware, autograd through torch."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    b, h, s, d = q.shape
    out, _ = block_forward(_grouped(q, k.size(1)), k, v, scale, True)
    return out.reshape(b, h, s, d)


# ----------------------------------------------------------------------- transformers integration

_ACTIVE: dict[str, Any] = {"group": None}


@contextlib.contextmanager
def sequence_parallel(group: Any) -> Iterator[None]:
    """Run the model's kubeforge_* attention over `group` inside this block."""
    previous = _ACTIVE["group"]
    _ACTIVE["group"] = group
    try:
        yield
    finally:
        _ACTIVE["group"] = previous


def set_group(group: Any) -> None:
    """The process group kubeforge_* attention runs over from now on (None: the default group)."""
    _ACTIVE["group"] = group


def _hf_attention(impl: str) -> Any:
    def forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any = None, scaling: float | None = None, dropout: float = 0.0,
                **_: Any) -> tuple[torch.Tensor, None]:
        if dropout:
            raise ValueError("sequence-parallel attention does not implement attention dropout")
        group = _ACTIVE["group"] or dist.group.WORLD
        if impl == "ulysses":
            out = ulysses_attention(query, key, value, group, scaling)
        else:
            out = ring_attention(query, key, value, group, impl, scaling)
        return out.transpose(1, 2).contiguous(), None  # [B, S, H, D], as transformers' sdpa returns

    forward.__name__ = f"{ATTN_PREFIX}{impl}_attention_forward"
    return forward


def attn_implementation(impl: str) -> str:
    return f"{ATTN_PREFIX}{impl}"


def register() -> None:
    """Make kubeforge_ring, kubeforge_zigzag and kubeforge_ulysses transformers attention implementations.
    They are not mask interfaces, so transformers builds no [S, S] mask for them (causality is built in)."""
    from transformers import AttentionInterface

    for impl in IMPLS:
        AttentionInterface.register(attn_implementation(impl), _hf_attention(impl))
