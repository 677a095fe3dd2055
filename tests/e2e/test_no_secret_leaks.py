"""No secret value in logs, status, events, ConfigMaps, pod specs or what the runtime writes to S3.

A PretrainJob (one that trains and one that fails at once) and a disaggregated InferenceDeployment, and an
RLJob rewarded by a judge InferenceDeployment, run with an S3 Secret holding distinctive values (access key, secret key, a Hugging Face token); the deployment's KV token
is read from the Secret the operator created. Then every place a person or a log shipper reads is scanned for
each value (as it is, and base64-encoded): every pod's log, the operator's log, every object in the namespace
but the Secrets (status, annotations, termination messages included), every Event, and the small objects the
runtime wrote under the checkpoint URIs. Pod specs must take each value by secretKeyRef / envFrom, never as a
literal env value."""

from __future__ import annotations

import base64
import copy
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubeforge import contract
from kubeforge.controller.kube import RESOURCES, Kube, Resource
from kubeforge.devcluster.testing import ClusterHandle

from .conftest import REPO, Jobs, Operator, example, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
SECRET = "leak-check-s3"
SERVE = "leaky"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", contract.ENV_KV_TOKEN)
# what a namespace holds besides Secrets: everything the operator, the controllers and the pods write
SCANNED = {
    "Pod": RESOURCES["Pod"], "Service": RESOURCES["Service"], "ConfigMap": RESOURCES["ConfigMap"],
    "ServiceAccount": RESOURCES["ServiceAccount"], "Event": RESOURCES["Event"], "Role": RESOURCES["Role"],
    "RoleBinding": RESOURCES["RoleBinding"], "Deployment": RESOURCES["Deployment"],
    "ReplicaSet": Resource("apps", "v1", "replicasets"), "PodDisruptionBudget": RESOURCES["PodDisruptionBudget"],
    "NetworkPolicy": RESOURCES["NetworkPolicy"], "EndpointSlice": Resource("discovery.k8s.io", "v1", "endpointslices"),
    "PretrainJob": RESOURCES["PretrainJob"], "InferenceDeployment": RESOURCES["InferenceDeployment"],
    "RLJob": RESOURCES["RLJob"],
}


@pytest.fixture(scope="module", autouse=True)
def corpus(cluster: ClusterHandle) -> None:
    cluster.s3_client().upload_file(str(REPO / "examples/data/tiny-corpus.jsonl"), "kubeforge",
                                    "data/tiny-corpus.jsonl")


def secret_values(cluster: ClusterHandle) -> dict[str, str]:
    """Distinctive credentials the S3 server accepts (moto takes any key; MinIO only its own)."""
    tag = secrets.token_hex(6)
    moto = cluster.dev is not None and cluster.dev.s3.get("kind") == "moto"
    return {
        "AWS_ACCESS_KEY_ID": f"AKIAKFLEAK{tag.upper()}" if moto else cluster.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": f"kfleak-secret-{tag}-{secrets.token_urlsafe(12)}" if moto else cluster.s3_secret_key,
        "HF_TOKEN": f"hf_kfleak{tag}{secrets.token_hex(8)}",
    }


def forms(value: str) -> set[str]:
    """The value and its base64 encodings (a Secret's .data, a value pasted into a ConfigMap's binaryData)."""
    raw = value.encode()
    return {value, base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")}


def leaks(text: str, values: dict[str, str]) -> list[str]:
    return [name for name, value in values.items() if any(f in text for f in forms(value))]


def upload_model(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> str:
    from kubeforge.runtime.tinymodel import save_tiny_model
    from kubeforge.storage.s3 import upload_dir

    uri = f"s3://kubeforge/models/{namespace}-leak"
    upload_dir(cluster.s3_client(), save_tiny_model(tmp_path / "tiny", seed=5), uri)
    return uri


def pretrain(jobs: Jobs, name: str, steps: int, data: str = "s3://kubeforge/data/tiny-corpus.jsonl") -> dict:
    obj = copy.deepcopy(example("pretrain-tiny.yaml"))
    obj["metadata"]["name"] = name
    obj["spec"]["training"]["totalSteps"] = steps
    obj["spec"]["data"]["uri"] = data
    obj["spec"]["checkpoint"].update(uri=f"s3://kubeforge/checkpoints/{jobs.ns}/{name}", intervalSteps=10,
                                     secretRef={"name": SECRET})
    return obj


def serving(jobs: Jobs, uri: str) -> dict:
    obj = copy.deepcopy(example("serve-disaggregated-tiny.yaml"))
    obj["metadata"]["name"] = SERVE
    obj["spec"]["model"] = {"uri": uri, "secretRef": {"name": SECRET}}
    obj["spec"]["decode"].pop("autoscaling", None)
    return obj


def ready_router(jobs: Jobs) -> str | None:
    for p in jobs.pods(SERVE):
        st = p.get("status") or {}
        if (p["metadata"]["labels"].get(contract.LABEL_ROLE) == "router"
                and any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))):
            return f"http://{st['podIP']}:8000"
    return None


