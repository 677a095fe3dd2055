"""A whole tiny-Llama training step with sequence parallelism degree 2 gives the loss and gradients of
degree 1 on the same batch (fp64, gloo, DDP as the runtime wraps it)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOL = 1e-10


def _entry(rank: int, world: int, rdzv: str, impl: str, degree: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        _check(rank, world, impl, degree)
    finally:
        dist.destroy_process_group()


def _model(attn: str) -> Any:
    from kubeforge.runtime.tinymodel import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(), seed=3).double()
    model.set_attn_implementation(attn)
    return model


def _check(rank: int, world: int, impl: str, degree: int) -> None:
    import torch.nn.functional as F

    from kubeforge.runtime import dist as kdist
    from kubeforge.runtime.extend import attention as sp
    from kubeforge.runtime.extend import sequence

    sp.register()
    seq_len, batch = 64, torch.randint(0, 259, (2, 65), generator=torch.Generator().manual_seed(1))

    # degree 1: the plain model, transformers' own attention, whole sequences
    ref = _model("sdpa")  # eager softmaxes in float32; sdpa stays in fp64
    logits = ref(input_ids=batch[:, :-1], use_cache=False).logits
    ref_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    ref_loss.backward()

    # the runtime's path, DDP-wrapped, each rank on its shard; with world > degree every data-parallel
    # replica takes its own sequences of the batch
    mesh = sequence.build_mesh(impl, degree)
    assert (mesh.dp_size, mesh.dp_rank, mesh.sp_rank) == (world // degree, rank // degree, rank % degree)
    model = kdist.wrap(_model(sp.attn_implementation(impl)), kdist.Choice("cpu", "gloo", "ddp", "fp32"),
                       torch.device("cpu"), kdist.DistEnv(rank, world, rank, world, 0))
    mine = batch.chunk(mesh.dp_size)[mesh.dp_rank]
    ce = sequence.forward_backward(model, mine, mesh, tokens_per_step=batch.size(0) * seq_len)
    dist.all_reduce(ce)
    loss = ce.item() / (batch.size(0) * seq_len)
    assert abs(loss - ref_loss.item()) <= TOL, f"{impl} loss {loss} vs {ref_loss.item()}"
    for (name, p), q in zip(kdist.unwrap(model).named_parameters(), ref.parameters(), strict=True):
        err = (p.grad - q.grad).abs().max().item()
        assert err <= TOL, f"{impl} rank {rank}: grad of {name} differs by {err:.3g}"


@pytest.mark.parametrize("impl", ["ring", "zigzag", "ulysses"])
def test_degree_two_step_equals_degree_one(impl: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(2, os.path.join(tmp, "rdzv"), impl, 2), nprocs=2, join=True)


def test_data_parallel_times_sequence_parallel_step_equals_degree_one() -> None:
    # 4 processes: 2 data-parallel replicas x zigzag degree 2, one sequence each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(4, os.path.join(tmp, "rdzv"), "zigzag", 2), nprocs=4, join=True)
