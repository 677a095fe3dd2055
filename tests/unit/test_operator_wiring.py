"""The operator's wiring that needs no API server: the client's timeouts (against a socket that never
answers), kopf's server-side pod selector, the requeue scheduler, no handler that makes kopf put a finalizer
on objects (deletion never needs the operator), the resync over kopf indices, and /metrics."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

import kopf
from kubernetes import client
from prometheus_client import generate_latest

from kubeforge import contract
from kubeforge.controller import metrics
from kubeforge.controller.kube import RESOURCES, Kube


def test_an_api_call_to_a_server_that_never_answers_times_out() -> None:
    """Without a timeout a reconcile (and the lock it holds on its object) waits forever on a stuck server."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections, never answers
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    cfg.retries = 0
    kube = Kube(client.ApiClient(cfg), timeout=(1.0, 1.0))
    outcome: list[Any] = []

    def call() -> None:
        try:
            kube.get(RESOURCES["Pod"], "ns", "p")
            outcome.append("answered")
        except Exception as exc:  # noqa: BLE001 - what is raised is what the test looks at
            outcome.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(120)  # a liveness bound far above the timeout, not a measurement
    silent.close()
    assert outcome and isinstance(outcome[0], Exception) and "timed out" in str(outcome[0]).lower()


def test_kopf_watches_only_kubeforge_pods() -> None:
    """The pod watch carries a label selector to the API server, instead of streaming every pod of the
    cluster to the operator and filtering there."""
    from kopf._cogs.structs.references import Resource

    from kubeforge.controller.handlers import tune

    settings = kopf.OperatorSettings()
    tune(settings)
    pods = Resource("", "v1", "pods", kind="Pod", namespaced=True)
    selector = ",".join(settings.watching.label_selectors.collect(pods))
    assert contract.LABEL_JOB_KIND in selector and contract.LABEL_JOB_NAME in selector
    assert settings.networking.request_timeout and settings.networking.connect_timeout


def test_the_reconcilers_connection_pool_survives_kopfs_login(tmp_path, monkeypatch) -> None:
    """kopf's login loads the kubeconfig into the client's default configuration after the operator's startup
    handlers ran: a pool size set on that default was lost, the reconciler got the client's 10 (5 per core)
    and discarded a connection after most parallel calls (bench_operator_scale: 426 times for 200 jobs)."""
    from kopf._core.intents.piggybacking import login_via_client
    from kubernetes import config

    from kubeforge.controller import handlers

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.setattr(handlers, "_reconciler", None)
    default = client.Configuration.get_default_copy()
    try:
        settings = kopf.OperatorSettings()
        handlers.configure(settings=settings)
        login_via_client(logger=logging.getLogger("test"), settings=settings)  # what kopf runs next
        kube = handlers.reconciler().kube
        pool = kube.api_client.rest_client.pool_manager.connection_pool_kw["maxsize"]
        assert pool == handlers.connection_pool_size(handlers.SETTINGS) >= (
            handlers.SETTINGS.reconcile_workers + handlers.SETTINGS.api_concurrency + handlers.KOPF_EXECUTOR_WORKERS)
        assert kube.api_client.configuration.host == "https://127.0.0.1:1"  # kopf's login, not a default
    finally:
        client.Configuration.set_default(default)


def test_kopf_lets_an_idle_object_worker_go_within_a_second() -> None:
    """kopf's worker for an object holds its last event until idle_timeout passes without another; kopf's 5 s
    kept every pod of a burst resident at once (bench_operator_scale: 162 MiB at 2,000 pods, 130 MiB at 0.5 s)."""
    from kubeforge.controller.handlers import tune

    settings = kopf.OperatorSettings()
    tune(settings)
    assert 0 < settings.queueing.idle_timeout <= 1




class Calls:
    """What the scheduler ran, with a way to wait for a number of runs without sleeping."""

    def __init__(self, answers: dict[str, list[Any]] | None = None) -> None:
        self.runs: list[str] = []
        self.answers = answers or {}
        self.cv = threading.Condition()

    def __call__(self, key: Any) -> float | None:
        with self.cv:
            self.runs.append(key)
            self.cv.notify_all()
            todo = self.answers.get(key) or [None]
            answer = todo.pop(0) if len(todo) > 1 else todo[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wait_for(self, n: int, timeout: float = 60) -> list[str]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.runs) >= n, timeout), self.runs
            return list(self.runs)


