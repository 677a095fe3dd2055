"""kopf wiring: thin handlers that hand every event to the Reconciler.

kopf knows nothing of desired vs actual state, so convergence is driven by triggers that all run the same
idempotent reconcile, on the requeue workers (controller/requeue.py): an event on the object; events on its
pods, folded into one reconcile a moment later (a gang's pods emit dozens in a burst); events on its Kueue
Workload (admission, eviction, preemption: Kueue says them nowhere else); the `requeue_after` a
reconcile asks for (a deadline, a backoff, a schedule timeout); a source of model.from that succeeded, failed
or went, for the objects that wait on it (kopf indices of model.from); and a slow safety-net resync
(KUBEFORGE_RESYNC_SECONDS) for anything missed. The operator's own writes coming back on the watch (its
status writes, the pods it just created or deleted) reconcile nothing: controller/echoes.py (but a hand-off
its own status write announces still reaches the consumers).

No finalizer, ever: children are owned (garbage-collected) and nothing lives outside the cluster, so an
object (or its namespace) deletes with the operator down or uninstalled. That is why the resync is one
loop over kopf indices of the objects rather than a `kopf.timer`: kopf puts a finalizer on every object a
timer or daemon serves. Objects that an older kubeforge marked with that finalizer lose it on first sight.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import kopf

from kubeforge import GROUP, VERSION, contract
from kubeforge.api.registry import KINDS
from kubeforge.api.validation import validate
from kubeforge.settings import OperatorSettings

from . import kueue, memory, metrics
from .kube import Kube
from .reconciler import Reconciler
from .requeue import Requeue
from .webhook import self_signed_certificate

log = logging.getLogger("kubeforge")

SETTINGS = OperatorSettings()
KOPF_EXECUTOR_WORKERS = 16  # threads kopf runs the sync handlers on
POD_EVENTS_FOLD_S = 1.0  # pod events within this long of the first become one reconcile of their job
_reconciler: Reconciler | None = None
_requeue: Requeue | None = None
_singletons = threading.Lock()  # handlers run on kopf's executor threads: one reconciler, one echo memory


def reconciler() -> Reconciler:
    global _reconciler
    with _singletons:
        if _reconciler is None:
            _reconciler = Reconciler(Kube(api_client()), SETTINGS)
        return _reconciler


def _reconcile_now(key: Any) -> float | None:
    """One reconcile on a requeue worker, counted and timed; a failure is retried by the scheduler."""
    kind, namespace, name = key
    started = time.monotonic()
    try:
        after = reconciler().reconcile(kind, namespace, name)
    except Exception:
        metrics.RECONCILES.labels(kind, "error").inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
    metrics.RECONCILES.labels(kind, "ok").inc()
    return after


def requeue() -> Requeue:
    global _requeue
    with _singletons:
        if _requeue is None:
            _requeue = Requeue(_reconcile_now, workers=SETTINGS.reconcile_workers)
        return _requeue


def is_echo(plural: str, body: kopf.Body, type_: str | None) -> bool:
    """This event is a version of the object that the operator itself wrote: nothing new to reconcile. A
    deletion always is news."""
    meta = body.get("metadata") or {}
    return type_ != "DELETED" and reconciler().kube.echoes.is_echo(
        plural, meta.get("namespace"), meta.get("name", ""), meta.get("resourceVersion"))


class LevelBasedDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a deep copy of every object on every event to diff it against the last handled one; that
    is for change handlers (on.create/update/field), which kubeforge has none of (every handler is level-based:
    on.event and indices), so the copy was pure cost: half of the operator's event-loop time with a few
    thousand pods. test_operator_wiring pins that no change handler exists."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}


# the pods kubeforge made; the API server filters the pod watch by it, so the operator never streams (and
# keeps in memory) every pod of the cluster
CHILD_POD_SELECTOR = f"{contract.LABEL_JOB_KIND},{contract.LABEL_JOB_NAME}"


def tune(settings: kopf.OperatorSettings) -> None:
    """kopf's settings, apart from anything that needs a cluster."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = LevelBasedDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kubeforge posts its own, meaningful events
    settings.execution.max_workers = KOPF_EXECUTOR_WORKERS
    # kopf keeps one worker per object, holding the object's last event, until no event came for idle_timeout
    # (5 s): a burst of a few thousand pods kept them all resident at once. Every handler here is level-based
    # and cheap to start again, so workers go after half a second.
    settings.queueing.idle_timeout = 0.5
    settings.watching.server_timeout = 300
    settings.watching.label_selectors["", "v1", "pods"] = CHILD_POD_SELECTOR
    settings.watching.label_selectors[kueue.GROUP, "workloads"] = CHILD_POD_SELECTOR
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
        if SETTINGS.webhook_configuration:  # dev clusters; the chart owns its configuration (service, caBundle)
            settings.admission.managed = SETTINGS.webhook_configuration


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    tune(settings)


