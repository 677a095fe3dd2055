"""Data parallel x sequence parallel: the process mesh and one forward/backward on a sequence shard.

Ranks [k·d, (k+1)·d) form sequence-parallel group k (d = degree; neighbours share a node where they can);
ranks with the same position in their group form a data-parallel group. Every rank of a sequence group
reads the same sequences (data sharded by the data-parallel rank) and keeps its own part of each: its
input ids, targets and *global* position ids, so RoPE rotates each token by its true position.

The gradient is the mean over every token of the optimizer step: each rank back-propagates its shard's
summed cross-entropy scaled by world / tokens-per-step, and DDP's (or FSDP's) average over the whole world
turns that into Σ CE / tokens. The logged loss is the all-reduced sum over tokens, not a per-shard mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import attention as sp


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the data-parallel x sequence-parallel grid."""

    world_size: int
    degree: int
    impl: str
    sp_rank: int
    dp_rank: int
    sp_group: Any  # the sequence-parallel process group (None when degree is 1)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.degree


def build_mesh(impl: str, degree: int) -> Mesh:
    """Collective: create the sequence-parallel groups (every rank creates every group, as torch requires)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % degree:
        raise ValueError(f"sequenceParallel.degree {degree} does not divide the world size {world}")
    mine = None
    for k in range(world // degree):
        ranks = list(range(k * degree, (k + 1) * degree))
        group = dist.new_group(ranks) if degree > 1 else None
        if rank in ranks:
            mine = group
    return Mesh(world_size=world, degree=degree, impl=impl, sp_rank=rank % degree, dp_rank=rank // degree,
                sp_group=mine)


def local_inputs(batch: torch.Tensor, mesh: Mesh) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, targets) of this rank's shard of packed sequences [B, seqLen+1]."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    seq_len = inputs.size(1)
    layout = "zigzag" if mesh.impl == "zigzag" else "ring"
    idx = sp.shard_indices(seq_len, mesh.degree, mesh.sp_rank, layout).to(batch.device)
    positions = idx.unsqueeze(0).expand(inputs.size(0), -1)
    return inputs.index_select(1, idx), positions, targets.index_select(1, idx)


def shard_logits(model: Any, batch: torch.Tensor, mesh: Mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of this rank's shard, with attention over the whole sequence group."""
    inputs, positions, targets = local_inputs(batch, mesh)
    with sp.sequence_parallel(mesh.sp_group):
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
    return logits, targets


def forward_backward(model: Any, batch: torch.Tensor, mesh: Mesh, tokens_per_step: int) -> torch.Tensor:
    """Back-propagate this shard's part of the step's mean loss; returns the shard's summed CE (detached)."""
    logits, targets = shard_logits(model, batch, mesh)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum") \
        if logits.dtype != torch.float64 else \
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    (ce * (mesh.world_size / tokens_per_step)).backward()
    return ce.detach()