def test_requeue_folds_a_burst_into_one_reconcile_and_honours_requeue_after() -> None:
    from kubeforge.controller.requeue import Requeue

    calls = Calls({"a": [0.05, None], "b": [RuntimeError("api down"), None]})
    rq = Requeue(calls)
    try:
        for _ in range(20):  # a gang's pod events
            rq.after("a", 0.2)
        rq.after("b", 0.0)
        runs = calls.wait_for(4)  # a, b (fails), a again (requeue_after 0.05), b again (retried)
        assert sorted(runs) == ["a", "a", "b", "b"]
        assert not rq.pending("a") and not rq.pending("b")  # a's second run returned None: nothing more
        rq.after("c", 3600)
        rq.after("c", 0)  # an earlier deadline wins
        assert calls.wait_for(5)[-1] == "c"
    finally:
        rq.stop()


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
    plurals = ("pretrainjobs", "contextextensionjobs", "rljobs", "inferencedeployments")
    assert facts["indices"] == sorted([*(f"{p}_index" for p in plurals), *(f"{p}_consumers" for p in plurals)])


def test_a_finished_or_deleted_source_reconciles_its_consumers_at_once(monkeypatch):
    """model.from hand-offs are event-driven: the consumers of a source that succeeded, failed or went are
    reconciled on its event, found through the per-kind model.from indices (not at their next poll)."""
    from kubeforge.controller import handlers

    def body(kind: str, source: tuple[str, str] | None, phase: str | None = None) -> dict:
        model = {"from": {"kind": source[0], "name": source[1]}} if source else {"uri": "s3://b/m"}
        return {"kind": kind, "spec": {"model": model}, "status": {"phase": phase} if phase else {}}

    assert handlers.model_from_key(body("RLJob", ("ContextExtensionJob", "long")), "ns") == (
        "ns", "ContextExtensionJob", "long")
    assert handlers.model_from_key(body("RLJob", None), "ns") is None
    assert handlers.model_from_key({"kind": "PretrainJob", "spec": {"entrypoint": {}}}, "ns") is None
    indices = {
        "rljobs_consumers": {("ns", "ContextExtensionJob", "long"): [("RLJob", "rl")]},
        "inferencedeployments_consumers": {("ns", "ContextExtensionJob", "long"): [("InferenceDeployment", "a")],
                                           ("other", "ContextExtensionJob", "long"): [("InferenceDeployment", "b")]},
        "pretrainjobs_index": {("ns", "x"): [{}]},
    }
    assert handlers.consumers_of(indices, "ns", "ContextExtensionJob", "long") == [
        ("InferenceDeployment", "a"), ("RLJob", "rl")]
    assert handlers.consumers_of(indices, "ns", "PretrainJob", "long") == []

    # the event handler of the source's kind: consumers go on a finished source, not on a running one
    seen: list[tuple[str, str, str]] = []
    monkeypatch.setattr(handlers, "_reconcile", lambda kind, ns, name: seen.append((kind, ns, name)))
    (on_event,) = [h.fn for h in kopf.get_default_registry()._watching.get_all_handlers()
                   if h.id == "event-contextextensionjobs"]
    meta = {"name": "long", "namespace": "ns"}
    for phase, type_, expected in (("Running", "MODIFIED", []),
                                   ("Succeeded", "MODIFIED", [("InferenceDeployment", "ns", "a"), ("RLJob", "ns", "rl")]),
                                   ("Failed", None, [("InferenceDeployment", "ns", "a"), ("RLJob", "ns", "rl")]),
                                   ("Running", "DELETED", [("InferenceDeployment", "ns", "a"), ("RLJob", "ns", "rl")])):
        seen.clear()
        on_event(body={"metadata": meta, **body("ContextExtensionJob", None, phase)}, name="long", namespace="ns",
                 type=type_, **indices)
        own = [] if type_ == "DELETED" else [("ContextExtensionJob", "ns", "long")]
        assert seen == own + expected, (phase, type_)


