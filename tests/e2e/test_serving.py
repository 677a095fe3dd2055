"""InferenceDeployment end to end on a real control plane: the operator renders Deployments, the router and
the Service; pods (local processes) fetch a tiny model from a real S3 server in an init container and
serve it with the reference engine, prefill and decode split with a real KV-cache hand-off; the router
finds them through the Kubernetes API. Checked: Ready semantics, greedy output equal to `model.generate`,
a decode pod killed under load (clean, bounded errors; the pool recovers), and autoscaling of the decode
pool alone from the router's metrics.

Bounded: about 150 requests in all, every one with a client timeout; a few minutes on 2 cores.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubeforge.controller import serving as sv
from kubeforge.controller.kube import RESOURCES, Resource
from kubeforge.devcluster.testing import ClusterHandle

from .conftest import Jobs, example, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KIND = "InferenceDeployment"
NAME = "tiny"
CLIENT_TIMEOUT = 30.0


@pytest.fixture
def model(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> tuple[str, Path]:
    """A tiny Llama written locally and uploaded to s3://kubeforge/models/<ns>-tiny/."""
    from kubeforge.runtime.tinymodel import save_tiny_model
    from kubeforge.storage.s3 import upload_dir

    local = save_tiny_model(tmp_path / "tiny", seed=7)
    uri = f"s3://kubeforge/models/{namespace}-tiny"
    upload_dir(cluster.s3_client(), local, uri)
    return uri, local


def reference_text(local: Path, prompt: str, n: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local)
    lm = AutoModelForCausalLM.from_pretrained(local).eval()
    ids = tok.encode(prompt)
    with torch.inference_mode():
        out = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0, len(ids):], skip_special_tokens=True))


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def is_ready(jobs: Jobs) -> dict[str, Any] | None:
    st = jobs.status(KIND, NAME)
    return st if conditions(st).get("Ready", {}).get("status") == "True" else None


def wait_ready(jobs: Jobs, timeout: float, what: str) -> dict[str, Any]:
    try:
        return wait(lambda: is_ready(jobs), timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}\nstatus: {json.dumps(jobs.status(KIND, NAME), indent=1)}") from None


def ready_pods(jobs: Jobs, role: str) -> list[dict[str, Any]]:
    out = []
    for p in jobs.pods(NAME):
        st = p.get("status") or {}
        if (p["metadata"]["labels"].get("kubeforge.dev/role") == role and not p["metadata"].get("deletionTimestamp")
                and any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))):
            out.append(p)
    return out


def router_url(jobs: Jobs) -> str:
    """The router pod's address: the test runs outside the pods' DNS, so it goes to the pod IP."""
    pods = wait(lambda: ready_pods(jobs, "router"), 30, "a ready router pod")
    return f"http://{pods[0]['status']['podIP']}:8000"


