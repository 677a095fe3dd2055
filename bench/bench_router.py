"""Router overhead benchmark: the same requests sent straight to a backend and through the router.

Starts, on loopback, a backend (the reference engine with a tiny model, aggregated, or the trivial echo
backend that answers at once) and a router in front of it, then sends N requests (bounded by --max-seconds)
to each in the same run and prints latency p50/p99, requests/s, and the router-added latency.

    python bench/bench_router.py                      # both backends, 200 requests each, concurrency 8
    python bench/bench_router.py --backend echo --requests 2000 --concurrency 32
    python bench/bench_router.py --backend pd         # reference engines, prefill + decode behind the router
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

import httpx

from kubeforge.runtime.serve.testing import Proc, engine_proc, free_port


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


async def load(
    url: str, body: dict, n: int, concurrency: int, max_seconds: float
) -> tuple[list[float], float]:
    lat: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + max_seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency * 2)) as c:

        async def one():
            nonlocal errors
            async with sem:
                if time.monotonic() > deadline:
                    return
                t = time.perf_counter()
                r = await c.post(url + "/v1/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    return
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
    if errors:
        print(f"  ({errors} errors against {url})")
    return lat, wall


def row(label: str, lat: list[float], wall: float) -> str:
    return (
        f"{label:<22} n={len(lat):<5} p50={pct(lat, 0.5) * 1e3:8.2f} ms  p99={pct(lat, 0.99) * 1e3:8.2f} ms  "
        f"mean={statistics.fmean(lat) * 1e3 if lat else float('nan'):8.2f} ms  {len(lat) / wall:8.1f} req/s"
    )


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds a process has used so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def run_case(name: str, direct: str, routed: str, args, router_pid: int | None = None) -> None:
    body = {
        "prompt": "Benchmarking the kubeforge router on loopback.",
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    # Warm up both paths (connections, first forward pass).
    asyncio.run(load(direct, body, 4, 2, 30))
    asyncio.run(load(routed, body, 4, 2, 30))
    results = {}
    router_cpu = 0.0
    # Alternate halves so drift (thermal, caches) hits both sides alike.
    for _ in range(2):
        for label, url in (("direct", direct), ("router", routed)):
            cpu0 = cpu_seconds(router_pid) if router_pid and label == "router" else 0.0
            lat, wall = asyncio.run(
                load(url, body, args.requests // 2, args.concurrency, args.max_seconds / 4)
            )
            if router_pid and label == "router":
                router_cpu += cpu_seconds(router_pid) - cpu0
            prev = results.get(label, ([], 0.0))
            results[label] = (prev[0] + lat, prev[1] + wall)
    print(f"\n== {name}: max_tokens={args.max_tokens} concurrency={args.concurrency}")
    for label in ("direct", "router"):
        print(row(label, *results[label]))
    d, r = results["direct"][0], results["router"][0]
    if router_pid and r:
        print(f"{'router CPU':<22} {router_cpu / len(r) * 1e3:.2f} ms per request (user+sys, all legs)")
    if d and r:
        print(
            f"{'router-added':<22} p50={(pct(r, 0.5) - pct(d, 0.5)) * 1e3:+8.2f} ms  "
            f"p99={(pct(r, 0.99) - pct(d, 0.99)) * 1e3:+8.2f} ms"
        )


def router_proc(args_extra: list[str]) -> Proc:
    port = free_port()
    return Proc(
        "kubeforge.runtime.serve.router",
        ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args_extra],
        port,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["engine", "echo", "pd", "all"], default="all")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=120.0, help="time cap per case")
    p.add_argument("--model", help="HF model dir (default: a tiny random Llama)")
    args = p.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    procs: list[Proc] = []
    try:
        if args.backend in ("echo", "all"):
            port = free_port()
            echo = Proc("kubeforge.runtime.serve.echo", ["--port", str(port)], port).wait()
            rt = router_proc(["--decode", echo.url]).wait()
            procs += [echo, rt]
            run_case("echo backend (router overhead alone)", echo.url, rt.url, args, rt.proc.pid)
        if args.backend in ("engine", "pd", "all"):
            model = args.model
            if not model:
                from kubeforge.runtime.tinymodel import save_tiny_model

                model = str(save_tiny_model(Path(tempfile.mkdtemp()) / "model"))
            eng = engine_proc(model, role="both", extra=["--max-num-seqs", "16"]).wait()
            procs.append(eng)
            if args.backend in ("engine", "all"):
                rt = router_proc(["--decode", eng.url]).wait()
                procs.append(rt)
                run_case("reference engine, aggregated", eng.url, rt.url, args, rt.proc.pid)
            if args.backend in ("pd", "all"):
                pe = engine_proc(model, role="prefill").wait()
                de = engine_proc(model, role="decode", extra=["--max-num-seqs", "16"]).wait()
                rt = router_proc(["--prefill", pe.url, "--decode", de.url]).wait()
                procs += [pe, de, rt]
                run_case(
                    "reference engines, P/D via router vs aggregated direct",
                    eng.url,
                    rt.url,
                    args,
                    rt.proc.pid,
                )
    finally:
        for pr in procs:
            pr.stop()


if __name__ == "__main__":
    main()
