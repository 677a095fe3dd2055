"""Per-pool autoscaling policy of InferenceDeployment: pure table tests."""

from __future__ import annotations

import math

import pytest

from kubeforge.runtime.serve import metrics as m
from kubeforge.runtime.serve.autoscale import (
    PoolPolicy,
    PoolSignal,
    PoolState,
    desired_replicas,
    merge_signals,
    parse_router_metrics,
    plan,
    pool_metric_value,
)

NOW = 10_000.0


@pytest.mark.parametrize(
    "value,current,lo,hi,target,last,expect",
    [
        (4.0, 2, 1, 10, 4.0, None, 2),  # on target
        (4.3, 2, 1, 10, 4.0, None, 2),  # within 10% tolerance
        (8.0, 2, 1, 10, 4.0, None, 4),  # double load -> double replicas
        (5.0, 3, 1, 10, 4.0, None, 4),  # ceil(3 * 1.25) = ceil(3.75)
        (40.0, 2, 1, 6, 4.0, None, 6),  # capped at max
        (0.0, 4, 1, 10, 4.0, None, 1),  # idle, never scaled: down to min
        (0.0, 4, 2, 10, 4.0, None, 2),  # ... but not below min
        (1.0, 4, 1, 10, 4.0, NOW - 30, 4),  # scaled 30 s ago: scale-down waits (stabilization)
        (1.0, 4, 1, 10, 4.0, NOW - 301, 1),  # window passed: ceil(4 * 0.25) = 1
        (9.0, 4, 1, 10, 4.0, NOW - 1, 9),  # scale-up is never delayed
        (None, 3, 1, 10, 4.0, None, 3),  # no data: hold
        (None, 0, 1, 10, 4.0, None, 1),  # no data, below min: min
        (6.0, 0, 0, 10, 4.0, None, 2),  # from zero: value is the pool total, ceil(6 / 4)
        (0.0, 0, 0, 10, 4.0, None, 0),  # stays at zero with no load
        (8.0, 12, 1, 10, 4.0, None, 10),  # above max (spec lowered): clamp
    ],
)
def test_desired_replicas_table(value, current, lo, hi, target, last, expect):
    assert desired_replicas(value, current, lo, hi, target, last, NOW) == expect


def test_scale_down_keeps_highest_recent_recommendation():
    recs = [(NOW - 100, 6), (NOW - 400, 9)]  # 9 is outside the 300 s window
    assert desired_replicas(1.0, 8, 1, 10, 4.0, None, NOW, recommendations=recs) == 6
    assert desired_replicas(1.0, 8, 1, 10, 4.0, None, NOW, recommendations=[(NOW - 400, 9)]) == 2


def test_scale_up_step_cap():
    assert desired_replicas(100.0, 2, 1, 50, 4.0, None, NOW, max_scale_up_factor=2.0) == 4


def test_latency_metric_scales_on_ratio():
    sig = PoolSignal("prefill", replicas=2, ttft_recent=1.5)
    v = pool_metric_value(sig, "ttft")
    assert desired_replicas(v, 2, 1, 8, 0.5, None, NOW) == 6  # 3x over the TTFT target


def test_bad_arguments():
    with pytest.raises(ValueError):
        desired_replicas(1.0, 1, 1, 2, 0.0, None, NOW)
    with pytest.raises(ValueError):
        desired_replicas(1.0, 1, 3, 2, 1.0, None, NOW)
    with pytest.raises(ValueError):
        pool_metric_value(PoolSignal("decode"), "gpu")


ROUTER_TEXT = f"""\
# HELP {m.R_ENDPOINTS} Ready endpoints in the pool.
# TYPE {m.R_ENDPOINTS} gauge
{m.R_ENDPOINTS}{{pool="decode"}} 2
{m.R_ENDPOINTS}{{pool="prefill"}} 2
{m.R_IN_FLIGHT}{{pool="decode"}} 24
{m.R_IN_FLIGHT}{{pool="prefill"}} 1
{m.R_QUEUE_DEPTH}{{pool="decode"}} 3
{m.R_QUEUE_DEPTH}{{pool="prefill"}} 0
{m.R_ENGINE_RUNNING}{{pool="decode"}} 16
{m.R_TTFT_RECENT}{{pool="prefill"}} 0.12
{m.R_TTFT_RECENT}{{pool="decode"}} NaN
{m.R_ITL_RECENT}{{pool="decode"}} 0.05
{m.R_REQUESTS}{{pool="decode",code="200"}} 90
{m.R_REQUESTS}{{pool="decode",code="502"}} 2
{m.R_ERRORS}{{pool="decode",reason="connect"}} 1
{m.R_TTFT}_bucket{{pool="prefill",le="0.1"}} 3
{m.R_TTFT}_sum{{pool="prefill"}} 0.4
{m.R_TTFT}_count{{pool="prefill"}} 4
"""