def complete(url: str, prompt: str, n: int, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """One completion; returns {ok, status, text, error, seconds}. Never raises, never outlives the timeout."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream, **extra}
    t0 = time.monotonic()
    out: dict[str, Any] = {"ok": False, "status": None, "text": "", "error": None}
    try:
        with httpx.Client(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=5.0)) as c:
            if not stream:
                r = c.post(url + "/v1/completions", json=body)
                out["status"] = r.status_code
                data = r.json()
                if r.status_code == 200:
                    out.update(ok=True, text=data["choices"][0]["text"])
                else:
                    out["error"] = data["error"]["message"]
            else:
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    out["status"] = r.status_code
                    if r.status_code != 200:
                        r.read()
                        out["error"] = r.json()["error"]["message"]
                    else:
                        done = False
                        for line in r.iter_lines():
                            if not line.startswith("data: "):
                                continue
                            payload = line[len("data: "):]
                            if payload == "[DONE]":
                                done = True
                                break
                            chunk = json.loads(payload)
                            if "error" in chunk:
                                out["error"] = chunk["error"]["message"]
                            else:
                                out["text"] += chunk["choices"][0].get("text") or ""
                        out["ok"] = done and out["error"] is None
                        if not done:
                            out["error"] = "stream ended without [DONE]"
    except httpx.TimeoutException as e:
        out["error"] = f"TIMEOUT {type(e).__name__}"
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = time.monotonic() - t0
    return out


def test_disaggregated_tiny_serves_survives_a_killed_decode_pod_and_scales_decode(
        cluster: ClusterHandle, namespace: str, jobs: Jobs, model: tuple[str, Path]) -> None:
    uri, local = model
    obj = copy.deepcopy(example("serve-disaggregated-tiny.yaml"))
    obj["spec"]["model"]["uri"] = uri
    # a low target so a handful of streams scale decode (2 streams per pod are on target; 5 are not);
    # prefill autoscaled too, to show it is left alone
    obj["spec"]["decode"]["autoscaling"].update(target=2, scaleDownStabilizationSeconds=600)
    obj["spec"]["prefill"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2, "metric": "queueDepth",
                                             "target": 4, "scaleDownStabilizationSeconds": 600}
    argv = [sys.executable, "-m", "kubeforge", "operator", "-n", namespace]
    env = {"KUBEFORGE_RESYNC_SECONDS": "2", "KUBEFORGE_AUTOSCALE_INTERVAL_SECONDS": "1"}
    with cluster.operator(argv, env) as op:
        jobs.create(obj)
        try:
            _scenario(cluster, namespace, jobs, local)
        except BaseException:
            print("operator log:\n", op.log()[-6000:])
            for p in jobs.pods(NAME):
                print(f"--- {p['metadata']['name']}\n", cluster.pod_log(namespace, p["metadata"]["name"])[-2000:])
            raise


def _scenario(cluster: ClusterHandle, namespace: str, jobs: Jobs, local: Path) -> None:
    kube = jobs.kube
    # --- children and Ready ------------------------------------------------------------------------------
    st = wait_ready(jobs, 180, "the InferenceDeployment to be Ready")
    assert st["endpoint"] == f"http://{NAME}.{namespace}.svc:8000/v1"
    assert st["readyPools"] == "2/2" and st["resolvedModelUri"].endswith(f"{namespace}-tiny")
    assert {k: v["readyReplicas"] for k, v in st["pools"].items()} == {"prefill": 1, "decode": 1, "router": 1}
    deps = {d["metadata"]["name"]: d for d in kube.list(RESOURCES["Deployment"], namespace,
                                                         f"kubeforge.dev/job-name={NAME}")}
    assert set(deps) == {"tiny-prefill", "tiny-decode", "tiny-router"}
    assert all(d["metadata"]["ownerReferences"][0]["kind"] == KIND for d in deps.values())
    svc = kube.get(RESOURCES["Service"], namespace, NAME)
    assert svc["spec"]["selector"]["kubeforge.dev/role"] == "router"
    wait(lambda: jobs.status(KIND, NAME).get("phase") == "Ready", 30, "phase Ready")
    # one PodDisruptionBudget per Deployment, in the version the server has; its controller counts the
    # pool's one pod (the selector matches that pool, not the others) and allows evicting it
    pdb_version = sv.pdb_api_version(kube)
    assert pdb_version is not None
    pdb_res = Resource(*pdb_version.split("/"), "poddisruptionbudgets")

    def budgets() -> dict[str, dict[str, Any]]:
        return {p["metadata"]["name"]: p.get("status") or {}
                for p in kube.list(pdb_res, namespace, f"kubeforge.dev/job-name={NAME}")}

    wait(lambda: {n: (b.get("expectedPods"), b.get("disruptionsAllowed")) for n, b in budgets().items()}
         == {n: (1, 1) for n in deps}, 60, "a disruption budget per pool, each counting its one pod")

    # --- greedy output through the router equals model.generate -------------------------------------------
    url = router_url(jobs)
    prompt = "The quick brown fox"
    want = reference_text(local, prompt, 24)
    got = complete(url, prompt, 24)
    assert got["ok"], got
    assert got["text"] == want
    streamed = complete(url, prompt, 24, stream=True)
    assert streamed["ok"] and streamed["text"] == want, streamed
    decode_pod = ready_pods(jobs, "decode")[0]
    prefill_pod = ready_pods(jobs, "prefill")[0]
    assert "fetched s3://" in cluster.pod_log(namespace, prefill_pod["metadata"]["name"], "fetch-model")

    # --- a decode pod killed under a small bounded load ---------------------------------------------------
    stop = threading.Event()
    results: list[dict[str, Any]] = []

    def load(tokens: int, pause: float = 0.0) -> None:
        while not stop.is_set():
            results.append(complete(url, "Once upon a time", tokens, stream=True, ignore_eos=True))
            stop.wait(pause)

    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(load, 160) for _ in range(2)]  # streams of ~2 s: the kill lands mid-stream
        wait(lambda: len(results) >= 2, 60, "load before the kill")
        time.sleep(0.5)
        kube.delete(RESOURCES["Pod"], namespace, decode_pod["metadata"]["name"], grace_seconds=0)
        time.sleep(3)
        stop.set()
        for f in futures:
            f.result(timeout=CLIENT_TIMEOUT + 10)
    assert len(results) < 60, len(results)
    print("kill under load:", [(r["ok"], r["status"], r["error"], round(r["seconds"], 1)) for r in results])
    for r in results:
        assert r["seconds"] < CLIENT_TIMEOUT, r  # nothing hangs
        assert "TIMEOUT" not in (r["error"] or ""), r
        if not r["ok"]:  # a clean error: an HTTP error status or an error event ending the stream
            assert r["error"] and (r["status"] in (200, 502, 503, 504)), r
    assert any(r["ok"] for r in results)

    # the Deployment replaces the pod; Ready again, and it was reported as Degraded meanwhile
    wait(lambda: [p for p in ready_pods(jobs, "decode") if p["metadata"]["name"] != decode_pod["metadata"]["name"]],
         120, "a new decode pod")
    wait_ready(jobs, 60, "Ready again after the decode pod was replaced")
    assert "Degraded" in jobs.event_reasons(NAME)
    after = complete(url, prompt, 24)
    assert after["ok"] and after["text"] == want, after
    assert jobs.status(KIND, NAME)["pools"]["decode"]["desiredReplicas"] == 1  # that load was on target

    # --- decode load scales decode up and leaves prefill alone ---------------------------------------------
    stop.clear()
    sent = 0

    def long_streams() -> None:
        nonlocal sent
        while not stop.is_set() and sent < 30:
            sent += 1
            complete(url, "Hello", 400, stream=True, ignore_eos=True)

    def decode_scaled() -> bool:
        pools = jobs.status(KIND, NAME).get("pools", {})
        return pools.get("decode", {}).get("desiredReplicas") == 2

    with cf.ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(long_streams) for _ in range(5)]
        try:
            wait(decode_scaled, 90, "decode desiredReplicas 2")
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=CLIENT_TIMEOUT + 10)
    st = jobs.status(KIND, NAME)
    assert st["pools"]["decode"]["lastScaleTime"]
    assert st["pools"]["prefill"]["desiredReplicas"] == 1 and "lastScaleTime" not in st["pools"]["prefill"]
    deps = {d["metadata"]["name"]: d for d in kube.list(RESOURCES["Deployment"], namespace,
                                                         f"kubeforge.dev/job-name={NAME}")}
    assert deps["tiny-decode"]["spec"]["replicas"] == 2
    assert deps["tiny-prefill"]["spec"]["replicas"] == 1
    assert "ScaledUp" in jobs.event_reasons(NAME)
    wait(lambda: len(ready_pods(jobs, "decode")) == 2, 90, "2 ready decode pods")
    wait(lambda: jobs.status(KIND, NAME)["pools"]["decode"]["readyReplicas"] == 2, 30, "status decode 2/2")

    # --- a spec change rolls decode pod by pod under load: no request fails ---------------------------------
    jobs.patch_spec(KIND, NAME, {"decode": {**obj_decode(jobs), "env": [{"name": "ROLLOUT", "value": "1"}]}})
    results.clear()
    stop.clear()

    def rolled() -> bool:
        d = kube.get(RESOURCES["Deployment"], namespace, "tiny-decode") or {}
        s = d.get("status") or {}
        return (s.get("observedGeneration", 0) >= d["metadata"]["generation"] and s.get("updatedReplicas") == 2
                and s.get("replicas") == 2 and s.get("readyReplicas") == 2)

    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(load, 48, 0.3) for _ in range(2)]
        try:
            wait(lambda: len(results) >= 2 and rolled(), 150, "the decode rollout")
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=CLIENT_TIMEOUT + 10)
    print("rollout under load:", [(r["ok"], r["status"], r["error"], round(r["seconds"], 1)) for r in results])
    assert results and all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    wait_ready(jobs, 60, "Ready after the rollout")
    wait(lambda: jobs.status(KIND, NAME).get("phase") == "Ready", 60, "phase Ready after the rollout")
    # each Deployment was written only when something changed: no patch storm
    gens = {d["metadata"]["name"]: d["metadata"]["generation"] for d in kube.list(
        RESOURCES["Deployment"], namespace, f"kubeforge.dev/job-name={NAME}")}
    assert gens == {"tiny-prefill": 1, "tiny-router": 1, "tiny-decode": 3}, gens  # +replicas, +template


def test_aggregated_serves_straight_from_the_pool_then_behind_a_router(
        cluster: ClusterHandle, namespace: str, jobs: Jobs, model: tuple[str, Path]) -> None:
    uri, local = model
    obj = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": KIND, "metadata": {"name": NAME}, "spec": {
        "model": {"uri": uri, "secretRef": {"name": "kubeforge-s3"}}, "engine": "reference",
        "mode": "aggregated", "pool": {"replicas": 1, "extraArgs": ["--threads", "1"]}}}
    argv = [sys.executable, "-m", "kubeforge", "operator", "-n", namespace]
    with cluster.operator(argv, {"KUBEFORGE_RESYNC_SECONDS": "2"}) as op:
        jobs.create(obj)
        try:
            st = wait_ready(jobs, 120, "the aggregated InferenceDeployment to be Ready")
            assert st["readyPools"] == "1/1" and set(st["pools"]) == {"aggregated"}
            deps = {d["metadata"]["name"] for d in jobs.kube.list(RESOURCES["Deployment"], namespace,
                                                                  f"kubeforge.dev/job-name={NAME}")}
            assert deps == {NAME}  # no router hop
            svc = jobs.kube.get(RESOURCES["Service"], namespace, NAME)
            assert svc["spec"]["selector"]["kubeforge.dev/role"] == "aggregated"
            (engine,) = ready_pods(jobs, "aggregated")
            prompt = "Hello there"
            want = reference_text(local, prompt, 16)
            got = complete(f"http://{engine['status']['podIP']}:8000", prompt, 16)
            assert got["ok"] and got["text"] == want, got

            # switching the router on puts it in front: the Service follows once it is there
            jobs.patch_spec(KIND, NAME, {"router": {"enabled": True}})
            wait(lambda: jobs.status(KIND, NAME).get("pools", {}).get("router", {}).get("readyReplicas") == 1,
                 90, "the router")
            wait(lambda: jobs.kube.get(RESOURCES["Service"], namespace, NAME)["spec"]["selector"].get(
                "kubeforge.dev/role") == "router", 30, "the Service to select the router")
            wait_ready(jobs, 30, "Ready behind the router")
            got = complete(router_url(jobs), prompt, 16)
            assert got["ok"] and got["text"] == want, got
        except BaseException:
            print("operator log:\n", op.log()[-6000:])
            raise


def test_wrong_model_uri_stalls_with_the_fetch_error(cluster: ClusterHandle, namespace: str, jobs: Jobs) -> None:
    missing = f"s3://kubeforge/models/{namespace}-missing"
    obj = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": KIND, "metadata": {"name": NAME}, "spec": {
        "model": {"uri": missing, "secretRef": {"name": "kubeforge-s3"}}, "engine": "reference",
        "mode": "aggregated", "pool": {"replicas": 1}}}
    argv = [sys.executable, "-m", "kubeforge", "operator", "-n", namespace]
    with cluster.operator(argv, {"KUBEFORGE_RESYNC_SECONDS": "2"}):
        jobs.create(obj)

        def stalled() -> dict[str, Any] | None:
            st = jobs.status(KIND, NAME)
            return st if conditions(st).get("Stalled", {}).get("status") == "True" else None

        st = wait(stalled, 120, "Stalled")
    conds = conditions(st)
    assert conds["Ready"]["status"] == "False" and conds["Stalled"]["reason"] == "PodsFailing"
    assert f"model fetch failed: no objects under {missing}" in st["message"], st["message"]


def obj_decode(jobs: Jobs) -> dict[str, Any]:
    return dict(jobs.get(KIND, NAME)["spec"]["decode"])
