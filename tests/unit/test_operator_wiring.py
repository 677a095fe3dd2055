"""The operator's kopf wiring: no handler makes kopf put a finalizer on objects (deletion never needs the
operator), the resync goes through kopf indices, and /metrics exposes reconciles and jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from prometheus_client import generate_latest

from kubeforge.controller import metrics


def _registry_facts(env: dict[str, str]) -> dict:
    code = (
        "import json, kopf, kubeforge.controller.handlers;"
        "r = kopf.get_default_registry();"
        "print(json.dumps({'spawning': [h.id for h in r._spawning.get_all_handlers()],"
        " 'finalizing': [h.id for h in r._changing.get_all_handlers() if h.requires_finalizer],"
        " 'indices': sorted(h.id for h in r._indexing.get_all_handlers())}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_no_handler_puts_a_finalizer_on_kubeforge_objects():
    """kopf adds its finalizer for timers, daemons and deletion handlers: none may exist."""
    facts = _registry_facts({"KUBEFORGE_WEBHOOK": "true"})
    assert facts["spawning"] == [] and facts["finalizing"] == []
    assert facts["indices"] == sorted(f"{p}_index" for p in
                                      ("pretrainjobs", "contextextensionjobs", "rljobs", "inferencedeployments"))


def test_the_resync_reconciles_every_indexed_object(monkeypatch):
    from kubeforge.controller import handlers

    seen = []
    monkeypatch.setattr(handlers, "_reconcile", lambda kind, ns, name: seen.append((kind, ns, name)))
    indices = [{("a", "j1"): [metrics.summary("PretrainJob", {})]},
               {("b", "s1"): [metrics.summary("InferenceDeployment", {})], ("b", "gone"): []}]
    assert handlers.resync_once(indices) == 2
    assert seen == [("PretrainJob", "a", "j1"), ("InferenceDeployment", "b", "s1")]


def test_metrics_expose_reconciles_jobs_by_phase_restarts_and_checkpoint_age():
    entries = [
        (("a", "ptj"), metrics.summary("PretrainJob", {"status": {
            "phase": "Running", "restarts": 2, "lastCheckpoint": {"uri": "s3://b/c", "step": 5,
                                                                 "time": "2026-01-01T00:00:00Z"}}})),
        (("a", "llm"), metrics.summary("InferenceDeployment", {"status": {"phase": "Ready"}})),
    ]
    collector = metrics.ObjectsCollector(lambda: entries, clock=lambda: 1767225600.0 + 90)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'kubeforge_jobs{kind="PretrainJob",phase="Running"} 1.0' in text
    assert 'kubeforge_jobs{kind="InferenceDeployment",phase="Ready"} 1.0' in text
    assert 'kubeforge_job_restarts{kind="PretrainJob",name="ptj",namespace="a"} 2.0' in text
    assert 'kubeforge_job_last_checkpoint_age_seconds{kind="PretrainJob",name="ptj",namespace="a"} 90.0' in text
    metrics.RECONCILES.labels("PretrainJob", "ok").inc()
    assert "kubeforge_reconcile_total" in generate_latest(metrics.REGISTRY).decode()
