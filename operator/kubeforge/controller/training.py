"""The pure planner of training jobs (PretrainJob today; the pattern the other training kinds follow).

`plan(job, observed, now)` decides everything from what was read: which children should exist, which pods
go, and the new status. The reconciler applies the plan and writes the status once. All memory lives in
the status and in the pods' `kubeforge.dev/attempt` label, so an operator killed at any line converges.

Gang lifecycle, per attempt:
  no pods -> (backoff over) create the whole gang -> all Running -> Succeeded
  any pod failed            -> tear the gang down, attempt+1, restarts+1, exponential backoff (maxRestarts)
  exit code 78              -> Failed at once: the spec is wrong, retrying cannot help
  pod evicted/preempted,
  Kueue eviction, or the
  gang not running in time  -> tear the gang down, attempt+1, preemptions+1 (no restart budget spent)
  no progress in time       -> a hung collective: counts as a failure
  a node lost (NoExecute
  unreachable/not-ready)    -> tear down, force-delete the pods there (no kubelet will), preemptions+1
  pods failed only because
  a peer went away          -> wait up to PEER_LOST_HOLD_S for the cause (a lost node costs no restart)
  suspend                   -> pods get SIGTERM (the runtime checkpoints), phase Suspended
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from kubeforge import contract
from kubeforge.api import status as st
from kubeforge.api.status import CheckpointRef, JobStatus, Output, Progress

from . import extension, gang, kueue, pods
from .conditions import find, parse_time, rfc3339, set_condition, set_kstatus
from .lineage import SOURCE_FAILED, Source

TERMINAL = ("Succeeded", "Failed")
# How long a gang whose failed pods only lost a peer (contract.REASON_PEER_LOST) waits for the cause before
# counting a failure: a dead node is taken for lost after the controller-manager's --node-monitor-grace-period
# (50 s by default) plus its monitor period (5 s), and then it is an infrastructure failure, like a preemption.
PEER_LOST_HOLD_S = 90
# Grace of the survivors of a gang that lost a member (a failed pod, a lost node). Their checkpoint is a
# collective save, which cannot complete without the member that is gone, so runPolicy's grace (300 s by
# default, sized for a full save and upload) would only hold the next gang back: the survivors get this long
# to write their last report and exit. A gang stopped whole (suspension, preemption, eviction) keeps the
# pods' own grace and saves.
SURVIVOR_GRACE_S = 30


@dataclass
class Observed:
    pods: list[dict[str, Any]] = field(default_factory=list)  # this object's pods (owner uid), any attempt
    foreign: list[dict[str, Any]] = field(default_factory=list)  # same labels, another owner: a deleted
    # object of the same name whose pods still terminate
    workload: dict[str, Any] | None = None
    flavors: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: Source = field(default_factory=Source)
    lost_nodes: dict[str, str] = field(default_factory=dict)  # node name -> why its pods are lost
    late_nodes: set[str] = field(default_factory=set)  # not Ready, not (yet) tainted: look again soon


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: JobStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    force_delete_pods: list[str] = field(default_factory=list)  # on a lost node: no kubelet confirms a delete
    delete_grace_seconds: int | None = None  # for delete_pods; None: each pod's own grace period
    workload: dict[str, Any] | None = None
    workload_status_patch: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    delete_job: bool = False
    requeue_after: float | None = None


class GangBuilder(Protocol):
    """What a training kind supplies: its gang's pods and the children they need."""

    def gang_size(self) -> int: ...

    def pods(self, attempt: int, placement: dict[str, dict[str, Any]], gang_backend: gang.Backend) -> list[dict]: ...

    def support_children(self, gang_backend: gang.Backend) -> list[dict[str, Any]]: ...

    def pod_sets(self, attempt: int) -> list[kueue.PodSet]: ...


