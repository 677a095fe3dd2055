"""Time from a worker's death to training resumed, through the whole operator path on the dev cluster.

bench_pretrain.py measures the runtime alone (torchrun restarting in place); this one kills one worker
process of a 2-pod PretrainJob and times what a user waits for: the operator noticing the failed pod,
tearing the gang down, creating the next attempt, the pods starting, restoring the newest committed
checkpoint and reporting their first new step. The restart backoff is set to 0 s so the figure is the
mechanism's own cost; a job's `runPolicy.backoffSeconds` (default 10 s, doubled per restart) adds to it.

    python bench/bench_gang_recovery.py [--runs 2]

Uses the cluster in KUBECONFIG when it is a dev cluster (KUBEFORGE_DEVCLUSTER_DIR set), else starts one.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from kubeforge.controller.kube import RESOURCES, Kube  # noqa: E402
from kubeforge.devcluster import testing  # noqa: E402
from kubeforge.devcluster.cluster import DevCluster  # noqa: E402


def status(kube: Kube, ns: str, name: str) -> dict:
    return (kube.get(RESOURCES["PretrainJob"], ns, name) or {}).get("status") or {}


def one_run(cluster: testing.ClusterHandle, kube: Kube, ns: str, run: int) -> dict[str, float]:
    name = f"recover-{run}"
    job = copy.deepcopy(yaml.safe_load((REPO / "examples/pretrain-tiny.yaml").read_text()))
    job["metadata"].update(name=name, namespace=ns)
    job["spec"]["training"]["totalSteps"] = 100000
    job["spec"]["checkpoint"].update(uri=f"s3://kubeforge/bench/{ns}/{name}", intervalSteps=10)
    job["spec"]["runPolicy"] = {"maxRestarts": 5, "backoffSeconds": 0}
    kube.create(job)
    testing.wait_for(lambda: (status(kube, ns, name).get("lastCheckpoint") or {}).get("step", 0) >= 10, 300,
                     what="a committed checkpoint")
    pids = testing.wait_for(lambda: [p for p in testing.pod_processes(ns, f"{name}-worker-1",
                                                                       b"kubeforge.runtime.pretrain")
                                     if p not in testing.pod_processes(ns, f"{name}-worker-1",
                                                                       b"kubeforge.runtime.launch")],
                            60, what="the worker process")
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    marks: dict[str, float] = {}
    deadline = t0 + 300
    while time.monotonic() < deadline and "resumed" not in marks:
        st = status(kube, ns, name)
        now = time.monotonic() - t0
        if st.get("attempt") == 1:
            marks.setdefault("gang torn down (status attempt 1)", now)
            if st.get("phase") == "Running":
                marks.setdefault("new gang running", now)
                step = (st.get("progress") or {}).get("step")
                if step is not None and step >= 10 and st["progress"].get("updatedAt"):
                    pods = kube.list(RESOURCES["Pod"], ns, f"kubeforge.dev/job-name={name}")
                    reports = [p["metadata"].get("annotations", {}).get("kubeforge.dev/progress") for p in pods]
                    if any(reports):
                        marks["resumed"] = now
        time.sleep(0.1)
    kube.delete(RESOURCES["PretrainJob"], ns, name)
    if "resumed" not in marks:
        raise SystemExit(f"run {run}: training did not resume within 300 s: {marks}")
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    handle = testing.from_env()
    dc = None
    if handle is None or handle.dev is None:
        dc = DevCluster(Path(tempfile.mkdtemp(prefix="kf-bench-cluster-")))
        dc.up(nodes=2, gpus_per_node=0)
        handle = testing.from_devcluster(dc)
    kube = Kube(handle.api_client())
    handle.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                   "data/tiny-corpus.jsonl")
    op = handle.start_operator(env={"KUBEFORGE_RESYNC_SECONDS": "2"})
    ns = handle.create_namespace("bench")
    try:
        results = [one_run(handle, kube, ns, i) for i in range(args.runs)]
    finally:
        op.stop()
        handle.delete_namespace(ns)
        if dc is not None:
            dc.down(purge=True)
    print(f"worker SIGKILL -> training resumed, through the operator ({args.runs} runs, 2 pods, backoff 0 s)")
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"  {key:<40} median {statistics.median(values):6.2f} s   runs {[round(v, 2) for v in values]}")
    print("  (runPolicy.backoffSeconds adds its delay, 10 s by default, doubling per restart)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