def connection_pool_size(settings: OperatorSettings) -> int:
    """Every reconcile worker, every parallel child call and every kopf executor thread (pod reports) may hold
    a connection at once: a smaller pool closes the extras after each call, and each next one pays a TLS
    handshake, on the API server too."""
    return settings.reconcile_workers + settings.api_concurrency + KOPF_EXECUTOR_WORKERS + 4


def api_client() -> Any:
    """The reconciler's Kubernetes client: the configuration kopf logged in with (its login loads the in-cluster
    or kubeconfig configuration into the client's default, so a pool size set on the default before that is
    lost), with a pool sized for the operator's concurrency."""
    from kubernetes import client

    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = connection_pool_size(SETTINGS)
    return client.ApiClient(cfg)


def _reconcile(kind: str, namespace: str, name: str) -> None:
    """Reconcile now, on the requeue workers: kopf never retries an event handler that failed, the
    scheduler does (with backoff), and it runs whatever requeue_after the reconcile asks for."""
    requeue().after((kind, namespace, name), 0)


def _register(kind_name: str, plural: str) -> None:
    def admit(body: kopf.Body, old: kopf.Body | None, operation: str | None, **_: Any) -> None:
        errors = validate(dict(body), dict(old) if old and operation == "UPDATE" else None)
        if errors:
            raise kopf.AdmissionError("; ".join(str(e) for e in errors), code=422)

    def on_event(body: kopf.Body, name: str | None, namespace: str | None, type: str | None,
                 **kwargs: Any) -> None:
        if name and namespace and type != "DELETED":
            drop_legacy_finalizer(kind_name, dict(body))
            if not is_echo(plural, body, type):
                _reconcile(kind_name, namespace, name)
        if name and namespace and (type == "DELETED" or (body.get("status") or {}).get("phase") in HANDOFF_PHASES):
            # the objects whose model.from names this one hand off now, not at their next poll (also when the
            # event is the echo of our own status write: that write is the hand-off)
            for kind, consumer in consumers_of(kwargs, namespace, kind_name, name):
                _reconcile(kind, namespace, consumer)

    def model_from(body: kopf.Body, name: str | None, namespace: str | None, **_: Any) -> dict[Any, Any] | None:
        key = model_from_key(dict(body), namespace)
        return {key: (kind_name, name)} if key and name else None

    def index(body: kopf.Body, name: str | None, namespace: str | None, **_: Any) -> dict[Any, Any] | None:
        return {(namespace, name): metrics.summary(kind_name, dict(body))} if name and namespace else None

    if SETTINGS.webhook:  # kopf refuses admission handlers without a server to serve them
        # never DELETE: an object that today's rules reject must still be deletable
        kopf.on.validate(GROUP, VERSION, plural, id=f"validate-{plural}", operations=["CREATE", "UPDATE"])(admit)
    kopf.on.event(GROUP, VERSION, plural, id=f"event-{plural}")(on_event)
    kopf.index(GROUP, VERSION, plural, id=index_id(plural))(index)
    kopf.index(GROUP, VERSION, plural, id=consumers_index_id(plural))(model_from)


def index_id(plural: str) -> str:
    return f"{plural}_index"


def consumers_index_id(plural: str) -> str:
    return f"{plural}_consumers"


# a source in one of these phases ends its consumers' wait (Succeeded: they start; Failed: they fail)
HANDOFF_PHASES = ("Succeeded", "Failed")


def model_from_key(body: dict[str, Any], namespace: str | None) -> tuple[str, str, str] | None:
    """(namespace, source kind, source name) of an object's spec.model.from, or None."""
    ref = ((body.get("spec") or {}).get("model") or {}).get("from") or {}
    if not namespace or not ref.get("kind") or not ref.get("name"):
        return None
    return namespace, str(ref["kind"]), str(ref["name"])


def consumers_of(indices: dict[str, Any], namespace: str, kind: str, name: str) -> list[tuple[str, str]]:
    """(kind, name) of every object whose model.from names kind/name in the namespace, from kopf's
    model.from indices (one per kind, injected into handlers by id)."""
    out: list[tuple[str, str]] = []
    for k in KINDS:
        index = indices.get(consumers_index_id(k.plural))
        if index is not None:
            out.extend(index.get((namespace, kind, name), ()))
    return sorted(set(out))


