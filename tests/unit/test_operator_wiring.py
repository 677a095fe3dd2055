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


