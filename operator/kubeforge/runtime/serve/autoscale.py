"""Autoscaling policy for the prefill and decode pools of an InferenceDeployment: pure functions.

Each pool scales on its own signal, read from the router's `/metrics`:
  prefill: queue depth per replica (requests waiting in the prefill engines) or recent TTFT;
  decode:  in-flight requests per replica (requests the router has outstanding on the pool) or recent ITL.
The math is the HorizontalPodAutoscaler's: desired = ceil(current * metric / target), no change while the
ratio is within a tolerance of 1, bounded by [min, max]; scaling up acts at once, scaling down only after a
stabilization window since the last scale and never below the highest recommendation seen in that window.
Scaling down never drops in-flight requests: engines drain on SIGTERM (see engine.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import metrics as m

POOLS = ("prefill", "decode")
LOAD_METRICS = ("queue-depth", "in-flight")  # per-replica averages
LATENCY_METRICS = ("ttft", "itl")  # seconds, pool-wide
DEFAULT_METRIC = {"prefill": "queue-depth", "decode": "in-flight"}


@dataclass(frozen=True)
class PoolSignal:
    """What the router knows about one pool, from one scrape of its `/metrics`."""

    pool: str
    replicas: int = 0  # ready endpoints the router routes to
    in_flight: float = 0.0  # requests outstanding from the router on the pool
    queue_depth: float = 0.0  # requests waiting inside the pool's engines
    running: float = 0.0  # requests running inside the pool's engines
    ttft_recent: float | None = None  # mean seconds over the router's recent window, None = no data
    itl_recent: float | None = None
    prefill_recent: float | None = None  # mean prefill-leg seconds (covers non-streamed requests too)
    requests_total: float = 0.0
    errors_total: float = 0.0


def parse_router_metrics(text: str) -> dict[str, PoolSignal]:
    """Per-pool signals from the router's Prometheus text. Pools the router does not report are absent."""
    samples = m.parse_text(text)
    pools: set[str] = {
        s.labels["pool"] for s in samples if s.name.startswith("kubeforge:router_") and "pool" in s.labels
    }
    out: dict[str, PoolSignal] = {}
    for pool in sorted(pools):

        def one(name: str, pool: str = pool) -> float | None:
            found = m.find_samples(samples, name, pool=pool)
            return sum(s.value for s in found) if found else None

        def recent(name: str, one=one) -> float | None:
            v = one(name)
            return None if v is None or math.isnan(v) else v

        out[pool] = PoolSignal(
            pool=pool,
            replicas=int(one(m.R_ENDPOINTS) or 0),
            in_flight=one(m.R_IN_FLIGHT) or 0.0,
            queue_depth=one(m.R_QUEUE_DEPTH) or 0.0,
            running=one(m.R_ENGINE_RUNNING) or 0.0,
            ttft_recent=recent(m.R_TTFT_RECENT),
            itl_recent=recent(m.R_ITL_RECENT),
            prefill_recent=recent(m.R_PREFILL_RECENT),
            requests_total=one(m.R_REQUESTS) or 0.0,
            errors_total=one(m.R_ERRORS) or 0.0,
        )
    return out


