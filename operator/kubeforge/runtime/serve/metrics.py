"""A small, dependency-free Prometheus registry (text exposition format 0.0.4) and a parser for it.

The engine and the router both expose `/metrics`; the router scrapes its engines and the operator scrapes
the router, so both the writer and the reader live here. Metric names may contain `:` (vLLM's
`vllm:num_requests_waiting` style), which the text format allows.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds (close to vLLM's TTFT / ITL buckets).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
)

LabelKey = tuple[tuple[str, str], ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: LabelKey, extra: Sequence[tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help_
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple((k, str(labels[k])) for k in self.labelnames)

    def render(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help_, labelnames)
        self._values: dict[LabelKey, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = (), fn=None):
        super().__init__(name, help_, labelnames)
        self._values: dict[LabelKey, float] = {}
        self._fn = fn  # optional callable -> float (unlabelled) or dict[LabelKey-dict, float]
        if not self.labelnames and fn is None:
            self._values[()] = 0.0

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        if self._fn is not None:
            got = self._fn()
            if isinstance(got, dict):
                items = sorted((self._key(lbl), v) for lbl, v in ((dict(k), v) for k, v in got.items()))
            else:
                items = [((), float(got))]
        else:
            with self._lock:
                items = sorted(self._values.items())
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()):
        super().__init__(name, help_, labelnames)
        self.buckets = tuple(sorted(buckets)) or TTFT_BUCKETS
        self._data: dict[LabelKey, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        idx = bisect.bisect_left(self.buckets, value)
        with self._lock:
            d = self._data.get(key)
            if d is None:
                d = self._data[key] = [0] * len(self.buckets) + [0.0, 0]
            if idx < len(self.buckets):
                d[idx] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, **labels: str) -> int:
        d = self._data.get(self._key(labels))
        return int(d[-1]) if d else 0

    def render(self) -> list[str]:
        out: list[str] = []
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for key, d in items:
            cum = 0
            for b, c in zip(self.buckets, d[: len(self.buckets)]):
                cum += c
                out.append(f"{self.name}_bucket{_fmt_labels(key, [('le', _fmt_value(b))])} {cum}")
            out.append(f"{self.name}_bucket{_fmt_labels(key, [('le', '+Inf')])} {d[-1]}")
            out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(d[-2])}")
            out.append(f"{self.name}_count{_fmt_labels(key)} {d[-1]}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help_, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help_: str, labelnames: Sequence[str] = (), fn=None) -> Gauge:
        return self.register(Gauge(name, help_, labelnames, fn))  # type: ignore[return-value]

    def histogram(
        self, name: str, help_: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> Histogram:
        return self.register(Histogram(name, help_, labelnames, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float = 0.0


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(v: str) -> str:
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse_text(text: str) -> list[Sample]:
    """Parse Prometheus text exposition into samples (comments and malformed lines are skipped)."""
    out: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        name, lbl, val = m.group(1), m.group(2), m.group(3)
        labels: dict[str, str] = {}
        if lbl:
            for lm in _LABEL_RE.finditer(lbl[1:-1]):
                labels[lm.group(1)] = _unescape(lm.group(2))
        try:
            value = float(val)
        except ValueError:
            continue
        out.append(Sample(name, labels, value))
    return out


def sum_samples(samples: Iterable[Sample], name: str, **match: str) -> float:
    """Sum of all samples called `name` whose labels include `match`."""
    total = 0.0
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
            total += s.value
    return total


def find_samples(samples: Iterable[Sample], name: str, **match: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in match.items())]


# ------------------------------------------------------------------------------------------ metric names
# Engine (the reference engine uses vLLM's names so the router and the autoscaler read either engine).
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_TTFT = "vllm:time_to_first_token_seconds"
VLLM_ITL = "vllm:inter_token_latency_seconds"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
KV_FETCHED = "kubeforge:kv_transfer_fetched_total"
KV_FETCH_FAILED = "kubeforge:kv_transfer_failed_total"
KV_SERVED = "kubeforge:kv_transfer_served_total"
PREFILL_TOKENS_COMPUTED = "kubeforge:prefill_tokens_computed_total"

# Router, every one labelled pool="prefill"|"decode". These drive the per-pool autoscaling.
R_ENDPOINTS = "kubeforge:router_endpoints"  # ready endpoints the router sees in the pool
R_IN_FLIGHT = "kubeforge:router_in_flight_requests"  # requests the router has outstanding on the pool
R_QUEUE_DEPTH = "kubeforge:router_queue_depth"  # sum of the pool engines' vllm:num_requests_waiting
R_ENGINE_RUNNING = "kubeforge:router_engine_running_requests"  # sum of vllm:num_requests_running
R_REQUESTS = "kubeforge:router_requests_total"  # labels pool, code
R_ERRORS = "kubeforge:router_errors_total"  # labels pool, reason
R_RETRIES = "kubeforge:router_retries_total"
R_PREFILL_SKIPPED = "kubeforge:router_prefill_skipped_total"  # label reason
R_TTFT = "kubeforge:router_time_to_first_token_seconds"  # histogram, pool="prefill" (P/D) or the pool
R_ITL = "kubeforge:router_inter_token_latency_seconds"  # histogram, pool="decode"
R_TTFT_RECENT = "kubeforge:router_ttft_recent_seconds"  # gauge: mean TTFT over the recent window
R_ITL_RECENT = "kubeforge:router_itl_recent_seconds"  # gauge: mean ITL over the recent window
R_PREFILL_LEG = "kubeforge:router_prefill_seconds"  # histogram, pool="prefill": the whole prefill leg
R_PREFILL_RECENT = "kubeforge:router_prefill_recent_seconds"  # gauge: mean prefill leg, recent window