@dataclass
class JobContext:
    obj: dict[str, Any]
    spec: Any  # the kind's typed spec (has resources, checkpoint, scheduling, run_policy)
    builder: GangBuilder
    workload_version: str = "v1beta2"
    backoff_cap_seconds: int = 300
    # Kueue, resolved by the reconciler: the LocalQueue (spec, label or namespace default) and the priority
    # (explicit, or the value of the WorkloadPriorityClass / PriorityClass named); priority_error when a
    # named class does not exist (the Workload would be refused).
    queue_name: str | None = None
    priority: kueue.WorkloadPriority | None = None
    priority_error: str | None = None


def _status(obj: dict[str, Any]) -> JobStatus:
    return JobStatus.model_validate(obj.get("status") or {})


def _percent(step: int | None, total: int | None) -> int | None:
    if step is None or not total:
        return None
    return min(100, math.floor(100 * step / total))


def _eta(report: dict[str, Any]) -> str | None:
    step, total, tps, tokens = (report.get(k) for k in ("step", "totalSteps", "tokensPerSecond", "tokens"))
    if not (step and total and tps and tokens) or step >= total:
        return None
    seconds = (total - step) * (tokens / step) / tps
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def merge_progress(status: JobStatus, report: dict[str, Any] | None) -> None:
    """Fold rank 0's report into the status (progress survives across attempts: new pods start empty)."""
    if not report:
        return
    # a bare NaN/Infinity (json reads them) would make the status write a 400 and freeze the status
    report = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}
    step, total = report.get("step"), report.get("totalSteps")
    status.progress = Progress(
        step=step, total_steps=total, tokens=report.get("tokens"), loss=report.get("loss"),
        tokens_per_second=report.get("tokensPerSecond"), percent=_percent(step, total), eta=_eta(report),
        stage=report.get("stage"), reward=report.get("reward"), updated_at=report.get("time"),
    )
    if isinstance(report.get("rl"), dict):
        from pydantic import ValidationError

        from ..api.status import RLStatus

        try:
            status.rl = RLStatus.model_validate(report["rl"])
        except ValidationError:
            pass  # a malformed report does not block the rest of the status
    ckpt = report.get("lastCheckpoint")
    if isinstance(ckpt, dict) and ckpt.get("uri") and ckpt.get("step") is not None:
        status.last_checkpoint = CheckpointRef(uri=ckpt["uri"], step=ckpt["step"], time=ckpt.get("time"))
    extension.merge_stages(status, report)  # ContextExtensionJob's stages; no-op for the other kinds