def make_secret(cluster: ClusterHandle, namespace: str, values: dict[str, str]) -> Any:
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=SECRET),
        string_data={**values, "AWS_ENDPOINT_URL": cluster.s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}))
    return core


def literal_secret_env(pod: dict[str, Any], values: dict[str, str]) -> list[str]:
    """Env entries of the pod's containers that carry a secret by value, or a secret key not by reference."""
    bad = []
    spec = pod["spec"]
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        for e in c.get("env", []):
            named_secret = e["name"] in SECRET_KEYS or e["name"].endswith(SECRET_KEYS[:2])
            if "value" in e and (named_secret or leaks(str(e["value"]), values)):
                bad.append(f"{pod['metadata']['name']}/{c['name']}: {e['name']} is a literal value")
            if named_secret and "value" not in e and "secretKeyRef" not in (e.get("valueFrom") or {}):
                bad.append(f"{pod['metadata']['name']}/{c['name']}: {e['name']} is not a secretKeyRef")
        for src in c.get("envFrom", []):
            if "configMapRef" in src:
                bad.append(f"{pod['metadata']['name']}/{c['name']}: env from ConfigMap {src['configMapRef']}")
    return bad


def scan_namespace(cluster: ClusterHandle, operator: Operator, namespace: str, values: dict[str, str],
                   texts: list[str], s3_prefixes: tuple[str, ...]) -> tuple[list[str], dict[str, int], list[dict]]:
    """(where each value was found, characters scanned per source, the pods): pod logs and specs, the
    operator's log, every object but Secrets, the small S3 objects under the prefixes, answers in `texts`."""
    kube = Kube(cluster.api_client())
    found: list[str] = []
    scanned: dict[str, int] = {}

    def scan(where: str, text: str) -> None:
        scanned[where.split(" ")[0]] = scanned.get(where.split(" ")[0], 0) + len(text)
        found.extend(f"{name} in {where}" for name in leaks(text, values))

    for i, text in enumerate(texts):
        scan(f"router-answer {i}", text)
    pods = kube.list(RESOURCES["Pod"], namespace)
    for pod in pods:
        scan(f"pod-log {pod['metadata']['name']}", cluster.pod_log(namespace, pod["metadata"]["name"]))
        found.extend(literal_secret_env(pod, values))
    scan("operator-log", operator.log())
    for kind, res in SCANNED.items():
        for obj in kube.list(res, namespace):
            scan(f"{kind} {obj['metadata']['name']}", json.dumps(obj))
    s3 = cluster.s3_client()
    for prefix in s3_prefixes:
        for o in s3.list_objects_v2(Bucket="kubeforge", Prefix=prefix).get("Contents", []):
            if o["Size"] < 1 << 20:
                scan(f"s3 {o['Key']}", s3.get_object(Bucket="kubeforge", Key=o["Key"])["Body"].read().decode(
                    errors="replace"))

    return found, scanned, pods


