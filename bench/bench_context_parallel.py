"""Sequence-parallel attention: throughput of ring and zigzag vs full attention, and memory per rank vs
sequence length for degree 1/2/4 (real gloo process groups on CPU), plus, with --simulate on a GPU, the
compute-side efficiency of ring and zigzag against the ideal.

    .venv/bin/python bench/bench_context_parallel.py [--length 4096] [--lengths 1024,2048,4096]
    .venv/bin/python bench/bench_context_parallel.py --simulate --device cuda --length 32768

CPU part (kubeforge.runtime.extend.attention, fp32, causal, B=1, H=4 query / 2 key-value heads, D=64):
- tokens/s: forward + backward of one attention layer over the whole sequence, the slowest rank's time,
  median of --repeat runs: full attention on one process vs ring and zigzag over 2 processes (gloo p2p);
- peak memory per rank: the growth of the process's peak RSS during one forward + backward, fresh
  processes per (degree, length), the largest rank.
--simulate: no communication; one process times every rank's share of the block work (the plan each rank
would run) and reports efficiency = mean rank time / slowest rank time (100 % = the causal work split
evenly; the gang waits for its slowest rank) and the speed-up of the slowest rank over full attention on
one device (which computes the whole masked square). ring-flash-attn reports 90.2 % for zigzag on 8 GPUs
with flash kernels and NCCL; this figure has no communication in it, so it isolates the load balance.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from kubeforge.runtime.extend import attention as sp  # noqa: E402

H, KV, D = 4, 2, 64


def _inputs(length: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(1, h, length, D, generator=g, dtype=dtype).to(device) for h in (H, KV, KV)]


def _shard_step(impl: str, degree: int, rank: int, length: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    layout = "zigzag" if impl == "zigzag" else "ring"
    mine = [sp.shard(t, degree, rank, layout, dim=2).clone().requires_grad_() for t in _inputs(length)]
    return mine, torch.randn(1, H, length // degree, D)


def _run(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> None:
    group = dist.group.WORLD if dist.is_initialized() else None
    if impl == "full":
        out = sp.full_attention(q, k, v)
    elif impl == "ulysses":
        out = sp.ulysses_attention(q, k, v, group)
    else:
        out = sp.ring_attention(q, k, v, group, impl)
    out.backward(dout)


def _worker(rank: int, degree: int, rdzv: str, impl: str, length: int, repeat: int, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=degree)
    try:
        mine, dout = _shard_step(impl if degree > 1 else "ring", degree, rank, length)
        run_impl = impl if degree > 1 else "full"
        if mode == "memory":
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            _run(run_impl, *mine, dout)
            grew = torch.tensor([float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)])
            dist.all_reduce(grew, op=dist.ReduceOp.MAX)
            result = grew.item() / 1024  # KiB -> MiB
        else:
            _run(run_impl, *mine, dout)  # warm-up
            times = []
            for _ in range(repeat):
                for t in mine:
                    t.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                _run(run_impl, *mine, dout)
                took = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                times.append(took.item())
            result = statistics.median(times)
        if rank == 0:
            Path(out).write_text(repr(result))
    finally:
        dist.destroy_process_group()


def measure(impl: str, degree: int, length: int, repeat: int, mode: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_worker, args=(degree, os.path.join(tmp, "rdzv"), impl, length, repeat, mode, out),
                 nprocs=degree, join=True)
        return float(Path(out).read_text())


def simulate(length: int, device: str, repeat: int, degrees: list[int]) -> None:
    """Every rank's share of the causal block work, timed in one process (no communication)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = _inputs(length, device, dtype)

    def timed(fn) -> float:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    scale = 1.0 / D ** 0.5
    full = timed(lambda: sp.block_forward(sp._grouped(q, KV), k, v, scale, True))
    print(f"simulated forward on {device} ({dtype}), L={length}: full attention {full * 1e3:.1f} ms")
    print(f"{'impl':8} {'degree':>6} {'slowest rank ms':>16} {'mean rank ms':>13} {'efficiency':>11} "
          f"{'vs full':>8}")
    for impl in ("ring", "zigzag"):
        for degree in degrees:
            layout = "zigzag" if impl == "zigzag" else "ring"
            shards = [[sp.shard(t, degree, r, layout, dim=2) for t in (q, k, v)] for r in range(degree)]
            n = length // degree

            def rank_work(r: int, impl: str = impl, degree: int = degree, shards=shards, n: int = n) -> None:
                qr = sp._grouped(shards[r][0], KV)
                for step in range(degree):
                    src = (r - step) % degree
                    kk, vv = shards[src][1], shards[src][2]
                    for p in sp.ring_plan(impl, r, src, n):
                        sp.block_forward(qr[..., p.q, :], kk[..., p.kv, :], vv[..., p.kv, :], scale, p.causal)

            per_rank = [timed(lambda r=r: rank_work(r)) for r in range(degree)]
            slowest, mean = max(per_rank), statistics.mean(per_rank)
            print(f"{impl:8} {degree:6d} {slowest * 1e3:16.1f} {mean * 1e3:13.1f} {mean / slowest:10.1%} "
                  f"{full / slowest:7.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096, help="sequence length of the throughput run")
    ap.add_argument("--lengths", default="1024,2048,4096", help="sequence lengths of the memory table")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--degrees", default="2,4,8")
    args = ap.parse_args()
    if args.simulate:
        simulate(args.length, args.device, args.repeat, [int(d) for d in args.degrees.split(",")])
        return

    print(f"attention forward+backward, fp32 CPU, B=1 H={H} KV={KV} D={D}, L={args.length}")
    print(f"{'impl':8} {'procs':>5} {'seconds':>8} {'tokens/s':>10} {'vs full':>8}")
    base = measure("full", 1, args.length, args.repeat, "time")
    for impl, degree in (("full", 1), ("ring", 2), ("zigzag", 2), ("ulysses", 2)):
        t = base if impl == "full" else measure(impl, degree, args.length, args.repeat, "time")
        print(f"{impl:8} {degree:5d} {t:8.3f} {args.length / t:10.0f} {base / t:7.2f}x", flush=True)

    lengths = [int(x) for x in args.lengths.split(",")]
    print("\npeak memory growth per rank (MiB) during one forward+backward, zigzag")
    print(f"{'length':>8} " + " ".join(f"{'degree ' + str(d):>10}" for d in (1, 2, 4)))
    for length in lengths:
        row = [measure("zigzag", d, length, 1, "memory") for d in (1, 2, 4)]
        print(f"{length:8d} " + " ".join(f"{m:10.1f}" for m in row), flush=True)


if __name__ == "__main__":
    main()