def test_kueue_admitting_or_evicting_a_workload_reconciles_its_job_at_once(monkeypatch):
    """Kueue says admission, eviction and preemption only on the Workload: its events reconcile the owning
    job now (not at the next resync), the watch is filtered to kubeforge's Workloads at the API server, and
    the operator's own writes to the Workload coming back reconcile nothing."""
    from kopf._cogs.structs.references import Resource

    from kubeforge.controller import handlers

    settings = kopf.OperatorSettings()
    handlers.tune(settings)
    for version in ("v1beta1", "v1beta2"):
        workloads = Resource("kueue.x-k8s.io", version, "workloads", kind="Workload", namespaced=True)
        selector = ",".join(settings.watching.label_selectors.collect(workloads))
        assert contract.LABEL_JOB_KIND in selector and contract.LABEL_JOB_NAME in selector

    (handler,) = [h for h in kopf.get_default_registry()._watching.get_all_handlers()
                  if h.id == "on_child_workload"]
    assert handler.selector.group == "kueue.x-k8s.io" and handler.selector.plural == "workloads"
    assert handler.selector.version is None  # the cluster's preferred version: v1beta1 or v1beta2

    queued: list[tuple[Any, float]] = []

    class FakeRequeue:
        def after(self, key: Any, seconds: float) -> None:
            queued.append((key, seconds))

    monkeypatch.setattr(handlers, "requeue", FakeRequeue)
    labels = {contract.LABEL_JOB_KIND: "PretrainJob", contract.LABEL_JOB_NAME: "train"}
    admitted = {"metadata": {"namespace": "ns", "name": "train-workload", "resourceVersion": "7", "labels": labels},
                "status": {"admission": {"clusterQueue": "cq"}}}
    handler.fn(body=admitted, labels=labels, namespace="ns", type="MODIFIED")
    assert queued == [(("PretrainJob", "ns", "train"), 0)]

    queued.clear()
    handlers.reconciler().kube.echoes.expect("workloads", {**admitted, "metadata": {**admitted["metadata"],
                                                                                    "resourceVersion": "8"}})
    handler.fn(body={**admitted, "metadata": {**admitted["metadata"], "resourceVersion": "8"}}, labels=labels,
               namespace="ns", type="MODIFIED")
    assert queued == []


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


def test_the_operators_own_writes_coming_back_reconcile_nothing() -> None:
    """The version a write of ours produced is recognised once when the watch brings it back; any other
    version of the object (older, newer, someone else's) and any deletion is news."""
    from kubeforge.controller.echoes import Echoes

    echoes = Echoes(capacity=3)
    pod = {"kind": "Pod", "metadata": {"namespace": "ns", "name": "p", "resourceVersion": "12"}}
    echoes.expect("pods", pod)
    assert not echoes.is_echo("pods", "ns", "p", "11")  # an older event, delivered late: news to the reconcile
    assert echoes.is_echo("pods", "ns", "p", "12")
    assert not echoes.is_echo("pods", "ns", "p", "12")  # once
    echoes.expect("pods", {"kind": "Status", "metadata": {}, "status": "Success"})  # a DELETE's bare answer
    for i in range(5):  # bounded: the oldest expectations make way
        echoes.expect("pods", {"metadata": {"namespace": "ns", "name": f"q{i}", "resourceVersion": str(i)}})
    assert len(echoes) == 3 and not echoes.is_echo("pods", "ns", "q0", "0") and echoes.is_echo("pods", "ns", "q4", "4")


def test_kopf_builds_no_diff_base_since_no_handler_reacts_to_changes() -> None:
    """kubeforge's handlers are level-based, so kopf's per-event deep copy for change detection is skipped;
    that holds only while no change handler (on.create/update/field/resume) is registered."""
    from kubeforge.controller.handlers import tune

    settings = kopf.OperatorSettings()
    tune(settings)
    assert settings.persistence.diffbase_storage.build(body=kopf.Body({"spec": {"a": 1}})) == {}
    code = ("import json, kopf, kubeforge.controller.handlers;"
            "print(json.dumps([h.id for h in kopf.get_default_registry()._changing.get_all_handlers()]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KUBEFORGE_WEBHOOK": "true"},
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