def test_no_secret_value_in_logs_status_events_configmaps_or_pod_specs(
        operator: Operator, jobs: Jobs, cluster: ClusterHandle, namespace: str, tmp_path: Path):
    from kubernetes import client

    values = secret_values(cluster)
    core = make_secret(cluster, namespace, values)
    model_uri = upload_model(cluster, namespace, tmp_path)

    jobs.create(pretrain(jobs, "trains", steps=20))
    jobs.create(pretrain(jobs, "fails", steps=20, data=f"s3://kubeforge/nothing-here/{namespace}/"))
    jobs.create(serving(jobs, model_uri))

    # the deployment's own token, from the Secret the operator created for it
    token_secret = wait(lambda: _read_secret(core, namespace, f"{SERVE}-kv-token"), 120, "the KV token Secret")
    values[contract.ENV_KV_TOKEN] = base64.b64decode(token_secret.data[contract.KV_TOKEN_SECRET_KEY]).decode()
    assert len(values[contract.ENV_KV_TOKEN]) >= 32

    assert jobs.wait_phase("PretrainJob", "trains", {"Succeeded", "Failed"}, timeout=400)["phase"] == "Succeeded"
    failed = jobs.wait_phase("PretrainJob", "fails", {"Succeeded", "Failed"}, timeout=200)
    assert failed["phase"] == "Failed"  # an error path: its message is in the status and the pods' logs
    router = wait(lambda: ready_router(jobs), 300, "a ready router")
    st = jobs.wait_phase("InferenceDeployment", SERVE, {"Ready"}, timeout=300)
    assert st["readyPools"] == "2/2"
    texts = []
    for i in range(3):  # disaggregated requests: the router and the decode pod send the token
        r = httpx.post(router + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": f"secret {i} " * 20, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        texts.append(r.text + json.dumps(dict(r.headers)))
    # an engine refuses the KV endpoint without the token (the test reaches the pod IP directly; the dev
    # cluster enforces no NetworkPolicy)
    prefill = next(p for p in jobs.pods(SERVE) if p["metadata"]["labels"][contract.LABEL_ROLE] == "prefill")
    assert httpx.get(f"http://{prefill['status']['podIP']}:8000/kv/anything", timeout=10).status_code == 401

    found, scanned, pods = scan_namespace(cluster, operator, namespace, values, texts,
                                          (f"checkpoints/{namespace}/", f"models/{namespace}-leak/"))
    assert not found, "\n".join(found)
    # the scan read what it claims to: logs of every pod, the operator's, the objects, the checkpoints
    assert {p["metadata"]["labels"][contract.LABEL_ROLE] for p in pods} >= {"worker", "prefill", "decode", "router"}
    assert scanned["pod-log"] > 1000 and scanned["operator-log"] > 1000 and scanned["s3"] > 0
    assert scanned["ConfigMap"] > 0 and scanned["Event"] > 0 and scanned["PretrainJob"] > 0
    # and it finds a value where one is: the Secrets themselves
    own = [s for s in core.list_namespaced_secret(namespace).items if s.metadata.name == SECRET]
    assert set(leaks(json.dumps(client.ApiClient().sanitize_for_serialization(own[0])), values)) == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"}
    assert leaks(json.dumps(client.ApiClient().sanitize_for_serialization(token_secret)), values) == [
        contract.ENV_KV_TOKEN]


def _read_secret(core: Any, namespace: str, name: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return core.read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_rl_job_with_a_judge_leaks_no_secret(operator: Operator, jobs: Jobs, cluster: ClusterHandle,
                                            namespace: str, tmp_path: Path):
    import yaml

    from kubeforge.runtime.rl import tasks

    values = secret_values(cluster)
    core = make_secret(cluster, namespace, values)
    root = f"s3://kubeforge/rl-leak/{namespace}"
    model_uri, data_uri = tasks.upload(cluster.s3_client(), root, tmp_path)
    judge, job = (d for d in yaml.safe_load_all((REPO / "examples/rl-judge-tiny.yaml").read_text()) if d)
    judge["spec"]["model"] = {"uri": model_uri, "secretRef": {"name": SECRET}}
    job["spec"]["model"] = {"uri": model_uri, "secretRef": {"name": SECRET}}
    job["spec"]["data"]["uri"] = data_uri
    job["spec"]["algorithm"]["steps"] = 2
    job["spec"]["checkpoint"].update(uri=f"{root}/checkpoints", intervalSteps=1, secretRef={"name": SECRET})
    code = {"name": "PYTHONPATH", "value": str(REPO / "operator")}  # the pods run this checkout's code
    for holder in (job["spec"].setdefault("resources", {}), job["spec"].setdefault("rollout", {}).setdefault(
            "resources", {})):
        holder["env"] = [*holder.get("env", []), code]
    jobs.create(judge)
    jobs.create(job)
    token_secret = wait(lambda: _read_secret(core, namespace, "rl-judge-kv-token"), 120, "the judge's KV token")
    values[contract.ENV_KV_TOKEN] = base64.b64decode(token_secret.data[contract.KV_TOKEN_SECRET_KEY]).decode()
    st = jobs.wait_phase("RLJob", "rl-judged", {"Succeeded", "Failed"}, timeout=500)
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)[-3000:]

    found, scanned, pods = scan_namespace(cluster, operator, namespace, values, [],
                                          (f"rl-leak/{namespace}/checkpoints/",))
    assert not found, "\n".join(found)
    roles = {p["metadata"]["labels"].get(contract.LABEL_ROLE) for p in pods}
    assert "aggregated" in roles and len(roles) >= 2, roles  # the judge's pool and the RLJob's pods
    assert scanned["pod-log"] > 1000 and scanned["RLJob"] > 0 and scanned["s3"] > 0
