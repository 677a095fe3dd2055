"""The operator at scale: N PretrainJobs x 4 pods applied at once on the dev cluster.

Prints, for each N (default 50, 200, 500):
- apply -> all of a job's gang pods created: p50 / p99 / max;
- gang-pod creation throughput through the operator (pods/s), and as a ratio to raw client pod creation
  (the same number of pods created directly with the kubernetes client, 8 threads, in the same run);
- API requests the operator made per job (the API server's own apiserver_request_total, minus the
  benchmark's own requests, with the scheduler stopped so nothing else touches the pods);
- status writes per second while the jobs settle (each reconcile that changes something writes one);
- the operator's resident memory (VmRSS) once every pod exists.

Pods stay Pending (the scheduler is stopped): the figure is the operator's cost, not the node agent's.

    python bench/bench_operator_scale.py [--jobs 50,200,500] [--threads 8]
"""

from __future__ import annotations

import argparse
import re
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from kubeforge.devcluster import testing  # noqa: E402
from kubeforge.devcluster.cluster import DevCluster  # noqa: E402

PODS_PER_JOB = 4


def apiserver_requests(dc: DevCluster) -> dict[tuple[str, str, str], float]:
    """apiserver_request_total summed by (verb, resource, subresource)."""
    ctx = ssl.create_default_context(cafile=str(dc.pki / "ca.crt"))
    ctx.load_cert_chain(str(dc.pki / "admin.crt"), str(dc.pki / "admin.key"))
    text = urllib.request.urlopen(dc.apiserver_url + "/metrics", context=ctx, timeout=30).read().decode()
    out: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def rss_mib(pid: int) -> float:
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]


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


def raw_pod_rate(cluster: testing.ClusterHandle, n: int, threads: int) -> float:
    from kubernetes import client

    ns = cluster.create_namespace("raw")
    core = client.CoreV1Api(cluster.api_client())
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "x", "command": ["true"]}]}}

    def create(i: int) -> None:
        core.create_namespaced_pod(ns, {**pod, "metadata": {"name": f"raw-{i}"}})

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(create, range(n)))
    rate = n / (time.monotonic() - t0)
    cluster.delete_namespace(ns)
    return rate


def one_size(cluster: testing.ClusterHandle, dc: DevCluster, n: int, threads: int, raw_rate: float,
             op_pid: int) -> dict[str, float]:
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

    def create(i: int) -> None:
        name = f"j{i:04d}"
        created_at[name] = time.monotonic()
        co.create_namespaced_custom_object("kubeforge.dev", "v1alpha1", ns, "pretrainjobs", job(ns, name))

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(create, range(n)))
    applied = time.monotonic() - t0
    if not stop.wait(1800):
        raise TimeoutError(f"{len(complete_at)}/{n} gangs complete after 30 min")
    t_all = time.monotonic() - t0
    rss = rss_mib(op_pid)
    # let the jobs settle (status written for every job), then count the requests
    settle0 = time.monotonic()
    status_writes0 = apiserver_requests(dc)
    time.sleep(10)
    after = apiserver_requests(dc)
    writes_per_s = sum(v - status_writes0.get(k, 0) for k, v in after.items()
                       if k[1] == "pretrainjobs" and k[2] == "status" and k[0] in ("PATCH", "UPDATE")) / (
        time.monotonic() - settle0)
    delta = sum(v - before.get(k, 0) for k, v in after.items() if k[0] != "WATCH")
    own = n + 8  # the benchmark's creates and its metric scrapes / list
    lat = sorted(complete_at[j] - created_at[j] for j in complete_at)
    pods_rate = n * PODS_PER_JOB / t_all
    cluster.delete_namespace(ns)
    return {
        "jobs": n, "apply_s": applied, "all_pods_s": t_all,
        "p50_s": statistics.median(lat), "p99_s": lat[max(0, int(len(lat) * 0.99) - 1)], "max_s": lat[-1],
        "pods_per_s": pods_rate, "ratio_to_raw": pods_rate / raw_rate,
        "api_requests_per_job": (delta - own) / n, "status_writes_per_s_settled": writes_per_s,
        "operator_rss_mib": rss,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="50,200,500")
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args()
    sizes = [int(x) for x in a.jobs.split(",")]
    with tempfile.TemporaryDirectory(prefix="kf-scale-") as tmp:
        dc = DevCluster(Path(tmp) / "dc")
        dc.up(nodes=1, gpus_per_node=0)
        try:
            dc.stop_process("kube-scheduler")  # pods stay Pending: nothing but the operator works on them
            cluster = testing.from_devcluster(dc)
            raw = raw_pod_rate(cluster, max(sizes) * PODS_PER_JOB, a.threads)
            print(f"raw client pod creation ({a.threads} threads): {raw:.0f} pods/s", flush=True)
            op = cluster.start_operator(env={"KUBEFORGE_WEBHOOK": "false"})
            time.sleep(3)
            op_pid = int(dc.state["components"]["operator"]["pid"])
            print(f"operator idle RSS: {rss_mib(op_pid):.0f} MiB", flush=True)
            print(f"{'jobs':>5} {'pods':>5} {'apply s':>8} {'all pods s':>10} {'p50 s':>7} {'p99 s':>7} "
                  f"{'pods/s':>7} {'vs raw':>6} {'API/job':>8} {'writes/s':>8} {'RSS MiB':>8}")
            for n in sizes:
                r = one_size(cluster, dc, n, a.threads, raw, op_pid)
                print(f"{n:>5} {n * PODS_PER_JOB:>5} {r['apply_s']:>8.1f} {r['all_pods_s']:>10.1f} "
                      f"{r['p50_s']:>7.1f} {r['p99_s']:>7.1f} {r['pods_per_s']:>7.1f} {r['ratio_to_raw']:>6.0%} "
                      f"{r['api_requests_per_job']:>8.1f} {r['status_writes_per_s_settled']:>8.1f} "
                      f"{r['operator_rss_mib']:>8.0f}", flush=True)
            op.stop()
        finally:
            dc.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
