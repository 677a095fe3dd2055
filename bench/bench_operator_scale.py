"""The operator at scale: N PretrainJobs x 4 pods applied at once on the dev cluster.

Prints, for each N (default 50, 200, 500):
- apply -> all of a job's gang pods created: p50 / p99 / max;
- gang-pod creation throughput through the operator (pods/s), and as a ratio to raw client pod creation
  (the same number of pods created directly with the kubernetes client, 8 threads, in the same run);
- API requests the operator made per job, from its own kubeforge_api_requests_total (by verb and resource
  with --detail), and the API server's total request rate while the gangs were created (the operator's, the
  controller-manager's answers to the new objects, the benchmark's own);
- reconciles per second while the gangs were created, from kubeforge_reconcile_total;
- status writes per second once the jobs settled (the operator's queue idle for 3 s, then a 20 s window;
  nothing changes on a Pending pod, so a no-op reconcile must write nothing);
- the operator's resident memory (VmRSS) once every pod exists, and again once the jobs settled (every pod
  still there; the operator gives freed memory back every KUBEFORGE_MEMORY_TRIM_SECONDS);
- CPU (cores busy) of the API server, etcd, controller-manager and operator during each phase: on a small
  machine this shows which one is the ceiling.

Pods stay Pending (the scheduler is stopped): the figure is the operator's cost, not the node agent's.
Each size runs in a namespace of its own, and the previous one is deleted completely before the next starts.

    python bench/bench_operator_scale.py [--jobs 50,200,500] [--threads 8] [--detail] [--profile out.txt]

--profile samples the operator with py-spy (`pip install py-spy`) for the whole run and writes collapsed
stacks (flamegraph.pl / speedscope read them).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from kubeforge.devcluster import testing  # noqa: E402
from kubeforge.devcluster.cluster import DevCluster  # noqa: E402

PODS_PER_JOB = 4
COMPONENTS = ("kube-apiserver", "etcd", "kube-controller-manager", "operator")

Counts = dict[tuple[str, ...], float]


def prometheus(text: str, metric: str, keys: tuple[str, ...]) -> Counts:
    """`metric`'s samples summed by the label values `keys`."""
    out: Counts = {}
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        key = tuple(labels.get(k, "") for k in keys)
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def apiserver_requests(dc: DevCluster) -> Counts:
    """apiserver_request_total summed by (verb, resource, subresource)."""
    ctx = ssl.create_default_context(cafile=str(dc.pki / "ca.crt"))
    ctx.load_cert_chain(str(dc.pki / "admin.crt"), str(dc.pki / "admin.key"))
    text = urllib.request.urlopen(dc.apiserver_url + "/metrics", context=ctx, timeout=30).read().decode()
    return prometheus(text, "apiserver_request_total", ("verb", "resource", "subresource"))


def operator_metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


def total(counts: Counts, before: Counts, keep: Callable[[tuple[str, ...]], bool] = lambda k: True) -> float:
    return sum(v - before.get(k, 0.0) for k, v in counts.items() if keep(k))


def rss_mib(pid: int) -> float:
    total_kib = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024


def children(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Cores each dev-cluster component kept busy between start() and read()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {n: cpu_seconds(p) for n, p in self.pids.items()}

    def read(self) -> dict[str, float]:
        dt = max(1e-6, time.monotonic() - self.t0)
        return {n: (cpu_seconds(p) - self.c0[n]) / dt for n, p in self.pids.items()}


def cpu_line(cores: dict[str, float]) -> str:
    short = {"kube-apiserver": "apiserver", "kube-controller-manager": "controller-manager"}
    return ", ".join(f"{short.get(n, n)} {c:.2f}" for n, c in cores.items()) + f" (of {os.cpu_count()} cores)"


def job(ns: str, name: str) -> dict:
    return {
        "apiVersion": "kubeforge.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"config": {"model_type": "llama", "vocab_size": 259, "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "max_position_embeddings": 512},
                      "tokenizer": {"builtin": "byte"}},
            "data": {"uri": "s3://kubeforge/data/none.jsonl"},
            "training": {"totalSteps": 10, "seqLen": 64, "globalBatchSize": 8, "microBatchSize": 2},
            "checkpoint": {"uri": f"s3://kubeforge/bench/{ns}/{name}", "secretRef": {"name": "kubeforge-s3"}},
            "resources": {"numNodes": PODS_PER_JOB, "processesPerNode": 1},
            "scheduling": {"scheduleTimeoutSeconds": 3600},
        },
    }


