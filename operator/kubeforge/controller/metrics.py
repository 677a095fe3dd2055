"""The operator's Prometheus metrics (/metrics on KUBEFORGE_METRICS_PORT; the chart's Service and
ServiceMonitor scrape it).

- kubeforge_reconcile_total{kind,result}, kubeforge_reconcile_duration_seconds{kind}: the reconciles
  (events, pod events and the periodic resync), and how long they take.
- kubeforge_api_requests_total{verb,resource,code}: every request the reconciler makes to the API server
  (kopf's own watches aside), so API calls per reconcile can be read off a running operator.
- kubeforge_objects{kind}: objects the operator tracks (what each resync pass goes through: its queue).
- kubeforge_jobs{kind,phase}, kubeforge_job_restarts{kind,namespace,name},
  kubeforge_job_last_checkpoint_age_seconds{kind,namespace,name}: read from the objects' status as kopf
  last saw it (its indices), so a scrape costs no API call.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
RECONCILES = PromCounter("kubeforge_reconcile_total", "Reconciles by kind and result (ok, error).",
                         ["kind", "result"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("kubeforge_reconcile_duration_seconds", "Time one reconcile takes.", ["kind"],
                              registry=REGISTRY,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

API_REQUESTS = PromCounter("kubeforge_api_requests_total",
                           "API server requests of the reconciler by verb, resource (with subresource) and code.",
                           ["verb", "resource", "code"], registry=REGISTRY)


def summary(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the metrics need of one object (the value of kopf's index entry)."""
    status = body.get("status") or {}
    return {
        "kind": kind,
        "phase": status.get("phase") or "Pending",
        "restarts": status.get("restarts") or 0,
        "checkpointTime": (status.get("lastCheckpoint") or {}).get("time"),
    }


def _age(rfc3339: str | None, now: float) -> float | None:
    if not rfc3339:
        return None
    try:
        t = datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return max(0.0, now - t.timestamp())


class ObjectsCollector(Collector):
    """Gauges over the objects kopf's indices hold: (namespace, name) -> [summary]."""

    def __init__(self, entries: Callable[[], Iterable[tuple[tuple[str, str], dict[str, Any]]]],
                 clock: Callable[[], float] = time.time) -> None:
        self.entries, self.clock = entries, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        entries = list(self.entries())
        now = self.clock()
        objects = GaugeMetricFamily("kubeforge_objects", "Objects the operator tracks.", labels=["kind"])
        for kind, n in sorted(Counter(s["kind"] for _, s in entries).items()):
            objects.add_metric([kind], n)
        jobs = GaugeMetricFamily("kubeforge_jobs", "kubeforge objects by phase.", labels=["kind", "phase"])
        for (kind, phase), n in sorted(Counter((s["kind"], s["phase"]) for _, s in entries).items()):
            jobs.add_metric([kind, phase], n)
        restarts = GaugeMetricFamily("kubeforge_job_restarts", "Gang restarts of a job.",
                                     labels=["kind", "namespace", "name"])
        age = GaugeMetricFamily("kubeforge_job_last_checkpoint_age_seconds",
                                "Seconds since a job's newest committed checkpoint.",
                                labels=["kind", "namespace", "name"])
        for (namespace, name), s in sorted(entries, key=lambda e: e[0]):
            if s["kind"] == "InferenceDeployment":
                continue
            restarts.add_metric([s["kind"], namespace, name], s["restarts"])
            if (a := _age(s["checkpointTime"], now)) is not None:
                age.add_metric([s["kind"], namespace, name], a)
        yield from (objects, jobs, restarts, age)


def serve(port: int, entries: Callable[[], Iterable[tuple[tuple[str, str], dict[str, Any]]]]) -> None:
    REGISTRY.register(ObjectsCollector(entries))
    start_http_server(port, registry=REGISTRY)