class _Planner:
    def __init__(self, ctx: JobContext, observed: Observed, now: datetime) -> None:
        self.ctx, self.observed, self.now = ctx, observed, now
        self.obj, self.spec = ctx.obj, ctx.spec
        self.gen = ctx.obj["metadata"].get("generation")
        self.old = _status(ctx.obj)
        self.status = self.old.model_copy(deep=True)
        self.status.observed_generation = self.gen
        self.plan = Plan(status=self.status)
        self.failure_reason: str | None = None
        self.waiting_reason: str | None = None  # the kstatus reason while Pending on model.from or a judge
        self.queue = ctx.queue_name or self.spec.scheduling.queue_name
        self.backend = gang.backend(self.spec.scheduling, self.queue)
        self.current = [p for p in observed.pods if pods.attempt(p) == self.status.attempt]
        self.stale = [p for p in observed.pods if pods.attempt(p) != self.status.attempt]

    # --- helpers -------------------------------------------------------------------------------------
    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def requeue(self, seconds: float) -> None:
        seconds = max(0.5, seconds)
        cur = self.plan.requeue_after
        self.plan.requeue_after = seconds if cur is None else min(cur, seconds)

    def delete_all_pods(self) -> None:
        for p in self.observed.pods:
            if not pods.deleting(p) and pods.name(p) not in self.plan.delete_pods:
                self.plan.delete_pods.append(pods.name(p))

    def teardown(self, reason: str, message: str, *, failure: bool) -> None:
        """Stop the whole gang and move to the next attempt; failures spend the restart budget."""
        self.delete_all_pods()
        if failure or reason == "NodeLost":
            self.plan.delete_grace_seconds = min(SURVIVOR_GRACE_S, self.spec.run_policy.termination_grace_period_seconds)
        self.status.attempt += 1
        self.status.gang_created_at = None
        if failure:
            delay = self.spec.run_policy.backoff_seconds * (2 ** self.status.restarts)
            self.status.restarts += 1
        else:
            delay = self.spec.run_policy.backoff_seconds if reason == "GangScheduleTimeout" else 0
            self.status.preemptions += 1
        delay = min(delay, self.ctx.backoff_cap_seconds)
        self.status.backoff_until = rfc3339(self.now + timedelta(seconds=delay)) if delay else None
        self.status.phase = "Restarting"
        self.status.message = message
        self.event("Warning", reason, f"{message}; restarting the gang as attempt {self.status.attempt}"
                   + (f" in {delay}s" if delay else ""))

    def finish(self, succeeded: bool, reason: str, message: str) -> None:
        self.status.phase = "Succeeded" if succeeded else "Failed"
        self.status.completion_time = rfc3339(self.now)
        self.status.message = message
        self.status.backoff_until = None
        self.failure_reason = None if succeeded else reason
        self.event("Normal" if succeeded else "Warning", reason, message)
        if not succeeded:  # stop survivors; finished pods stay for their logs (they hold no resources)
            self.terminal_cleanup()

    # --- the decision ------------------------------------------------------------------------------
    def run(self) -> Plan:
        self.decide()
        self.release_lost_pods()
        self.progress()
        self.conditions()
        if self.old.phase != self.status.phase and self.status.phase and not self.plan.events:
            # a transition nobody announced more specifically above
            self.event("Warning" if self.status.phase in ("Failed", "Restarting") else "Normal",
                       self.status.phase, self.status.message or self.status.phase)
        return self.plan

    def decide(self) -> None:
        s = self.status
        if s.phase in TERMINAL:
            return self.terminal()
        src = self.observed.source
        if src.failed:
            return self.finish(False, SOURCE_FAILED, src.failed)
        if src.waiting:
            s.phase, s.message = "Pending", src.waiting
            self.waiting_reason = src.reason
            self.requeue(10)
            return None
        if src.uri:
            s.resolved_model_uri = src.uri
        if src.pinned is not None and s.source != src.pinned:
            s.source = src.pinned
            self.event("Normal", "SourceResolved", f"model.from {src.pinned.kind} {src.pinned.name} "
                       f"(uid {src.pinned.uid}, generation {src.pinned.generation}): {src.pinned.uri}")
        deadline = self.spec.run_policy.active_deadline_seconds
        started = parse_time(s.start_time)
        if deadline and started and self.now - started > timedelta(seconds=deadline):
            return self.finish(False, "DeadlineExceeded", f"job ran longer than activeDeadlineSeconds ({deadline}s)")
        if deadline and started:
            self.requeue((started + timedelta(seconds=deadline) - self.now).total_seconds() + 1)
        if self.spec.run_policy.suspend:
            return self.suspend()
        if self.backend == "kueue" and not self.kueue_admitted():
            return None
        self.gang()
        if self.backend == "kueue":
            self.report_pods_ready()
        return None

    def release_lost_pods(self) -> None:
        """Pods on a lost node never finish terminating (no kubelet confirms it), and the next gang reuses
        their names: delete them with no grace, as the node's pod GC would once the node is declared gone."""
        lost = self.observed.lost_nodes
        for p in self.observed.pods:
            if pods.node_name(p) in lost and pods.name(p) not in self.plan.force_delete_pods and (
                    pods.deleting(p) or pods.name(p) in self.plan.delete_pods):
                self.plan.force_delete_pods.append(pods.name(p))
        self.plan.delete_pods = [n for n in self.plan.delete_pods if n not in self.plan.force_delete_pods]
        if self.observed.late_nodes:
            self.requeue(5)

    def report_pods_ready(self) -> None:
        """Kueue's waitForPodsReady: PodsReady on the Workload once the whole gang runs and is ready."""
        wl = self.observed.workload
        if wl is None or self.plan.workload_status_patch is not None or kueue.admission(wl) is None:
            return
        size = self.ctx.builder.gang_size()
        cur = [p for p in self.current if not pods.deleting(p)]
        ready = (self.status.phase == "Running" and len(cur) == size
                 and all(pods.phase(p) == "Succeeded" or pods.ready(p) for p in cur))
        self.plan.workload_status_patch = kueue.pods_ready_patch(wl, ready, self.status.restarts > 0, self.now)

    def terminal_cleanup(self) -> None:
        for p in self.observed.pods:  # a failed gang's survivors must not hold GPUs
            if not pods.deleting(p) and pods.phase(p) not in TERMINAL and pods.name(p) not in self.plan.delete_pods:
                self.plan.delete_pods.append(pods.name(p))

    def terminal(self) -> None:
        self.terminal_cleanup()
        wl = self.observed.workload
        if wl is not None and not kueue.is_finished(wl):
            self.plan.workload_status_patch = kueue.finished_patch(
                wl, self.status.phase == "Succeeded", self.status.message or "", self.now)
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        done = parse_time(self.status.completion_time)
        if ttl is not None and done is not None:
            left = (done + timedelta(seconds=ttl) - self.now).total_seconds()
            if left <= 0:
                self.plan.delete_job = True
                self.event("Normal", "TTLExpired", f"deleted {ttl}s after it finished (ttlSecondsAfterFinished)")
            else:
                self.requeue(left)

    def suspend(self) -> None:
        s = self.status
        if self.current:
            self.delete_all_pods()
            s.attempt += 1  # a user's suspension is no preemption: no counter moves
            s.gang_created_at = None
        elif self.stale:
            self.delete_all_pods()
        remaining = self.observed.pods
        s.phase = "Suspended"
        s.backoff_until = None
        s.message = (f"stopping {len(remaining)} pods (each writes a checkpoint first)" if remaining
                     else "suspended; set spec.runPolicy.suspend=false to resume from the last checkpoint")
        if self.backend == "kueue":
            wl = self.ensure_workload(active=False)
            # Deactivated, Kueue evicts it; once the pods are gone the quota goes back to the queue.
            if wl is not None and not remaining and kueue.holds_quota(wl):
                self.plan.workload_status_patch = kueue.release_quota_patch(wl, "the job is suspended", self.now)

    def ensure_workload(self, active: bool) -> dict[str, Any] | None:
        priority = self.ctx.priority
        if priority is None and self.spec.scheduling.priority is not None:
            priority = kueue.WorkloadPriority(self.spec.scheduling.priority)
        desired = kueue.desired_workload(
            self.obj, self.ctx.workload_version, self.queue or "",
            self.ctx.builder.pod_sets(self.status.attempt), priority, active)
        self.plan.workload = desired
        return self.observed.workload

    def kueue_admitted(self) -> bool:
        """Kueue gate: True when the gang may run now; otherwise the plan says what to do meanwhile."""
        s = self.status
        if self.ctx.priority_error:
            s.phase, s.message = "Pending", self.ctx.priority_error
            self.requeue(30)
            return False
        wl = self.ensure_workload(active=True)
        if wl is None:
            s.phase, s.message = "Queued", f"created Kueue Workload; waiting in queue {self.queue}"
            return False
        evicted = kueue.eviction(wl)
        if evicted:
            if self.current:
                self.teardown("Evicted", f"Kueue evicted the workload ({evicted})", failure=False)
            elif not self.observed.pods and kueue.holds_quota(wl):
                self.plan.workload_status_patch = kueue.release_quota_patch(wl, evicted, self.now)
            elif self.observed.pods:
                self.delete_all_pods()
            s.phase, s.message = "Queued", f"evicted by Kueue ({evicted}); waiting to be admitted again"
            s.backoff_until = None
            return False
        if kueue.admission(wl) is None:
            if self.current:
                self.teardown("AdmissionWithdrawn", "Kueue withdrew the admission", failure=False)
            s.phase, s.message = "Queued", f"waiting for Kueue to admit the workload (queue {self.queue})"
            s.backoff_until = None
            return False
        return True

    def placement(self) -> dict[str, dict[str, Any]]:
        adm = kueue.admission(self.observed.workload) if self.backend == "kueue" else None
        if adm is None:
            return {}
        return {ps: kueue.pod_placement(adm, ps, self.observed.flavors,
                                        kueue.pod_set_updates(self.observed.workload, ps)) for ps in adm.flavors}

    def gang(self) -> None:
        s = self.status
        if self.observed.foreign:  # their names are ours: wait until they are gone, never adopt them
            s.phase = s.phase or "Pending"
            s.message = (f"waiting for {len(self.observed.foreign)} pods of a previous object named "
                         f"{self.obj['metadata']['name']} to terminate")
            self.requeue(2)
            return
        if self.stale:
            self.delete_all_pods_of(self.stale)
            s.phase = "Restarting"
            s.message = s.message or "waiting for the previous gang's pods to terminate"
            self.requeue(2)
            return
        if not self.current:
            until = parse_time(s.backoff_until)
            if until and until > self.now:
                s.phase = "Restarting"
                self.requeue((until - self.now).total_seconds())
                return
            return self.create_gang()
        return self.watch_gang()

    def delete_all_pods_of(self, group: list[dict[str, Any]]) -> None:
        for p in group:
            if not pods.deleting(p) and pods.name(p) not in self.plan.delete_pods:
                self.plan.delete_pods.append(pods.name(p))

    def create_gang(self) -> None:
        s = self.status
        b = self.ctx.builder
        self.plan.create.extend(b.support_children(self.backend))
        self.plan.create.extend(b.pods(s.attempt, self.placement(), self.backend))
        s.gang_created_at = rfc3339(self.now)
        s.backoff_until = None
        s.phase = "Starting"
        s.message = f"created gang of {b.gang_size()} pods (attempt {s.attempt})"
        self.event("Normal", "GangCreated", s.message)
        if self.backend in ("builtin", "coscheduling"):
            self.requeue(self.spec.scheduling.schedule_timeout_seconds + 1)

    def watch_gang(self) -> None:
        s = self.status
        size = self.ctx.builder.gang_size()
        cur = self.current
        if s.gang_created_at is None:  # pods exist but the write that recorded them was lost
            s.gang_created_at = rfc3339(self.now)
        for p in sorted(cur, key=pods.index):
            if pods.phase(p) == "Failed" and pods.exit_code(p) == contract.EXIT_INVALID_SPEC:
                report = pods.final_report(p) or {}
                msg = str(report.get("message") or pods.termination_message(p) or "the runtime rejected the spec")
                reason = str(report.get("reason") or "InvalidSpec")
                return self.finish(False, reason, f"{pods.name(p)}: {msg}")
        for p in sorted(cur, key=pods.index):
            node = pods.node_name(p)
            if node in self.observed.lost_nodes:
                return self.teardown("NodeLost", f"node {node} was lost ({self.observed.lost_nodes[node]}) with "
                                     f"pod {pods.name(p)}", failure=False)
        for p in sorted(cur, key=pods.index):
            why = pods.disrupted(p)
            if why:
                return self.teardown("Preempted", f"pod {pods.name(p)} was taken away ({why})", failure=False)
        # a failed pod is a failure even while it is being deleted: the operator may have deleted the gang
        # and died before writing the status that counted the restart
        failed = [p for p in sorted(cur, key=pods.index) if pods.phase(p) == "Failed"]
        if failed and all(pods.peer_lost(p) for p in failed) and self.hold_for_cause(cur, failed):
            return None
        if failed:
            p = failed[0]
            detail = f"pod {pods.name(p)} failed with exit code {pods.exit_code(p)}"
            msg = pods.termination_message(p)
            if msg and not msg.startswith("{"):
                detail += f": {msg[-300:]}"
            return self.fail_or_restart("PodFailed", detail)
        for p in sorted(cur, key=pods.index):
            if pods.deleting(p):
                return self.teardown("Preempted", f"pod {pods.name(p)} was taken away (deleted)", failure=False)
        if len(cur) < size:
            present = {pods.index(p) for p in cur}
            missing = [i for i in range(size) if i not in present]
            if self.old.phase != "Running":
                # never all up: a create that failed half-way (quota, a restarted operator); complete the
                # gang instead of tearing down what exists and creating it again, forever
                return self.complete_gang(missing)
            return self.teardown("PodMissing", f"gang pods {missing} disappeared", failure=False)
        if all(pods.phase(p) == "Succeeded" for p in cur):
            return self.succeed()
        all_running = all(pods.phase(p) in ("Running", "Succeeded") for p in cur)
        created = parse_time(s.gang_created_at)
        if not all_running:
            s.phase = "Starting"
            running = sum(pods.phase(p) == "Running" for p in cur)
            s.message = f"{running}/{size} pods running"
            timeout = self.spec.scheduling.schedule_timeout_seconds
            if self.backend in ("builtin", "coscheduling") and gang.builtin_timed_out(False, created, timeout, self.now):
                return self.teardown(
                    "GangScheduleTimeout",
                    f"only {running}/{size} pods were running after scheduleTimeoutSeconds ({timeout}s); "
                    "released the partial gang", failure=False)
            return None
        s.phase = "Running"
        s.message = f"{size}/{size} pods running (attempt {s.attempt})"
        s.start_time = s.start_time or rfc3339(self.now)
        return self.check_progress_deadline(created)

    def hold_for_cause(self, cur: list[dict[str, Any]], failed: list[dict[str, Any]]) -> bool:
        """The failed pods only lost a peer while other pods still look alive: the cause may be a node that
        died (not counted against maxRestarts) and is not declared lost yet. Wait for it, PEER_LOST_HOLD_S at
        most; True while waiting."""
        alive = [p for p in cur if pods.phase(p) not in TERMINAL and not pods.deleting(p)]
        if not alive:
            return False
        first = min((t for p in failed if (t := pods.finished_at(p)) is not None), default=self.now)
        left = (first + timedelta(seconds=PEER_LOST_HOLD_S) - self.now).total_seconds()
        if left <= 0:
            return False
        self.status.message = (f"pod {pods.name(failed[0])} lost its connection to another rank; waiting up to "
                               f"{int(left)}s to learn whether a node was lost before counting a failure")
        self.requeue(min(left, 5))
        return True

    def complete_gang(self, missing: list[int]) -> None:
        b = self.ctx.builder
        self.plan.create.extend(b.support_children(self.backend))
        self.plan.create.extend(m for m in b.pods(self.status.attempt, self.placement(), self.backend)
                                if pods.index(m) in missing)
        self.status.phase = "Starting"
        self.status.message = f"creating the missing gang pods {missing} (attempt {self.status.attempt})"
        self.requeue(5)

    def check_progress_deadline(self, gang_created: datetime | None) -> None:
        deadline = self.spec.run_policy.progress_deadline_seconds
        if not deadline:
            return None
        report = self.rank0_report() or {}
        reported = parse_time(report.get("time")) if isinstance(report.get("time"), str) else None
        beat = None
        if report.get("step") is None:  # a script that reports no steps: its launcher's heartbeat is all we have
            rank0 = next((p for p in self.current if pods.index(p) == 0), None)
            beat = pods.heartbeat(rank0) if rank0 else None
        last = max((t for t in (reported, beat, gang_created) if t is not None), default=self.now)
        if self.now - last > timedelta(seconds=deadline):
            return self.fail_or_restart(
                "ProgressDeadlineExceeded", f"no progress reported for {deadline}s (progressDeadlineSeconds)")
        self.requeue((last + timedelta(seconds=deadline) - self.now).total_seconds() + 1)
        return None

    def fail_or_restart(self, reason: str, detail: str) -> None:
        budget = self.spec.run_policy.max_restarts
        if self.status.restarts >= budget:
            return self.finish(False, "BackoffLimitExceeded", f"{detail}; maxRestarts ({budget}) exhausted")
        return self.teardown(reason, detail, failure=True)

    def succeed(self) -> None:
        rank0 = next((p for p in self.current if pods.index(p) == 0), None)
        report = pods.final_report(rank0) if rank0 else None
        if report and report.get("outputUri"):
            self.status.output = Output(uri=report["outputUri"])
            merge_progress(self.status, {**(self.rank0_report() or {}), **report})
        self.finish(True, "Succeeded", f"training finished; model at {self.status.output.uri}" if self.status.output
                    else "training finished")
        if self.status.progress and self.status.progress.total_steps:
            self.status.progress.percent = 100
            self.status.progress.eta = None

    def rank0_report(self) -> dict[str, Any] | None:
        rank0 = next((p for p in self.current if pods.index(p) == 0), None)
        return pods.progress_report(rank0) if rank0 else None

    def progress(self) -> None:
        if self.status.phase not in TERMINAL or self.old.phase not in TERMINAL:
            merge_progress(self.status, self.rank0_report())
            if self.status.phase == "Succeeded" and self.status.progress:
                self.status.progress.percent = 100 if self.status.progress.total_steps else None
                self.status.progress.eta = None

    def conditions(self) -> None:
        s, now, gen = self.status, self.now, self.gen
        conds = s.conditions
        phase = s.phase or "Pending"
        msg = s.message or phase
        if self.backend == "kueue":
            admitted = kueue.admission(self.observed.workload) is not None
            set_condition(conds, st.ADMITTED, admitted, "Admitted" if admitted else "Pending",
                          "admitted by Kueue" if admitted else msg, gen, now)
        else:
            scheduled = phase in ("Running", "Succeeded")
            if phase not in ("Failed",):
                set_condition(conds, st.ADMITTED, scheduled, "GangScheduled" if scheduled else "GangPending",
                              "the whole gang is running" if scheduled else msg, gen, now)
        set_condition(conds, st.RUNNING, phase == "Running", phase, msg, gen, now)
        set_condition(conds, st.SUSPENDED, phase == "Suspended", "Suspended" if phase == "Suspended" else "NotSuspended",
                      msg if phase == "Suspended" else "", gen, now)
        if phase == "Succeeded":
            set_condition(conds, st.SUCCEEDED, True, "Succeeded", msg, gen, now)
        if phase == "Failed" and self.failure_reason:
            set_condition(conds, st.FAILED, True, self.failure_reason, msg, gen, now)
        reason = phase
        if phase == "Pending" and self.waiting_reason:
            reason = self.waiting_reason
        elif phase == "Failed":  # the cause, on this and every later reconcile
            failed = find(conds, st.FAILED)
            reason = self.failure_reason or (failed.reason if failed is not None else phase)
        set_kstatus(
            conds,
            ready=phase == "Succeeded",
            # a running job is where its spec says it should be: converged (kstatus Current), so a Flux
            # `wait` or an Argo CD sync finishes instead of blocking for the whole run
            reconciling=phase in ("Pending", "Queued", "Starting", "Restarting"),
            stalled=phase == "Failed",
            reason=reason,
            message=msg,
            generation=gen,
            now=now,
        )


def plan(ctx: JobContext, observed: Observed, now: datetime) -> Plan:
    """What to do next for one training job; pure."""
    return _Planner(ctx, observed, now).run()
