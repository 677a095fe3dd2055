"""One reconcile, top to bottom: fetch -> ignore if gone -> skip if deleting -> validate -> plan (pure) ->
apply the difference -> ONE status write -> events, only after that write succeeded."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from kubernetes.client.rest import ApiException

from kubeforge.api.registry import BY_KIND
from kubeforge.api.status import CheckpointRef, JobStatus, ServingStatus
from kubeforge.api.validation import parse_spec, validate
from kubeforge.settings import OperatorSettings

from . import kueue, lineage, pods
from .children import owned_by, selector
from .conditions import set_kstatus
from .kube import RESOURCES, Kube, Resource, resource_for
from .training import Event, JobContext, Observed, Plan, Source, merge_progress, plan

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def merge_patch_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) turning old into new; None when they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        patch: dict[str, Any] = {}
        for key in old.keys() - new.keys():
            patch[key] = None
        for key, value in new.items():
            if key not in old:
                patch[key] = value
            else:
                sub = merge_patch_diff(old[key], value)
                if sub is not None or (old[key] is not None and value is None):
                    patch[key] = sub if sub is not None else value
        return patch or None
    return None if old == new else new


NODES = Resource("", "v1", "nodes", namespaced=False)  # read only, for pods that look cut off (node_health)
# Children kubeforge keeps in step with the spec after creating them (the rest are create-once).
UPDATABLE = {"ConfigMap": "data", "Role": "rules"}
CONFLICT_RETRIES = 5  # a reconcile whose status write met a newer object reads and decides again this often


class StatusConflict(Exception):
    """The object changed after we read it (409 on the resourceVersion the status was computed from)."""


class ObjectGone(Exception):
    """The object was deleted while we reconciled it."""


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings, clock: Clock = utcnow) -> None:
        self.kube, self.settings, self.clock = kube, settings, clock
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # independent children of one reconcile (a gang's pods, its Service/RBAC/ConfigMap) go out at once;
        # shared by all reconciles so the operator's requests in flight stay bounded
        self._calls = ThreadPoolExecutor(max(1, settings.api_concurrency), thread_name_prefix="kube")

    def in_parallel(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Run independent API calls at once; every one is tried, then the first failure is raised (a gang
        create refused half-way by a quota keeps what was made, as one after another would)."""
        if len(calls) <= 1:
            return [c() for c in calls]
        futures = [self._calls.submit(c) for c in calls]
        results: list[Any] = []
        error: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001 - re-raised below, once all calls are done
                error = error or e
        if error is not None:
            raise error
        return results

    def lock(self, kind: str, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((kind, namespace, name), threading.Lock())

    # --- entry point -----------------------------------------------------------------------------------
    def reconcile(self, kind: str, namespace: str, name: str) -> float | None:
        with self.lock(kind, namespace, name):
            for attempt in range(CONFLICT_RETRIES):
                try:
                    return self._reconcile_once(kind, namespace, name)
                except ObjectGone:
                    return None
                except StatusConflict:
                    # someone wrote the object since we read it: nothing of this pass touched a pod (the status
                    # write goes first when pods are created or deleted), so read again and decide again
                    log.debug("%s %s/%s changed while reconciling (try %d); again", kind, namespace, name, attempt + 1)
            raise StatusConflict(f"{kind} {namespace}/{name} kept changing under {CONFLICT_RETRIES} reconciles")

    def _reconcile_once(self, kind: str, namespace: str, name: str) -> float | None:
        obj = self.kube.get(RESOURCES[kind], namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        errors = validate(obj)
        if errors:
            return self.stall_invalid(obj, [str(e) for e in errors])
        if kind == "PretrainJob":
            return self.reconcile_training(obj, "kubeforge.runtime.pretrain")
        if kind == "RLJob":
            from .rl import RUNTIME_MODULE

            return self.reconcile_training(obj, RUNTIME_MODULE)
        if kind == "ContextExtensionJob":
            from .extension import RUNTIME_MODULE

            return self.reconcile_training(obj, RUNTIME_MODULE)
        if kind == "InferenceDeployment":
            from .serving import reconcile_serving

            return reconcile_serving(self, obj)
        raise ValueError(f"no controller for kind {kind!r}")

    def record_pod_report(self, kind: str, namespace: str, name: str, pod: dict[str, Any]) -> None:
        """Keep what a pod reported even if the pod is gone before the next reconcile lists it.

        A pod stopped by suspension or eviction writes its last checkpoint and exits; the node may delete it
        right after, so its final annotation reaches the operator only through this event's copy of the pod.
        Checkpoints only move forward; progress only when it is ahead of what the status shows.
        """
        report = pods.progress_report(pod)
        if not report or kind not in BY_KIND or not BY_KIND[kind].is_job:
            return
        with self.lock(kind, namespace, name):
            for _ in range(CONFLICT_RETRIES):
                try:
                    return self._record_report_once(kind, namespace, name, report)
                except ObjectGone:
                    return None
                except StatusConflict:
                    continue  # written since we read it: merge the report into the newer status
            raise StatusConflict(f"{kind} {namespace}/{name} kept changing while recording a pod report")

    def _record_report_once(self, kind: str, namespace: str, name: str, report: dict[str, Any]) -> None:
        obj = self.kube.get(RESOURCES[kind], namespace, name)
        if obj is None:
            return
        status = JobStatus.model_validate(obj.get("status") or {})
        before = status.to_wire()
        known_ckpt = status.last_checkpoint.step if status.last_checkpoint else -1
        known_step = status.progress.step if status.progress and status.progress.step is not None else -1
        ckpt = report.get("lastCheckpoint")
        if isinstance(ckpt, dict) and isinstance(ckpt.get("step"), int) and ckpt["step"] > known_ckpt:
            status.last_checkpoint = CheckpointRef(uri=ckpt["uri"], step=ckpt["step"], time=ckpt.get("time"))
        if isinstance(report.get("step"), int) and report["step"] > known_step:
            merge_progress(status, {**report, "lastCheckpoint": None})
        if status.to_wire() != before:
            self.write_status(obj, status)

    # --- shared status helpers -----------------------------------------------------------------------
    def status_model(self, obj: dict[str, Any]) -> JobStatus | ServingStatus:
        model = BY_KIND[obj["kind"]].status_model
        return model.model_validate(obj.get("status") or {})  # type: ignore[no-any-return]

    def write_status(self, obj: dict[str, Any], status: JobStatus | ServingStatus, verify: bool = False) -> bool:
        """Write what changed, on the condition that the object is still the version it was computed from
        (its resourceVersion in the patch: a 409 otherwise, raised as StatusConflict, never a clobber).
        `verify`: send the condition even when nothing changed (a no-op on the server), because pods are about
        to be created or deleted on the strength of this version. True when something was written; `obj`
        then holds the new version."""
        new, old = status.to_wire(), obj.get("status") or {}
        patch = merge_patch_diff(old, new)
        if patch is None and not verify:
            return False
        meta = obj["metadata"]
        body: dict[str, Any] = {"metadata": {"resourceVersion": meta["resourceVersion"]}}
        if patch is not None:
            body["status"] = patch
        try:
            written = self.kube.merge_patch(RESOURCES[obj["kind"]], meta["namespace"], meta["name"], body,
                                            subresource="status")
        except ApiException as e:
            if e.status == 409:
                raise StatusConflict(kube_error_message(e)) from e
            raise
        if written is None:
            raise ObjectGone(f"{obj['kind']} {meta['namespace']}/{meta['name']}")
        meta["resourceVersion"] = written["metadata"]["resourceVersion"]
        obj["status"] = written.get("status") or {}
        return patch is not None

    def post_events(self, obj: dict[str, Any], events: list[Event]) -> None:
        for e in events:
            self.kube.post_event(obj, e.type, e.reason, e.message)

    def stall_invalid(self, obj: dict[str, Any], errors: list[str]) -> None:
        status = self.status_model(obj)
        status.observed_generation = obj["metadata"].get("generation")
        message = "; ".join(errors)
        status.message = f"invalid spec: {message}"
        changed = set_kstatus(status.conditions, ready=False, reconciling=False, stalled=True, reason="InvalidSpec",
                              message=message, generation=status.observed_generation, now=self.clock())
        if self.write_status(obj, status) and changed:
            self.post_events(obj, [Event("Warning", "InvalidSpec", message)])
        return None

    # --- model.from ----------------------------------------------------------------------------------
    def resolve_source(self, obj: dict[str, Any], model: Any) -> Source:
        """model.from: the pinned output if this object resolved it before, else the source's output now
        (and its pin), or why it waits or fails (controller/lineage.py)."""
        ref = model.from_
        if ref is None:
            return Source(uri=model.uri)
        pinned = lineage.pinned_source(obj.get("status"), ref.kind, ref.name)
        src = None if pinned else self.kube.get(RESOURCES[ref.kind], obj["metadata"]["namespace"], ref.name)
        return lineage.resolve(ref.kind, ref.name, obj.get("status"), src, self.clock())

    def resolved_spec(self, spec: Any, source: Source) -> dict[str, Any]:
        wire = spec.to_wire()
        if "model" not in wire:  # spec.entrypoint: the user's script brings its own model
            return wire
        model = dict(wire["model"])
        if source.uri:
            model.pop("from", None)
            model["uri"] = source.uri
        if "secretRef" not in model and (wire.get("checkpoint") or {}).get("secretRef"):
            model["secretRef"] = wire["checkpoint"]["secretRef"]
        wire["model"] = model
        return wire

    # --- training jobs -------------------------------------------------------------------------------
    def reconcile_training(self, obj: dict[str, Any], module: str) -> float | None:
        from .torchrun import TorchrunGang

        spec = parse_spec(obj)
        ns = obj["metadata"]["namespace"]
        source = self.resolve_source(obj, spec.model) if spec.model is not None else Source()
        resolved = self.resolved_spec(spec, source)
        if obj["kind"] == "RLJob":
            from .rl import judge_endpoint, reward_model_source, with_judge_url, with_reward_model_uri

            judge_url, judge_waiting = judge_endpoint(self.kube, obj, spec)
            reward = reward_model_source(self.kube, obj, spec)
            if reward.failed and not source.failed:
                source = replace(source, failed=reward.failed)
            elif judge_waiting and not (source.waiting or source.failed):
                source = replace(source, waiting=judge_waiting, reason="WaitingForJudge")
            elif reward.waiting and not (source.waiting or source.failed):
                source = replace(source, waiting=reward.waiting)
            resolved = with_reward_model_uri(with_judge_url(resolved, judge_url), reward.uri)
        secret = spec.checkpoint.secret_ref.name if spec.checkpoint.secret_ref else None
        gang_class: Any = TorchrunGang
        extra: dict[str, Any] = {}
        if obj["kind"] == "RLJob":
            from .rl import RLGang

            gang_class, extra = RLGang, {"rl_spec": spec, "serve_image": self.settings.serve_image}
        builder = gang_class(
            **extra,
            obj=obj, resources=spec.resources, scheduling=spec.scheduling, module=module,
            resolved_spec=resolved, secret_name=secret,
            s3_endpoint=spec.checkpoint.endpoint, python=self.settings.python,
            model_secret_name=spec.model.secret_ref.name if spec.model and spec.model.secret_ref else None,
            data_secret_name=spec.data.secret_ref.name if spec.data and spec.data.secret_ref else None,
            grace_seconds=spec.run_policy.termination_grace_period_seconds,
            entrypoint=getattr(spec, "entrypoint", None),
            default_image=self.settings.trainer_image, image_pull_secrets=tuple(self.settings.image_pull_secrets),
        )
        labelled = self.kube.list(RESOURCES["Pod"], ns, selector(obj))
        observed = Observed(pods=[p for p in labelled if owned_by(obj, p)],
                            foreign=[p for p in labelled if not owned_by(obj, p)], source=source)
        observed.lost_nodes, observed.late_nodes = self.node_health(observed.pods)
        version = "v1beta2"
        queue, priority, priority_error = self.kueue_queue_and_priority(obj, spec)
        if queue or spec.scheduling.gang == "kueue":
            # Kueue missing: the newest version, so that the Workload's create says what is wrong
            version = self.kueue_version(ns) or kueue.VERSIONS[0]
            wl_res = Resource(kueue.GROUP, version, "workloads")
            observed.workload = self.kube.get(wl_res, ns, kueue.workload_name(obj))
            adm = kueue.admission(observed.workload)
            for flavor in sorted(adm.flavor_names()) if adm else []:
                fl = self.kube.get(Resource(kueue.GROUP, version, "resourceflavors", namespaced=False), None, flavor)
                if fl is not None:
                    observed.flavors[flavor] = fl
        ctx = JobContext(obj=obj, spec=spec, builder=builder, workload_version=version,
                         backoff_cap_seconds=self.settings.gang_backoff_max_seconds,
                         queue_name=queue, priority=priority, priority_error=priority_error)
        result = plan(ctx, observed, self.clock())
        self.apply(obj, result, observed)
        return result.requeue_after

    def node_health(self, job_pods: list[dict[str, Any]]) -> tuple[dict[str, str], set[str]]:
        """Nodes of this job's pods that are lost (name -> why) and those that are not Ready but not tainted
        yet. Reads a Node only for a pod that looks cut off (not Ready, or deleting), so a healthy gang
        costs no extra call."""
        lost: dict[str, str] = {}
        late: set[str] = set()
        for node in sorted({pods.node_name(p) or "" for p in job_pods if pods.on_suspect_node(p)}):
            obj = self.kube.get(NODES, None, node)
            why = pods.node_lost(obj)
            if why:
                lost[node] = why
            elif not pods.node_ready(obj):
                late.add(node)
        return lost, late

    def kueue_queue_and_priority(self, obj: dict[str, Any], spec: Any
                                 ) -> tuple[str | None, kueue.WorkloadPriority | None, str | None]:
        """The job's LocalQueue (spec, label, or the namespace's `default` LocalQueue) and its priority."""
        sched = spec.scheduling
        ns = obj["metadata"]["namespace"]
        labels = obj["metadata"].get("labels") or {}
        default_exists = False
        if not sched.queue_name and not labels.get(kueue.QUEUE_LABEL) and sched.gang in (None, "kueue"):
            version = self.kueue_version(ns)
            if version is not None:
                lq = Resource(kueue.GROUP, version, "localqueues")
                default_exists = self.kube.get(lq, ns, kueue.DEFAULT_LOCAL_QUEUE) is not None
        queue = kueue.queue_name_for(obj, sched.queue_name, sched.gang, default_exists)
        if not queue and sched.gang != "kueue":
            return None, None, None
        wpc = labels.get(kueue.PRIORITY_CLASS_LABEL)
        pc = spec.resources.priority_class_name
        if wpc:
            res = Resource(kueue.GROUP, self.kueue_version(ns) or kueue.VERSIONS[0], "workloadpriorityclasses",
                           namespaced=False)
            cls, kind, name = self.kube.get(res, None, wpc), "WorkloadPriorityClass", wpc
        elif pc:
            res = Resource("scheduling.k8s.io", "v1", "priorityclasses", namespaced=False)
            cls, kind, name = self.kube.get(res, None, pc), "PriorityClass", pc
        else:
            return queue, (kueue.WorkloadPriority(sched.priority) if sched.priority is not None else None), None
        if cls is None:
            return queue, None, f"{kind} {name!r} does not exist; create it, or name another one"
        value = sched.priority if sched.priority is not None else int(cls.get("value", 0))
        return queue, kueue.WorkloadPriority(value, kind, name), None

    def kueue_version(self, namespace: str) -> str | None:
        """The newest Kueue API version the cluster serves (Workloads, as the operator reads them in the
        job's namespace); None when Kueue is not installed."""
        return next((v for v in kueue.VERSIONS if self.kube.serves(Resource(kueue.GROUP, v, "workloads"), namespace)),
                    None)

    def apply(self, obj: dict[str, Any], result: Plan, observed: Observed) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if result.workload is not None:
            try:
                self.apply_workload(result.workload, observed.workload)
            except ApiException as e:
                if e.status not in (400, 403, 422):
                    raise
                # The job's status must still say why nothing runs (e.g. Kueue's own rules refused it).
                result.status.phase = "Pending"
                result.status.message = f"the Kueue Workload was refused: {kube_error_message(e)}"
                result.events.append(Event("Warning", "WorkloadRefused", result.status.message))
                result.requeue_after = min(result.requeue_after or 60.0, 60.0)
        if result.workload_status_patch is not None and observed.workload is not None:
            res = Resource(kueue.GROUP, observed.workload["apiVersion"].split("/")[1], "workloads")
            try:
                self.kube.merge_patch(res, ns, observed.workload["metadata"]["name"], result.workload_status_patch,
                                      subresource="status")
            except ApiException as e:
                if e.status in (400, 422):
                    # refused by Kueue's own rules: say so, and let the job go on (the admission is Kueue's)
                    msg = f"Kueue refused kubeforge's update of the Workload's status: {kube_error_message(e)}"
                    log.warning("%s/%s: %s", ns, name, msg)
                    result.events.append(Event("Warning", "WorkloadStatusRefused", msg))
                    result.requeue_after = min(result.requeue_after or 60.0, 60.0)
                elif e.status != 409:
                    raise
                else:  # Kueue wrote the Workload since we read it: decide again from what it wrote
                    result.requeue_after = min(result.requeue_after or 1.0, 1.0)
        # The status first when pods are created or deleted, on the condition that the object is still the
        # version the plan was made from: a plan made from a stale read (an operator restarted while its
        # predecessor's last write was in flight, a user's change) stops here with a 409 and is made again,
        # before it touches a pod. And it records why pods go (a failure spends the restart budget), so an
        # operator killed between the two finds the next attempt recorded and deletes the old pods as stale,
        # instead of finding them gone and taking the failure for a preemption.
        pods_change = bool(result.delete_pods or result.force_delete_pods) or any(
            m["kind"] == "Pod" for m in result.create)
        if pods_change:
            self.write_status(obj, result.status, verify=True)
        self.in_parallel([lambda pod=pod: self.kube.delete(RESOURCES["Pod"], ns, pod,
                                                           grace_seconds=result.delete_grace_seconds)
                          for pod in result.delete_pods])
        # on a lost node: nobody would confirm a graceful delete
        self.in_parallel([lambda pod=pod: self.kube.delete(RESOURCES["Pod"], ns, pod, grace_seconds=0)
                          for pod in result.force_delete_pods])
        # the pods' ServiceAccount must exist before them (admission refuses a pod naming a missing one)
        self.in_parallel([lambda m=m: self.apply_child(m) for m in result.create if m["kind"] != "Pod"])
        self.in_parallel([lambda m=m: self.apply_child(m) for m in result.create if m["kind"] == "Pod"])
        if not pods_change:
            self.write_status(obj, result.status)
        self.post_events(obj, result.events)
        if result.delete_job:  # ttlSecondsAfterFinished: this object, never one re-created under its name since
            self.kube.delete(RESOURCES[obj["kind"]], ns, name, uid=obj["metadata"]["uid"])

    def apply_child(self, manifest: dict[str, Any]) -> None:
        if self.kube.create(manifest):
            return
        field = UPDATABLE.get(manifest["kind"])
        if field is None:
            return
        res, ns, name = resource_for(manifest), manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        current = self.kube.get(res, ns, name) or {}
        if current.get(field) != manifest[field]:  # exists but stale: bring the field we own up to date
            self.kube.merge_patch(res, ns, name, {field: manifest[field]})

    def apply_workload(self, desired: dict[str, Any], current: dict[str, Any] | None) -> None:
        if current is None:
            self.kube.create(desired)
            return
        if bool(current["spec"].get("active", True)) != bool(desired["spec"]["active"]):
            res = Resource(kueue.GROUP, current["apiVersion"].split("/")[1], "workloads")
            self.kube.merge_patch(res, current["metadata"]["namespace"], current["metadata"]["name"],
                                  {"spec": {"active": desired["spec"]["active"]}})


def kube_error_message(e: ApiException) -> str:
    import json

    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except ValueError:
        return str(e.reason)


__all__ = ["ObjectGone", "Reconciler", "StatusConflict", "merge_patch_diff", "utcnow"]