def test_parse_router_metrics():
    sig = parse_router_metrics(ROUTER_TEXT)
    assert set(sig) == {"prefill", "decode"}
    d, p = sig["decode"], sig["prefill"]
    assert (d.replicas, d.in_flight, d.queue_depth, d.running) == (2, 24, 3, 16)
    assert d.itl_recent == 0.05 and d.ttft_recent is None  # NaN = no recent data
    assert d.requests_total == 92 and d.errors_total == 1
    assert p.ttft_recent == 0.12 and p.in_flight == 1


def test_decode_surge_scales_decode_and_leaves_prefill():
    sig = parse_router_metrics(ROUTER_TEXT)
    policies = {"prefill": PoolPolicy(1, 8, "queue-depth", 2.0), "decode": PoolPolicy(1, 8, "in-flight", 4.0)}
    states = {"prefill": PoolState(2), "decode": PoolState(2)}
    out = plan(sig, policies, states, NOW)
    assert out == {"prefill": 1, "decode": 6}  # decode: 24 in flight / 4 per replica; prefill idle -> min
    states = {"prefill": PoolState(2, last_scale_time=NOW - 10), "decode": PoolState(2)}
    assert plan(sig, policies, states, NOW) == {"prefill": 2, "decode": 6}  # prefill held by stabilization


def test_prefill_queue_scales_prefill_only():
    sig = {
        "prefill": PoolSignal("prefill", replicas=1, queue_depth=9.0, in_flight=10),
        "decode": PoolSignal("decode", replicas=2, in_flight=8.0),
    }
    policies = {"prefill": PoolPolicy(1, 4, "", 2.0), "decode": PoolPolicy(1, 8, "", 4.0)}
    out = plan(sig, policies, {"prefill": PoolState(1), "decode": PoolState(2)}, NOW)
    assert out == {"prefill": 4, "decode": 2}


def test_missing_pool_signal_holds():
    out = plan({}, {"decode": PoolPolicy(1, 4, "", 4.0)}, {"decode": PoolState(3)}, NOW)
    assert out == {"decode": 3}


def test_metrics_roundtrip():
    r = m.Registry()
    c = r.counter("a:b_total", "help", ["pool"])
    g = r.gauge("g", "help")
    h = r.histogram("h_seconds", "help", ["pool"], (0.1, 1.0))
    c.inc(pool="decode")
    c.inc(2, pool='pre"fill')
    g.set(2.5)
    h.observe(0.05, pool="x")
    h.observe(5.0, pool="x")
    s = m.parse_text(r.render())
    assert m.sum_samples(s, "a:b_total") == 3
    assert m.sum_samples(s, "a:b_total", pool='pre"fill') == 2
    assert m.sum_samples(s, "g") == 2.5
    assert m.sum_samples(s, "h_seconds_bucket", le="0.1") == 1
    assert m.sum_samples(s, "h_seconds_bucket", le="+Inf") == 2
    assert math.isclose(m.sum_samples(s, "h_seconds_sum"), 5.05)


def test_merge_signals_of_router_replicas():
    a = parse_router_metrics(ROUTER_TEXT)
    b = {
        "decode": PoolSignal("decode", replicas=2, in_flight=6, queue_depth=3, running=16, itl_recent=0.07),
        "prefill": PoolSignal("prefill", replicas=2, in_flight=1),
    }
    got = merge_signals([a, b])
    d = got["decode"]
    assert (d.replicas, d.in_flight, d.queue_depth, d.running) == (2, 30, 3, 16)
    assert math.isclose(d.itl_recent, 0.06) and d.ttft_recent is None
    assert got["prefill"].in_flight == 2 and got["prefill"].ttft_recent == 0.12
