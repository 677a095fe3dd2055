"""The fault matrix on the dev cluster (docs/reliability.md), each case with "nothing lost" assertions:

- S3 5xx bursts, stalled requests and a commit that keeps failing while checkpoints are saved (through a
  fault-injecting proxy in front of the dev cluster's S3 server, kubeforge.devcluster.faultproxy);
- S3 faults while a restarted gang restores: a store that cannot be read, then 5xx, a stalled request, a
  body cut short and a slow body;
- the API server stopped and started again while a job trains and the operator reconciles;
- a node lost (its kubelet stops: no heartbeat, its pods' processes killed) under a 2-node gang.

Worker kill, operator SIGKILL, Kueue eviction and serving pod kills under load are in test_pretrain.py,
test_pretrain_kueue.py and test_serving.py.
"""

from __future__ import annotations

import base64
import copy
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeforge.controller.conditions import parse_time
from kubeforge.devcluster.faultproxy import FaultProxy
from kubeforge.devcluster.testing import ClusterHandle
from kubeforge.storage import CheckpointStore, make_client

from .conftest import REPO, Jobs, Operator, example, kill_worker, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KIND = "PretrainJob"
FAULTY_SECRET = "kubeforge-s3-faulty"
# the runtime's S3 client in these jobs: fewer attempts per request and a short read timeout, so the faults
# below are retried (or exhausted) in seconds rather than minutes; the mechanism is the production one
S3_TUNING = [{"name": "AWS_MAX_ATTEMPTS", "value": "3"}, {"name": "KUBEFORGE_S3_READ_TIMEOUT", "value": "5"}]


@pytest.fixture(scope="module", autouse=True)
def corpus(cluster: ClusterHandle) -> str:
    cluster.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                    "data/tiny-corpus.jsonl")
    return "s3://kubeforge/data/tiny-corpus.jsonl"


@pytest.fixture(scope="module")
def proxy(cluster: ClusterHandle) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.s3_endpoint) as p:
        yield p


@pytest.fixture
def faulty(proxy: FaultProxy, cluster: ClusterHandle, namespace: str) -> Iterator[FaultProxy]:
    """The proxy, with no rules, and a Secret in the test namespace whose endpoint is the proxy."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    src = core.read_namespaced_secret("kubeforge-s3", namespace)
    data = {k: base64.b64decode(v).decode() for k, v in (src.data or {}).items()}
    data["AWS_ENDPOINT_URL"] = proxy.url
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=FAULTY_SECRET),
                                                             string_data=data))
    proxy.clear()
    try:
        yield proxy
    finally:
        proxy.clear()


def tiny(jobs: Jobs, name: str, steps: int, interval: int, keep: int = 2, **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(example("pretrain-tiny.yaml"))
    obj["metadata"]["name"] = name
    obj["spec"]["training"]["totalSteps"] = steps
    obj["spec"]["checkpoint"].update(uri=f"s3://kubeforge/checkpoints/{jobs.ns}/{name}", intervalSteps=interval,
                                     keep=keep)
    for key, value in spec.items():
        obj["spec"][key] = {**obj["spec"].get(key, {}), **value}
    return obj


def through_proxy(obj: dict[str, Any]) -> dict[str, Any]:
    obj["spec"]["checkpoint"]["secretRef"] = {"name": FAULTY_SECRET}
    obj["spec"]["resources"]["env"] = list(obj["spec"]["resources"].get("env") or []) + S3_TUNING
    return obj


def store_of(cluster: ClusterHandle, obj: dict[str, Any]) -> CheckpointStore:
    """The job's checkpoints read straight from the S3 server (not through the proxy)."""
    return CheckpointStore(obj["spec"]["checkpoint"]["uri"], client=make_client(env=cluster.s3_env))


def diagnose(jobs: Jobs, name: str) -> str:
    """What a failed wait leaves behind: the status, the pods and the events."""
    pods = [(p["metadata"]["name"], p["metadata"]["labels"].get("kubeforge.dev/attempt"), p["spec"].get("nodeName"),
             (p.get("status") or {}).get("phase"), bool(p["metadata"].get("deletionTimestamp")))
            for p in jobs.pods(name)]
    events = [(e["reason"], e["message"][:200]) for e in jobs.events(name)]
    return f"\nstatus: {jobs.status(KIND, name)}\npods: {pods}\nevents: {events}"


def ckpt_step(st: dict[str, Any]) -> int:
    return int((st.get("lastCheckpoint") or {}).get("step") or 0)


