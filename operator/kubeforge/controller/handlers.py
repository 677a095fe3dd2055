"""kopf wiring: thin handlers that hand every event to the Reconciler.

kopf knows nothing of desired vs actual state, so convergence is driven by triggers that all run the same
idempotent reconcile: an event on the object; events on its pods, folded into one reconcile a moment later
(a gang's pods emit dozens in a burst); the `requeue_after` a reconcile asks for (a deadline, a backoff, a
schedule timeout); and a slow safety-net timer (KUBEFORGE_RESYNC_SECONDS) for anything missed.
No handler needs a finalizer: children are owned (garbage-collected) and nothing lives outside the cluster.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import kopf

from kubeforge import GROUP, VERSION, contract
from kubeforge.api.registry import KINDS
from kubeforge.api.validation import validate
from kubeforge.settings import OperatorSettings

from .kube import Kube
from .reconciler import Reconciler
from .requeue import Requeue
from .webhook import self_signed_certificate

log = logging.getLogger("kubeforge")

SETTINGS = OperatorSettings()
POD_EVENTS_FOLD_S = 1.0  # pod events within this long of the first become one reconcile of their job
_reconciler: Reconciler | None = None
_requeue: Requeue | None = None


def reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        _reconciler = Reconciler(Kube(), SETTINGS)
    return _reconciler


def requeue() -> Requeue:
    global _requeue
    if _requeue is None:
        _requeue = Requeue(lambda key: reconciler().reconcile(*key), workers=8)  # type: ignore[misc]
    return _requeue


# the pods kubeforge made; the API server filters the pod watch by it, so the operator never streams (and
# keeps in memory) every pod of the cluster
CHILD_POD_SELECTOR = f"{contract.LABEL_JOB_KIND},{contract.LABEL_JOB_NAME}"


def tune(settings: kopf.OperatorSettings) -> None:
    """kopf's settings, apart from anything that needs a cluster."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kubeforge posts its own, meaningful events
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.watching.label_selectors["", "v1", "pods"] = CHILD_POD_SELECTOR
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    if SETTINGS.webhook:
        host = SETTINGS.webhook_host or "127.0.0.1"
        certfile, keyfile = SETTINGS.webhook_certfile, SETTINGS.webhook_keyfile
        if not certfile:
            cert, key = self_signed_certificate([host], Path(tempfile.mkdtemp(prefix="kubeforge-webhook-")))
            certfile, keyfile = str(cert), str(key)
        settings.admission.server = kopf.WebhookServer(
            addr=SETTINGS.webhook_listen, port=SETTINGS.webhook_port, host=host,
            certfile=certfile, pkeyfile=keyfile)
        settings.admission.managed = f"validate.{GROUP}"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    tune(settings)
    # the Kubernetes client the reconciler uses: same config kopf logged in with
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _reconcile(kind: str, namespace: str, name: str) -> None:
    """Reconcile now, on the requeue workers: kopf never retries an event handler that failed, the
    scheduler does (with backoff), and it runs whatever requeue_after the reconcile asks for."""
    requeue().after((kind, namespace, name), 0)


def _register(kind_name: str, plural: str) -> None:
    def admit(body: kopf.Body, old: kopf.Body | None, operation: str | None, **_: Any) -> None:
        errors = validate(dict(body), dict(old) if old and operation == "UPDATE" else None)
        if errors:
            raise kopf.AdmissionError("; ".join(str(e) for e in errors), code=422)

    def on_event(name: str | None, namespace: str | None, type: str | None, **_: Any) -> None:
        if name and namespace and type != "DELETED":
            _reconcile(kind_name, namespace, name)

    def on_timer(name: str | None, namespace: str | None, **_: Any) -> None:
        if name and namespace:
            _reconcile(kind_name, namespace, name)

    if SETTINGS.webhook:  # kopf refuses admission handlers without a server to serve them
        kopf.on.validate(GROUP, VERSION, plural, id=f"validate-{plural}")(admit)
    kopf.on.event(GROUP, VERSION, plural, id=f"event-{plural}")(on_event)
    kopf.timer(GROUP, VERSION, plural, id=f"resync-{plural}", interval=SETTINGS.resync_seconds,
               sharp=False)(on_timer)


for _kind in KINDS:
    _register(_kind.kind, _kind.plural)


@kopf.on.event("", "v1", "pods", labels={contract.LABEL_JOB_KIND: kopf.PRESENT, contract.LABEL_JOB_NAME: kopf.PRESENT})
def on_child_pod(body: kopf.Body, labels: dict[str, str], namespace: str | None, **_: Any) -> None:
    """A pod of a job changed: keep its report (even from a deleted pod), then reconcile the owner soon, once
    for the whole burst of events its gang emits."""
    if not namespace:
        return
    kind, name = labels[contract.LABEL_JOB_KIND], labels[contract.LABEL_JOB_NAME]
    try:
        reconciler().record_pod_report(kind, namespace, name, dict(body))
    except Exception:
        log.exception("could not record the report of pod %s/%s", namespace, body.get("metadata", {}).get("name"))
    requeue().after((kind, namespace, name), POD_EVENTS_FOLD_S)
