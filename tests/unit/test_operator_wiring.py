"""The operator's wiring that needs no API server: the client's timeouts (against a socket that never
answers), kopf's server-side pod selector, and the requeue scheduler."""

from __future__ import annotations

import socket
import threading
from typing import Any

import kopf
from kubernetes import client

from kubeforge import contract
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