LEGACY_FINALIZER = f"{GROUP}/finalizer"  # what kopf.timer made kopf add, up to kubeforge 0.1.0


def drop_legacy_finalizer(kind: str, body: dict[str, Any]) -> None:
    meta = body.get("metadata") or {}
    finalizers = meta.get("finalizers") or []
    if LEGACY_FINALIZER not in finalizers:
        return
    from .kube import RESOURCES

    rest = [f for f in finalizers if f != LEGACY_FINALIZER]
    # resourceVersion makes the patch fail rather than drop a finalizer another controller just added
    reconciler().kube.merge_patch(RESOURCES[kind], meta["namespace"], meta["name"],
                                  {"metadata": {"finalizers": rest or None, "resourceVersion": meta["resourceVersion"]}})


def resync_once(indices: list[Any]) -> int:
    """Queue a reconcile of every known object (the requeue workers run them); the number queued."""
    keys = list(index_entries(indices))
    for (namespace, name), summary in keys:
        _reconcile(summary["kind"], namespace, name)
    return len(keys)


def index_entries(indices: list[Any]) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    """(namespace, name) -> summary of every object kopf has seen and not seen deleted."""
    return [(key, next(iter(values))) for index in indices for key, values in list(index.items()) if values]


async def resync_loop(indices: list[Any], interval: float) -> None:
    """The safety net never stops: a pass that fails is logged and the next one comes as usual (an exception
    escaping would end the task silently, and with it every reconcile that nothing else triggers)."""
    while True:
        await asyncio.sleep(interval)
        try:
            resync_once(indices)
        except Exception:  # noqa: BLE001
            log.exception("resync pass failed; the next one is in %.0fs", interval)


for _kind in KINDS:
    _register(_kind.kind, _kind.plural)


@kopf.on.startup(id="resync")
async def start_resync(memo: kopf.Memo, **kwargs: Any) -> None:
    """Every object reconciled at least every resync_seconds, besides on events (kopf indices are live)."""
    indices = [kwargs[index_id(k.plural)] for k in KINDS]
    if SETTINGS.metrics_port:
        metrics.serve(SETTINGS.metrics_port, lambda: index_entries(indices))
    memo["resync"] = asyncio.create_task(resync_loop(indices, SETTINGS.resync_seconds), name="kubeforge-resync")
    if SETTINGS.memory_trim_seconds > 0:
        memo["trim"] = asyncio.create_task(memory.trim_loop(SETTINGS.memory_trim_seconds), name="kubeforge-trim")


@kopf.on.cleanup(id="stop-resync")
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    for task in (memo.get("resync"), memo.get("trim")):
        if task is not None:
            task.cancel()


@kopf.on.event("", "v1", "pods", labels={contract.LABEL_JOB_KIND: kopf.PRESENT, contract.LABEL_JOB_NAME: kopf.PRESENT})
def on_child_pod(body: kopf.Body, labels: dict[str, str], namespace: str | None, type: str | None,
                 **_: Any) -> None:
    """A pod of a job changed: keep its report (even from a deleted pod), then reconcile the owner soon, once
    for the whole burst of events its gang emits. The operator's own create or delete coming back is no
    change: the reconcile that made it already decided what follows."""
    if not namespace or is_echo("pods", body, type):
        return
    kind, name = labels[contract.LABEL_JOB_KIND], labels[contract.LABEL_JOB_NAME]
    try:
        reconciler().record_pod_report(kind, namespace, name, dict(body))
    except Exception:
        log.exception("could not record the report of pod %s/%s", namespace, body.get("metadata", {}).get("name"))
    requeue().after((kind, namespace, name), POD_EVENTS_FOLD_S)


# Kueue's preferred version of Workloads (kopf resolves it; a cluster without Kueue only logs that the resource
# is not there, and kopf starts watching once its CRD appears)
@kopf.on.event(group=kueue.GROUP, plural="workloads",
               labels={contract.LABEL_JOB_KIND: kopf.PRESENT, contract.LABEL_JOB_NAME: kopf.PRESENT})
def on_child_workload(body: kopf.Body, labels: dict[str, str], namespace: str | None, type: str | None,
                      **_: Any) -> None:
    """Kueue admitted, evicted, preempted or finished a job's Workload: reconcile the job now, not at the
    next resync (the Workload is the only place Kueue says so). The operator's own writes to it (its
    creation, `active`, the status it reports back) are echoes and reconcile nothing."""
    if not namespace or is_echo("workloads", body, type):
        return
    requeue().after((labels[contract.LABEL_JOB_KIND], namespace, labels[contract.LABEL_JOB_NAME]), 0)