def step_path(obj: dict[str, Any], step: int | None = None, rest: str = "") -> str:
    """A regex for the objects of one step directory (any step when None) of this job, as the proxy sees
    their paths (path-style: /<bucket>/<key>)."""
    prefix = obj["spec"]["checkpoint"]["uri"].removeprefix("s3://")
    s = r"\d{8}" if step is None else f"{step:08d}"
    return f"^/{re.escape(prefix)}/step-{s}/{rest}"


def assert_export_is_the_final_checkpoint(cluster: ClusterHandle, obj: dict[str, Any], step: int,
                                          tmp: Path) -> None:
    """The exported Hugging Face model is complete and every weight equals the one in the final committed
    checkpoint (converted with torch's own dcp_to_torch_save; download() verifies every sha256)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    store = store_of(cluster, obj)
    store.download(step, tmp / "ckpt")
    dcp_to_torch_save(str(tmp / "ckpt"), str(tmp / "ckpt.pt"))
    saved = torch.load(tmp / "ckpt.pt", weights_only=False)
    trained = saved["app"]["model"] if "app" in saved else {
        k[len("app.model."):]: v for k, v in saved.items() if k.startswith("app.model.")}
    names = store.download_final(tmp / "final")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names), names
    got = AutoModelForCausalLM.from_pretrained(tmp / "final").state_dict()
    assert got and set(got) <= set(trained), sorted(set(got) - set(trained))[:5]
    for name, tensor in got.items():
        assert torch.equal(tensor, trained[name].to(tensor.dtype)), name


class StepWatch:
    """Polls a job's status in the background: the lowest progress step reported after `arm()`, so a run that
    silently started over (a report at a step below the committed checkpoint) cannot go unseen."""

    def __init__(self, jobs: Jobs, name: str) -> None:
        self.jobs, self.name = jobs, name
        self.floor: int | None = None  # the committed step when armed
        self.lowest: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def arm(self, floor: int) -> None:
        self.floor, self.lowest = floor, None
        if not self._thread.is_alive():
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                step = (self.jobs.status(KIND, self.name).get("progress") or {}).get("step")
            except Exception:  # noqa: BLE001 - the API may be briefly away; keep watching
                step = None
            if isinstance(step, int):
                self.lowest = step if self.lowest is None else min(self.lowest, step)
            self._stop.wait(0.3)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ---------------------------------------------------------------------------------------------- S3 faults


def test_s3_faults_during_save_are_retried_or_skip_that_checkpoint(operator: Operator, jobs: Jobs,
                                                                   cluster: ClusterHandle, faulty: FaultProxy,
                                                                   tmp_path: Path):
    obj = through_proxy(tiny(jobs, "savefaults", steps=60, interval=10, keep=10))
    # step 10: a 503 burst on the shard uploads (botocore retries each request)
    faulty.add("error", status=503, method="PUT", path=step_path(obj, 10, "__"), times=2)
    # step 20: the commit (manifest PUT) fails every time: the checkpoint must be skipped, never half-made
    faulty.add("error", status=500, method="PUT", path=step_path(obj, 20, "manifest.json"), times=None)
    # step 30: a shard upload gets no answer (the client times out and sends it again)
    faulty.add("stall", method="PUT", path=step_path(obj, 30, "__1_0"), seconds=30)
    # step 40: two more 503s on whatever of that step is written first
    faulty.add("error", status=503, method="PUT", path=step_path(obj, 40), times=2)
    jobs.create(obj)
    st = jobs.wait_phase(KIND, "savefaults", {"Succeeded", "Failed"}, timeout=400)
    assert st["phase"] == "Succeeded" and st["restarts"] == 0 and st["progress"]["step"] == 60, st
    assert ckpt_step(st) == 60

    # every fault happened, and was answered as designed
    assert [r.status for r in faulty.records("PUT", step_path(obj, 10, "__"))].count(503) == 2
    manifest20 = faulty.records("PUT", step_path(obj, 20, "manifest.json"))
    assert len(manifest20) >= 3 and {r.status for r in manifest20} == {500}, manifest20
    stalled = faulty.records("PUT", step_path(obj, 30, "__1_0"))
    assert [r.fault for r in stalled][:1] == ["stall"] and stalled[-1].status == 200, stalled
    assert [r.status for r in faulty.records("PUT", step_path(obj, 40))].count(503) == 2

    # step 20 was skipped (no manifest: never committed, so never loadable) and training went on; every
    # other interval is committed and its bytes match its manifest
    store = store_of(cluster, obj)
    committed = [c.step for c in store.committed_checkpoints()]
    assert committed == [10, 30, 40, 50, 60], committed
    assert store.read_manifest(20) is None
    assert "checkpoint 20 skipped" in cluster.pod_log(jobs.ns, "savefaults-worker-0")
    for step in committed:
        store.download(step, tmp_path / f"verify-{step}")  # sha256 of every file checked
    assert_export_is_the_final_checkpoint(cluster, obj, 60, tmp_path)


def test_s3_faults_during_restore_never_load_a_partial_checkpoint_nor_start_over(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle, faulty: FaultProxy, tmp_path: Path):
    obj = through_proxy(tiny(jobs, "restorefaults", steps=100, interval=10,
                             runPolicy={"maxRestarts": 4, "backoffSeconds": 2}))
    jobs.create(obj)
    st = wait(lambda: (s := jobs.status(KIND, "restorefaults")) and ckpt_step(s) >= 20 and s, 240,
              "a committed checkpoint at step >= 20")
    watch = StepWatch(jobs, "restorefaults")
    try:
        # 1) the store cannot be read at all: the restarted gang must fail (and be restarted), not train from 0
        faulty.add("error", status=503, method="GET", path=step_path(obj), times=None)
        kill_worker(jobs.ns, "restorefaults-worker-1")
        committed = ckpt_step(jobs.status(KIND, "restorefaults"))
        watch.arm(committed)
        wait(lambda: jobs.status(KIND, "restorefaults").get("restarts", 0) >= 2, 240,
             "the gang whose restore could not read the store to fail")
        failed_reads = faulty.records("GET", step_path(obj), fault="error")
        assert failed_reads, "the restore never reached the store"

        # 2) the store answers again, with transient faults on exactly what a restore reads
        mark = int(time.time())  # status times have whole seconds
        faulty.clear()
        faulty.add("error", status=503, method="GET", path=step_path(obj, None, "__"), times=3)
        faulty.add("stall", method="GET", path=step_path(obj, None, "manifest.json"), seconds=30)
        faulty.add("reset", method="GET", path=step_path(obj, None, r"\.metadata"))
        faulty.add("slow", method="GET", path=step_path(obj, None, "__0_0"), rate=256_000)
        # progress stays in the status across attempts: wait for a report the restored gang wrote
        first = wait(lambda: (lambda s: s.get("phase") == "Running" and s.get("attempt", 0) >= 2
                              and (p := s.get("progress") or {}).get("step", 0) > committed
                              and parse_time(p.get("updatedAt") or "1970-01-01T00:00:00Z").timestamp() >= mark
                              and p)(jobs.status(KIND, "restorefaults")), 300, "progress from the gang that restored")
        assert first["loss"] < 4.5, "the loss restarted from its initial value: the checkpoint was not loaded"
        met = [r for r in faulty.records(path=step_path(obj)) if r.time >= mark]
        for fault in ("error", "stall", "reset", "slow"):
            assert [r for r in met if r.fault == fault], (
                f"the restore met no {fault} fault: {[(r.method, r.path[-40:], r.status, r.fault) for r in met]}"
                + diagnose(jobs, "restorefaults"))
        st = jobs.wait_phase(KIND, "restorefaults", {"Succeeded", "Failed"}, timeout=400)
    finally:
        watch.stop()
    assert st["phase"] == "Succeeded" and st["progress"]["step"] == 100, st
    # one restart for the killed worker, one for the gang that could not read the store; none for the
    # transient faults, which were retried
    assert st["restarts"] == 2, st
    assert watch.lowest is not None and watch.lowest >= committed, (
        f"progress fell to step {watch.lowest} below the committed step {committed}: the run started over")
    store = store_of(cluster, obj)
    assert store.rejected_steps() == [], "a transient fault was taken for a corrupt checkpoint"
    assert_export_is_the_final_checkpoint(cluster, obj, 100, tmp_path)


# ------------------------------------------------------------------------------------------ API server


def test_apiserver_restart_mid_training_duplicates_no_pod_and_loses_nothing(operator: Operator, jobs: Jobs,
                                                                            cluster: ClusterHandle):
    seen: dict[str, set[str]] = {}
    most_alive = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                alive = [p for p in jobs.pods("apirestart") if not p["metadata"].get("deletionTimestamp")]
            except Exception:  # noqa: BLE001 - the API server is down for a while: keep polling
                alive = []
            most_alive[0] = max(most_alive[0], len(alive))
            for p in alive:
                seen.setdefault(p["metadata"]["name"], set()).add(p["metadata"]["uid"])
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        jobs.create(tiny(jobs, "apirestart", steps=100, interval=20))
        before = wait(lambda: (lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step", 0)
                               >= 5 and s)(jobs.status(KIND, "apirestart")), 240, "training under way")
        assert cluster.dev is not None
        cluster.dev.restart_apiserver(down_seconds=5)
        # status resumes updating: progress written after the restart
        wait(lambda: (jobs.status(KIND, "apirestart").get("progress") or {}).get("step", 0)
             > before["progress"]["step"], 180, "status updates after the API server restart")
        st = jobs.wait_phase(KIND, "apirestart", {"Succeeded", "Failed"}, timeout=400)
    finally:
        stop.set()
        watcher.join()
    assert cluster.dev is not None and any(c["component"] == "operator" and c["alive"] for c in cluster.dev.status())
    assert st["phase"] == "Succeeded" and st["restarts"] == 0 and st["attempt"] == 0, st
    assert st["progress"]["step"] == 100 and ckpt_step(st) == 100
    assert most_alive[0] == 2 and sorted(seen) == ["apirestart-worker-0", "apirestart-worker-1"]
    assert all(len(uids) == 1 for uids in seen.values()), seen


# ------------------------------------------------------------------------------------------- node loss


def node_ready(cluster: ClusterHandle, name: str) -> bool:
    from kubernetes import client

    node = client.CoreV1Api(cluster.api_client()).read_node(name)
    taints = [t.key for t in node.spec.taints or []]
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []) and not [
        t for t in taints if t.startswith("node.kubernetes.io/")]


def test_node_loss_recreates_the_gang_on_the_surviving_node_without_spending_restarts(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle):
    assert cluster.dev is not None
    # 3 CPUs each on 8-CPU nodes: the scheduler spreads the pair over both nodes, and both fit on one
    # a short grace: the survivor of a lost peer may hang in a collective that cannot finish (see reliability.md)
    obj = tiny(jobs, "nodeloss", steps=300, interval=10, runPolicy={"maxRestarts": 0, "backoffSeconds": 1,
                                                                    "terminationGracePeriodSeconds": 20})
    obj["spec"]["resources"]["requests"] = {"cpu": "3", "memory": "2Gi"}
    jobs.create(obj)
    wait(lambda: ckpt_step(jobs.status(KIND, "nodeloss")) >= 10, 240, "a committed checkpoint")
    placed = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in jobs.pods("nodeloss")}
    assert len(set(placed.values())) == 2, f"the gang is not spread over both nodes: {placed}"
    victim = placed["nodeloss-worker-1"]
    survivor = placed["nodeloss-worker-0"]
    try:
        at_loss = jobs.status(KIND, "nodeloss")
        lost = cluster.dev.stop_node(victim)
        assert f"{jobs.ns}/nodeloss-worker-1" in lost, lost
        # the node lifecycle controller declares it unreachable after --node-monitor-grace-period (50 s)
        wait(lambda: "NodeLost" in jobs.event_reasons("nodeloss"), 240, "the operator to take the node for lost")
        st = jobs.status(KIND, "nodeloss")
        assert st["restarts"] == 0 and st["preemptions"] >= 1, st
        # the next gang runs on the node that is left, resuming from the newest committed checkpoint
        try:
            pods = wait(lambda: (lambda ps: len(ps) == 2 and all(
                p["metadata"]["labels"]["kubeforge.dev/attempt"] != "0" and p["status"].get("phase") == "Running"
                for p in ps) and ps)(jobs.pods("nodeloss")), 240, "the gang running again")
        except AssertionError as e:
            raise AssertionError(str(e) + diagnose(jobs, "nodeloss")) from None
        assert {p["spec"]["nodeName"] for p in pods} == {survivor}
        committed = store_of(cluster, obj).latest_committed_checkpoint()
        assert committed is not None and committed.step >= ckpt_step(at_loss)
        log = wait(lambda: re.search(r"resumed from checkpoint step (\d+)",
                                     cluster.pod_log(jobs.ns, "nodeloss-worker-0")), 240, "the resume log line")
        resumed = int(log.group(1))
        # no committed step lost, and at most one interval (plus the upload in flight) of work
        assert resumed >= ckpt_step(at_loss) and resumed >= at_loss["progress"]["step"] - 2 * 10, (resumed, at_loss)
        st = jobs.wait_phase(KIND, "nodeloss", {"Succeeded", "Failed"}, timeout=400)
    finally:
        cluster.dev.start_node(victim)
    assert st["phase"] == "Succeeded" and st["restarts"] == 0 and st["progress"]["step"] == 300, st
    node_lost_events = [e for e in jobs.events("nodeloss") if e["reason"] == "NodeLost"]
    assert f"node {victim} was lost (node.kubernetes.io/unreachable:NoExecute" in node_lost_events[0]["message"]
    wait(lambda: node_ready(cluster, victim), 120, f"{victim} Ready and untainted again")