def delete_namespace_and_wait(cluster: testing.ClusterHandle, ns: str, timeout: float = 600) -> None:
    """Delete and wait until it is gone, so its clean-up does not load the next measurement."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    cluster.delete_namespace(ns)
    core = client.CoreV1Api(cluster.api_client())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(ns)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1)
    raise TimeoutError(f"namespace {ns} still there after {timeout}s")


def raw_pod_rate(cluster: testing.ClusterHandle, dc: DevCluster, n: int, threads: int,
                 cpu: CpuMeter) -> tuple[float, float]:
    """(pods/s, API server requests/s) creating n bare pods straight from the client."""
    from kubernetes import client

    ns = cluster.create_namespace("raw")
    core = client.CoreV1Api(cluster.api_client())
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "x", "command": ["true"]}]}}

    def create(i: int) -> None:
        core.create_namespaced_pod(ns, {**pod, "metadata": {"name": f"raw-{i}"}})

    before = apiserver_requests(dc)
    cpu.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(create, range(n)))
    dt = time.monotonic() - t0
    cores = cpu.read()
    served = total(apiserver_requests(dc), before, lambda k: k[0] != "WATCH")
    print(f"raw phase CPU: {cpu_line(cores)}", flush=True)
    delete_namespace_and_wait(cluster, ns)
    return n / dt, served / dt


def reconciles(port: int) -> float:
    return sum(prometheus(operator_metrics(port), "kubeforge_reconcile_total", ("kind",)).values())


def wait_idle(port: int, quiet_s: float = 3.0, timeout: float = 180.0) -> float:
    """Wait until the operator ran no reconcile for quiet_s (its queue drained); seconds waited."""
    t0 = time.monotonic()
    last, last_change = reconciles(port), time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = reconciles(port)
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
    return time.monotonic() - t0


def one_size(cluster: testing.ClusterHandle, dc: DevCluster, n: int, threads: int, raw_rate: tuple[float, float],
             op_pid: int, metrics_port: int, cpu: CpuMeter, detail: bool) -> dict[str, float]:
    from kubernetes import client, watch

    ns = cluster.create_namespace("scale")
    co = client.CustomObjectsApi(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    created_at: dict[str, float] = {}
    pods_seen: dict[str, set[str]] = {}
    complete_at: dict[str, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def watch_pods() -> None:
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_pod, ns, label_selector="kubeforge.dev/job-name",
                           timeout_seconds=1800):
            if ev["type"] != "ADDED":
                continue
            meta = ev["object"].metadata
            jname = meta.labels["kubeforge.dev/job-name"]
            with lock:
                pods_seen.setdefault(jname, set()).add(meta.name)
                if len(pods_seen[jname]) == PODS_PER_JOB and jname not in complete_at:
                    complete_at[jname] = time.monotonic()
                    if len(complete_at) == n:
                        stop.set()
            if stop.is_set():
                w.stop()
                return

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    time.sleep(1.0)  # the watch is established before the first create
    before = apiserver_requests(dc)
    op_before = operator_metrics(metrics_port)
    reconciles_before = reconciles(metrics_port)

    def create(i: int) -> None:
        name = f"j{i:04d}"
        created_at[name] = time.monotonic()
        co.create_namespaced_custom_object("kubeforge.dev", "v1alpha1", ns, "pretrainjobs", job(ns, name))

    cpu.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(create, range(n)))
    applied = time.monotonic() - t0
    if not stop.wait(1800):
        raise TimeoutError(f"{len(complete_at)}/{n} gangs complete after 30 min")
    t_all = time.monotonic() - t0
    cores = cpu.read()
    served_rate = total(apiserver_requests(dc), before, lambda k: k[0] != "WATCH") / t_all
    reconcile_rate = (reconciles(metrics_port) - reconciles_before) / t_all
    rss = rss_mib(op_pid)
    # settled: the queue drained (the second reconcile of every job done), then count status writes
    waited = wait_idle(metrics_port)
    settle0 = time.monotonic()
    status_writes0 = apiserver_requests(dc)
    reconciles_settled0 = reconciles(metrics_port)
    time.sleep(20)
    writes_per_s = total(apiserver_requests(dc), status_writes0,
                         lambda k: k[1] == "pretrainjobs" and k[2] == "status" and k[0] in ("PATCH", "UPDATE")
                         ) / (time.monotonic() - settle0)
    settled_reconciles = reconciles(metrics_port) - reconciles_settled0
    rss_settled = rss_mib(op_pid)
    op_after = operator_metrics(metrics_port)
    by_call = prometheus(op_after, "kubeforge_api_requests_total", ("verb", "resource"))
    by_call_before = prometheus(op_before, "kubeforge_api_requests_total", ("verb", "resource"))
    calls = {k: v - by_call_before.get(k, 0.0) for k, v in by_call.items() if v - by_call_before.get(k, 0.0) > 0}
    lat = sorted(complete_at[j] - created_at[j] for j in complete_at)
    pods_rate = n * PODS_PER_JOB / t_all
    print(f"  {n} jobs: CPU while creating: {cpu_line(cores)}; API server {served_rate:.0f} requests/s "
          f"(raw phase {raw_rate[1]:.0f}); idle {waited:.0f}s after; {settled_reconciles:.0f} reconciles in "
          "the 20 s window", flush=True)
    if detail:
        print("  operator API requests per job: " + ", ".join(
            f"{verb} {res} {count / n:.2f}" for (verb, res), count in sorted(calls.items(), key=lambda kv: -kv[1])),
            flush=True)
    delete_namespace_and_wait(cluster, ns)
    return {
        "jobs": n, "apply_s": applied, "all_pods_s": t_all,
        "p50_s": statistics.median(lat), "p99_s": lat[max(0, int(len(lat) * 0.99) - 1)], "max_s": lat[-1],
        "pods_per_s": pods_rate, "ratio_to_raw": pods_rate / raw_rate[0],
        "api_requests_per_job": sum(calls.values()) / n, "reconciles_per_s": reconcile_rate,
        "status_writes_per_s_settled": writes_per_s, "operator_rss_mib": rss,
        "operator_rss_settled_mib": rss_settled,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="50,200,500")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--detail", action="store_true", help="the operator's API requests per job by verb/resource")
    ap.add_argument("--profile", help="write py-spy's collapsed stacks of the operator to this file")
    a = ap.parse_args()
    sizes = [int(x) for x in a.jobs.split(",")]
    with tempfile.TemporaryDirectory(prefix="kf-scale-") as tmp:
        dc = DevCluster(Path(tmp) / "dc")
        dc.up(nodes=1, gpus_per_node=0)
        spy = None
        try:
            dc.stop_process("kube-scheduler")  # pods stay Pending: nothing but the operator works on them
            cluster = testing.from_devcluster(dc)
            pids = {c: int(dc.state["components"][c]["pid"]) for c in COMPONENTS[:3]}
            cpu = CpuMeter(pids)
            raw = raw_pod_rate(cluster, dc, max(sizes) * PODS_PER_JOB, a.threads, cpu)
            print(f"raw client pod creation ({a.threads} threads): {raw[0]:.0f} pods/s, "
                  f"API server {raw[1]:.0f} requests/s", flush=True)
            metrics_port = free_port()
            op = cluster.start_operator(env={"KUBEFORGE_WEBHOOK": "false",
                                             "KUBEFORGE_METRICS_PORT": str(metrics_port)})
            time.sleep(3)
            op_pid = int(dc.state["components"]["operator"]["pid"])
            cpu = CpuMeter({**pids, "operator": op_pid})
            print(f"operator idle RSS: {rss_mib(op_pid):.0f} MiB", flush=True)
            if a.profile:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(op_pid),
                                        "--format", "raw", "--output", a.profile, "--rate", "50", "--threads",
                                        "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [one_size(cluster, dc, n, a.threads, raw, op_pid, metrics_port, cpu, a.detail) for n in sizes]
            print(f"{'jobs':>5} {'pods':>5} {'apply s':>8} {'all pods s':>10} {'p50 s':>7} {'p99 s':>7} "
                  f"{'pods/s':>7} {'vs raw':>6} {'API/job':>8} {'rec/s':>6} {'writes/s':>8} {'RSS MiB':>8} {'settled':>8}")
            for r in rows:
                n = int(r["jobs"])
                print(f"{n:>5} {n * PODS_PER_JOB:>5} {r['apply_s']:>8.1f} {r['all_pods_s']:>10.1f} "
                      f"{r['p50_s']:>7.1f} {r['p99_s']:>7.1f} {r['pods_per_s']:>7.1f} {r['ratio_to_raw']:>6.0%} "
                      f"{r['api_requests_per_job']:>8.1f} {r['reconciles_per_s']:>6.1f} "
                      f"{r['status_writes_per_s_settled']:>8.2f} {r['operator_rss_mib']:>8.0f} "
                  f"{r['operator_rss_settled_mib']:>8.0f}", flush=True)
            op.stop()
        finally:
            if spy is not None and spy.poll() is None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            dc.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