def merge_signals(per_router: Iterable[Mapping[str, PoolSignal]]) -> dict[str, PoolSignal]:
    """One view from several router replicas: their own counts add up (in flight, requests, errors); what
    each of them scrapes or sees of the same pods does not (endpoints, engine queue depth: the max);
    recent latencies are averaged over the routers that have data."""
    merged: dict[str, list[PoolSignal]] = {}
    for sigs in per_router:
        for pool, s in sigs.items():
            merged.setdefault(pool, []).append(s)

    def mean(vals: list[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return sum(got) / len(got) if got else None

    return {
        pool: PoolSignal(
            pool=pool,
            replicas=max(s.replicas for s in ss),
            in_flight=sum(s.in_flight for s in ss),
            queue_depth=max(s.queue_depth for s in ss),
            running=max(s.running for s in ss),
            ttft_recent=mean([s.ttft_recent for s in ss]),
            itl_recent=mean([s.itl_recent for s in ss]),
            prefill_recent=mean([s.prefill_recent for s in ss]),
            requests_total=sum(s.requests_total for s in ss),
            errors_total=sum(s.errors_total for s in ss),
        )
        for pool, ss in merged.items()
    }


def read_router_signals(urls: Iterable[str], timeout: float = 2.0) -> dict[str, PoolSignal]:
    """GET `<url>/metrics` of every router replica and merge them (unreachable ones are skipped).

    The one impure helper here: the operator calls it with its router pods' base URLs."""
    import httpx

    got = []
    for url in urls:
        try:
            r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
            if r.status_code == 200:
                got.append(parse_router_metrics(r.text))
        except (httpx.HTTPError, ValueError):  # unreachable or unparsable: one replica must not blind the rest
            continue
    return merge_signals(got)


def pool_metric_value(signal: PoolSignal, metric: str, current: int | None = None) -> float | None:
    """The value compared with the target: a per-replica average for load metrics, seconds for latency.

    `current` is the replica count to average over (the Deployment's); it defaults to the endpoints the
    router sees. None means "no data" (a latency metric with no recent traffic).
    """
    n = max(current if current is not None else signal.replicas, 1)
    if metric == "queue-depth":
        return signal.queue_depth / n
    if metric == "in-flight":
        return signal.in_flight / n
    if metric == "ttft":  # streamed TTFT; without streams, the prefill leg's duration stands in
        return signal.ttft_recent if signal.ttft_recent is not None else signal.prefill_recent
    if metric == "itl":
        return signal.itl_recent
    raise ValueError(f"unknown metric {metric!r}; one of {LOAD_METRICS + LATENCY_METRICS}")


def desired_replicas(
    value: float | None,
    current: int,
    min_replicas: int,
    max_replicas: int,
    target: float,
    last_scale_time: float | None,
    now: float,
    *,
    tolerance: float = 0.1,
    scale_down_stabilization_s: float = 300.0,
    recommendations: Iterable[tuple[float, int]] = (),
    max_scale_up_factor: float | None = None,
) -> int:
    """Replicas one pool should have, HPA-style.

    value: the pool's metric (see pool_metric_value); None = no data, hold (within bounds).
    current: replicas now; target: the metric value wanted per replica (or seconds, for latency).
    last_scale_time: when this pool last changed size (None = never); scale-down waits until
    `scale_down_stabilization_s` have passed since then.
    recommendations: (time, replicas) this function recommended earlier; a scale-down never goes below
    the highest one inside the stabilization window (the HPA's behaviour), so a dip does not flap.
    max_scale_up_factor: cap a single scale-up at ceil(current * factor) (None = no cap).
    """
    if target <= 0:
        raise ValueError("target must be > 0")
    if min_replicas < 0 or max_replicas < min_replicas:
        raise ValueError("need 0 <= min_replicas <= max_replicas")

    def clamp(n: int) -> int:
        return max(min_replicas, min(max_replicas, n))

    if value is None or math.isnan(value):
        return clamp(current)
    if current <= 0:
        # From zero: any load brings up enough replicas for it; `value` is then the pool's total.
        return clamp(math.ceil(value / target) if value > 0 else 0)

    ratio = value / target
    if abs(ratio - 1.0) <= tolerance:
        raw = current
    else:
        raw = math.ceil(current * ratio - 1e-9)
    if max_scale_up_factor is not None and raw > current:
        raw = min(raw, math.ceil(current * max_scale_up_factor))
    desired = clamp(raw)

    if desired < current:
        if last_scale_time is not None and now - last_scale_time < scale_down_stabilization_s:
            return clamp(current)
        window = [r for t, r in recommendations if now - t < scale_down_stabilization_s]
        if window:
            desired = clamp(min(current, max(desired, max(window))))
    return desired


@dataclass(frozen=True)
class PoolPolicy:
    """Autoscaling settings of one pool (from the InferenceDeployment spec)."""

    min_replicas: int = 1
    max_replicas: int = 1
    metric: str = ""  # "" = the pool's default (prefill: queue-depth, decode: in-flight)
    target: float = 4.0
    tolerance: float = 0.1
    scale_down_stabilization_s: float = 300.0


@dataclass
class PoolState:
    current: int
    last_scale_time: float | None = None
    recommendations: list[tuple[float, int]] = field(default_factory=list)


def plan(
    signals: Mapping[str, PoolSignal],
    policies: Mapping[str, PoolPolicy],
    states: Mapping[str, PoolState],
    now: float,
) -> dict[str, int]:
    """Desired replicas per pool, each from its own signal only (a decode surge leaves prefill alone)."""
    out: dict[str, int] = {}
    for pool, policy in policies.items():
        state = states[pool]
        metric = policy.metric or DEFAULT_METRIC.get(pool, "in-flight")
        sig = signals.get(pool)
        value = None if sig is None else pool_metric_value(sig, metric, state.current)
        if sig is not None and state.current <= 0 and metric in LOAD_METRICS:
            value = sig.queue_depth if metric == "queue-depth" else sig.in_flight
        out[pool] = desired_replicas(
            value,
            state.current,
            policy.min_replicas,
            policy.max_replicas,
            policy.target,
            state.last_scale_time,
            now,
            tolerance=policy.tolerance,
            scale_down_stabilization_s=policy.scale_down_stabilization_s,
            recommendations=state.recommendations,
        )
    return out
