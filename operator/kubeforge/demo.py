"""`make demo`: the life of a tiny model on CPU — pre-train it, then serve it — on a real control plane.

Without KUBECONFIG it brings up the dev cluster (real kube-apiserver, etcd, scheduler, controller-manager,
pods as local processes, an S3 server) with the operator and its admission webhook. With KUBECONFIG set it
uses that cluster and expects the operator installed there and AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY pointing at the store the cluster's `kubeforge-s3` Secret names.

It applies examples/pretrain-tiny.yaml, follows it to the end printing progress, then applies
examples/serve-pretrain-tiny.yaml (an InferenceDeployment whose model is `from` that PretrainJob), waits
until it is Ready and, on the dev cluster, sends it a completion. Nothing is faked: every figure printed is
read from the objects' status.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "default"
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster() -> Any:
    """The handle on the cluster the demo runs against (the dev cluster when KUBECONFIG is unset)."""
    from kubeforge.devcluster import testing
    from kubeforge.devcluster.cluster import DevCluster, default_state_dir

    if os.environ.get("KUBECONFIG"):
        handle = testing.from_env()
        _say(f"using the cluster in KUBECONFIG ({handle.kubeconfig}); the operator must be installed there")
        return handle
    dc = DevCluster(default_state_dir())
    _say(f"starting the dev cluster in {dc.dir} (first run builds Kubernetes: ~10 min)")
    webhook_env = ["env", "KUBEFORGE_WEBHOOK=true", "KUBEFORGE_WEBHOOK_HOST=127.0.0.1",
                   "KUBEFORGE_WEBHOOK_LISTEN=127.0.0.1", f"KUBEFORGE_WEBHOOK_PORT={_free_port()}"]
    dc.up(nodes=2, gpus_per_node=2, with_operator=True,
          operator_argv=[*webhook_env, sys.executable, "-m", "kubeforge", "operator"])
    for key, value in dc.env_exports().items():
        os.environ[key] = value
    _say("dev cluster up; to use it from your shell: eval \"$(kubeforge dev-cluster env)\"")
    return testing.from_devcluster(dc)


def _apply_fresh(kube: Any, obj: dict[str, Any]) -> None:
    """Create the object, replacing a previous demo run's copy."""
    from kubeforge.controller.kube import RESOURCES

    res = RESOURCES[obj["kind"]]
    name = obj["metadata"]["name"]
    if kube.get(res, NAMESPACE, name) is not None:
        kube.delete(res, NAMESPACE, name)
        deadline = time.monotonic() + 60
        while kube.get(res, NAMESPACE, name) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
    obj["metadata"]["namespace"] = NAMESPACE
    deadline = time.monotonic() + 60
    while True:  # the operator's webhook may still be starting
        try:
            kube.create(obj)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            _say(f"waiting for the API to accept {obj['kind']} ({str(exc).splitlines()[0][:80]})")
            time.sleep(2)


def _clear_prefix(s3: Any, uri: str) -> None:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _follow_job(kube: Any, kind: str, name: str, timeout: float = 900) -> dict[str, Any]:
    from kubeforge.controller.kube import RESOURCES

    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = (kube.get(RESOURCES[kind], NAMESPACE, name) or {}).get("status") or {}
        prog = st.get("progress") or {}
        line = (f"{kind} {name}: {st.get('phase', 'Pending'):<10} step {prog.get('step', '-')}/"
                f"{prog.get('totalSteps', '-')} ({prog.get('percent', 0) or 0}%) loss {prog.get('loss', '-')} "
                f"tokens/s {round(prog['tokensPerSecond']) if prog.get('tokensPerSecond') else '-'} "
                f"restarts {st.get('restarts', 0)}")
        if line != last:
            _say(line)
            last = line
        if st.get("phase") in ("Succeeded", "Failed"):
            return st
        time.sleep(1)
    raise SystemExit(f"{kind} {name} did not finish in {timeout}s")


def _service_address(kube: Any, service: str) -> str | None:
    """The Service's ClusterIP and port; the dev cluster's node agent proxies it on this machine."""
    from kubeforge.controller.kube import RESOURCES

    svc = kube.get(RESOURCES["Service"], NAMESPACE, service) or {}
    ip = (svc.get("spec") or {}).get("clusterIP")
    ports = (svc.get("spec") or {}).get("ports") or []
    if not ip or ip == "None" or not ports:
        return None
    return f"http://{ip}:{ports[0]['port']}"


def _serve(cluster: Any, kube: Any) -> None:
    from kubeforge.controller.kube import RESOURCES

    path = EXAMPLES / "serve-pretrain-tiny.yaml"
    obj = yaml.safe_load(path.read_text())
    name = obj["metadata"]["name"]
    _say(f"applying {path.relative_to(REPO)} (serves the PretrainJob's output)")
    _apply_fresh(kube, obj)
    deadline, last = time.monotonic() + 600, None
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = (kube.get(RESOURCES["InferenceDeployment"], NAMESPACE, name) or {}).get("status") or {}
        line = f"InferenceDeployment {name}: {st.get('phase', 'Pending')} ready pools {st.get('readyPools', '-')}"
        if line != last:
            _say(line)
            last = line
        if st.get("phase") == "Ready":
            break
        time.sleep(1)
    else:
        raise SystemExit(f"InferenceDeployment {name} was not Ready in time: {json.dumps(st)[:500]}")
    _say(f"endpoint {st.get('endpoint')} serving {st.get('resolvedModelUri')}")
    if cluster.dev is None:
        _say(f"from inside the cluster: curl {st.get('endpoint')}/completions")
        return
    import httpx

    service = (st.get("endpoint") or "").split("//", 1)[-1].split(".", 1)[0]
    base = _service_address(kube, service)
    if base is None:
        raise SystemExit(f"Service {service} has no cluster IP")
    served = obj["spec"].get("servedModelName") or name
    body = {"model": served, "prompt": "The model ", "max_tokens": 24, "temperature": 0}
    resp = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    resp.raise_for_status()
    text = resp.json()["choices"][0]["text"]
    _say(f"completion of {body['prompt']!r} through the router: {text!r}")


def main() -> int:
    from kubeforge.controller.kube import Kube

    cluster = _cluster()
    kube = Kube(cluster.api_client())
    s3 = cluster.s3_client()
    s3.upload_file(str(EXAMPLES / "data/tiny-corpus.jsonl"), "kubeforge", "data/tiny-corpus.jsonl")
    _say("uploaded examples/data/tiny-corpus.jsonl to s3://kubeforge/data/")
    job = yaml.safe_load((EXAMPLES / "pretrain-tiny.yaml").read_text())
    _clear_prefix(s3, job["spec"]["checkpoint"]["uri"])  # a fresh run, not a resume of the last demo
    _say("applying examples/pretrain-tiny.yaml")
    _apply_fresh(kube, job)
    st = _follow_job(kube, "PretrainJob", job["metadata"]["name"])
    if st["phase"] != "Succeeded":
        raise SystemExit(f"the PretrainJob failed: {st.get('message')}")
    _say(f"trained model exported to {st['output']['uri']}")
    if (EXAMPLES / "serve-pretrain-tiny.yaml").exists():
        _serve(cluster, kube)
    if cluster.dev is not None:
        _say("the dev cluster keeps running; `kubeforge dev-cluster down` stops it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
