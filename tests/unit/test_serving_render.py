"""InferenceDeployment, operator side: rendering of children (vLLM and reference engines, router, Service,
RBAC), the serving status (Ready semantics, phases, events, model.from), autoscaling decisions, Deployment
patches, a whole reconcile against an in-memory API, and the model fetch init container against moto."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from builders import inference_deployment, with_
from kubeforge import contract
from kubeforge.api.validation import parse_spec, validate
from kubeforge.controller import serving as sv
from kubeforge.controller import vllm
from kubeforge.controller.kube import RESOURCES, Resource, resource_for
from kubeforge.controller.reconciler import Reconciler
from kubeforge.controller.training import Source
from kubeforge.runtime.serve.autoscale import PoolSignal
from kubeforge.settings import OperatorSettings

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
URI = "s3://kubeforge/models/tiny"
SETTINGS = OperatorSettings()
GPU = "nvidia.com/gpu"


def _obj(o: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    o = copy.deepcopy(o)
    o["metadata"].update(uid="uid-1", generation=generation, namespace="ns1")
    assert validate(o) == [], validate(o)
    return o


VLLM_PD = _obj(inference_deployment("llm"))
VLLM_AGG = _obj({**inference_deployment("agg"), "spec": {
    "model": {"uri": URI}, "mode": "aggregated",
    "pool": {"replicas": 2, "tensorParallel": 4, "requests": {GPU: 4}, "extraArgs": ["--enforce-eager"]}}})
REF_PD = _obj(inference_deployment(
    "tiny", engine="reference", kvTransfer={"connector": "Reference", "failurePolicy": "fail"},
    prefill={"replicas": 1, "extraArgs": ["--threads", "1"]},
    decode={"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "target": 2,
                                           "scaleDownStabilizationSeconds": 60}},
    router={"prefillThresholdTokens": 16, "picking": "round-robin"}, maxModelLen=256, servedModelName="tiny-llm",
    model={"uri": URI, "secretRef": {"name": "kubeforge-s3"}},
))
REF_AGG = _obj({**inference_deployment("one"), "spec": {
    "model": {"uri": URI}, "engine": "reference", "mode": "aggregated", "pool": {"replicas": 1}}})
REF_AGG_ROUTER = _obj(with_(REF_AGG, "spec.router", {"enabled": True}))


def children(obj: dict[str, Any], replicas: dict[str, int] | None = None) -> dict[tuple[str, str], dict]:
    out = sv.desired_children(obj, parse_spec(obj), URI, SETTINGS, replicas)
    by = {(m["kind"], m["metadata"]["name"]): m for m in out}
    assert len(by) == len(out), "duplicate child names"
    return by


def container(obj: dict[str, Any], deployment: str) -> dict[str, Any]:
    return children(obj)[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"][0]


def pod_spec(obj: dict[str, Any], deployment: str) -> dict[str, Any]:
    return children(obj)[("Deployment", deployment)]["spec"]["template"]["spec"]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# ---------------------------------------------------------------------------------------------------------
# Children: names, kinds, labels, owners


@pytest.mark.parametrize(("obj", "expected"), [
    (VLLM_PD, {("ServiceAccount", "llm-router"), ("Role", "llm-router"), ("RoleBinding", "llm-router"),
               ("Deployment", "llm-prefill"), ("Deployment", "llm-decode"), ("Deployment", "llm-router"),
               ("PodDisruptionBudget", "llm-prefill"), ("PodDisruptionBudget", "llm-decode"),
               ("PodDisruptionBudget", "llm-router"), ("NetworkPolicy", "llm-engines"), ("Service", "llm")}),
    (VLLM_AGG, {("Deployment", "agg"), ("PodDisruptionBudget", "agg"), ("Service", "agg")}),
    (REF_AGG, {("Deployment", "one"), ("PodDisruptionBudget", "one"), ("Service", "one")}),
    (REF_AGG_ROUTER, {("ServiceAccount", "one-router"), ("Role", "one-router"), ("RoleBinding", "one-router"),
                      ("Deployment", "one"), ("Deployment", "one-router"), ("PodDisruptionBudget", "one"),
                      ("PodDisruptionBudget", "one-router"), ("Service", "one")}),
], ids=["vllm-disaggregated", "vllm-aggregated", "reference-aggregated", "aggregated-with-router"])
def test_children_names_and_kinds(obj, expected):
    assert set(children(obj)) == expected


@pytest.mark.parametrize("obj", [VLLM_PD, VLLM_AGG, REF_PD, REF_AGG_ROUTER], ids=["pd", "agg", "ref-pd", "agg-r"])
def test_every_child_is_owned_and_labelled(obj):
    for (kind, _name), m in children(obj).items():
        meta = m["metadata"]
        assert meta["namespace"] == "ns1"
        assert meta["ownerReferences"] == [{
            "apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceDeployment", "name": obj["metadata"]["name"],
            "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"][contract.LABEL_JOB_NAME] == obj["metadata"]["name"]
        assert meta["labels"][contract.LABEL_JOB_KIND] == "InferenceDeployment"
        if kind == "Deployment":
            role = meta["labels"][contract.LABEL_ROLE]
            tpl_labels = m["spec"]["template"]["metadata"]["labels"]
            assert m["spec"]["selector"]["matchLabels"].items() <= tpl_labels.items()
            assert tpl_labels[contract.LABEL_ROLE] == role
            assert m["spec"]["strategy"] == {"type": "RollingUpdate",
                                             "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
            assert re.fullmatch(r"[0-9a-f]{16}", meta["annotations"][sv.HASH_ANNOTATION])


@pytest.mark.parametrize("api_version", ["policy/v1", "policy/v1beta1"])
@pytest.mark.parametrize("obj", [VLLM_PD, REF_AGG_ROUTER], ids=["pd", "agg-r"])
def test_each_pool_has_a_disruption_budget_selecting_exactly_its_pods(obj, api_version):
    out = sv.desired_children(obj, parse_spec(obj), URI, SETTINGS, pdb_api_version=api_version)
    deployments = {m["metadata"]["name"]: m for m in out if m["kind"] == "Deployment"}
    budgets = {m["metadata"]["name"]: m for m in out if m["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == set(deployments)
    for name, pdb in budgets.items():
        assert pdb["apiVersion"] == api_version and pdb["spec"]["maxUnavailable"] == 1
        assert resource_for(pdb) == Resource("policy", api_version.split("/")[1], "poddisruptionbudgets")
        selected = pdb["spec"]["selector"]["matchLabels"]
        for other, dep in deployments.items():  # its own pool's pods, and no other pool's
            pod_labels = dep["spec"]["template"]["metadata"]["labels"]
            assert (selected.items() <= pod_labels.items()) == (other == name)
    none = sv.desired_children(obj, parse_spec(obj), URI, SETTINGS, pdb_api_version=None)
    assert not [m for m in none if m["kind"] == "PodDisruptionBudget"]


@pytest.mark.parametrize(("served", "expected"), [({"v1", "v1beta1"}, "policy/v1"),
                                                  ({"v1beta1"}, "policy/v1beta1"), (set(), None)])
def test_disruption_budget_version_is_what_the_cluster_serves(served, expected):
    kube = SimpleNamespace(served=lambda group, version: group == "policy" and version in served)
    assert sv.pdb_api_version(kube) == expected


@pytest.mark.parametrize(("obj", "target_role"), [
    (VLLM_PD, "router"), (VLLM_AGG, "aggregated"), (REF_AGG, "aggregated"), (REF_AGG_ROUTER, "router")])
def test_service_goes_to_router_or_straight_to_the_pool(obj, target_role):
    name = obj["metadata"]["name"]
    svc = children(obj)[("Service", name)]
    port = obj["spec"].get("port", 8000)
    assert svc["spec"]["selector"] == {contract.LABEL_JOB_NAME: name, contract.LABEL_JOB_KIND: "InferenceDeployment",
                                       contract.LABEL_ROLE: target_role}
    assert svc["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]


def test_replicas_from_spec_and_from_the_autoscaler():
    assert children(VLLM_PD)[("Deployment", "llm-decode")]["spec"]["replicas"] == 2
    assert children(VLLM_PD)[("Deployment", "llm-prefill")]["spec"]["replicas"] == 1
    assert children(VLLM_PD, {"decode": 4})[("Deployment", "llm-decode")]["spec"]["replicas"] == 4
    assert children(VLLM_AGG)[("Deployment", "agg")]["spec"]["replicas"] == 2


def test_children_are_deterministic():
    assert sv.desired_children(VLLM_PD, parse_spec(VLLM_PD), URI, SETTINGS) == \
        sv.desired_children(VLLM_PD, parse_spec(VLLM_PD), URI, SETTINGS)


# ---------------------------------------------------------------------------------------------------------
# vLLM


@pytest.mark.parametrize(("connector", "role", "kv_role"), [
    ("NixlConnector", "prefill", "kv_both"), ("NixlConnector", "decode", "kv_both"),
])
def test_kv_transfer_config_per_connector_and_role(connector, role, kv_role):
    obj = _obj(with_(VLLM_PD, "spec.kvTransfer", {"connector": connector, "failurePolicy": "fail",
                                                 "bufferDevice": "cpu"}))
    argv = container(obj, f"llm-{role}")["command"]
    cfg = json.loads(flag(argv, "--kv-transfer-config"))
    assert cfg == {"kv_connector": connector, "kv_role": kv_role, "kv_buffer_device": "cpu",
                   "kv_load_failure_policy": "fail"}


@pytest.mark.parametrize(("deployment", "tp", "expected_tail"), [
    ("llm-prefill", 1, []),
    ("llm-decode", 2, []),
])
def test_vllm_serve_command(deployment, tp, expected_tail):
    argv = container(VLLM_PD, deployment)["command"]
    assert argv[:3] == ["vllm", "serve", "/models/llm"]
    assert flag(argv, "--served-model-name") == "llm"
    assert flag(argv, "--port") == "8000"
    assert flag(argv, "--host") == "0.0.0.0"
    assert flag(argv, "--tensor-parallel-size") == str(tp)
    assert flag(argv, "--shutdown-timeout") == str(vllm.SHUTDOWN_TIMEOUT_S)
    assert "--max-model-len" not in argv and "--block-size" not in argv
    assert json.loads(flag(argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cuda",
        "kv_load_failure_policy": "recompute"}


def test_vllm_optional_flags_and_extra_args():
    obj = _obj(with_(with_(with_(VLLM_PD, "spec.maxModelLen", 8192), "spec.blockSize", 64),
                     "spec.servedModelName", "llama-3"))
    obj["spec"]["decode"]["extraArgs"] = ["--enforce-eager", "--gpu-memory-utilization=0.85"]
    argv = container(obj, "llm-decode")["command"]
    assert flag(argv, "--max-model-len") == "8192"
    assert flag(argv, "--block-size") == "64"
    assert flag(argv, "--served-model-name") == "llama-3"
    assert argv[-2:] == ["--enforce-eager", "--gpu-memory-utilization=0.85"]


def test_vllm_aggregated_has_no_kv_transfer_and_no_side_channel():
    c = container(VLLM_AGG, "agg")
    assert "--kv-transfer-config" not in c["command"]
    assert flag(c["command"], "--tensor-parallel-size") == "4"
    assert c["command"][-1] == "--enforce-eager"
    names = {e["name"] for e in c["env"]}
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in names and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in names
    assert [p["name"] for p in c["ports"]] == ["http"]


@pytest.mark.parametrize("deployment", ["llm-prefill", "llm-decode"])
def test_vllm_side_channel_env_and_ports(deployment):
    c = container(VLLM_PD, deployment)
    env = {e["name"]: e for e in c["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == {
        "name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "5600"
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env[contract.ENV_POD_IP]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "nixl": 5600}


def test_side_channel_port_follows_the_spec_and_aggregated_pools_have_none():
    obj = _obj(with_(VLLM_PD, "spec.kvTransfer", {"sideChannelPort": 7100}))
    env = {e["name"]: e for e in container(obj, "llm-decode")["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "7100"
    agg = container(VLLM_AGG, "agg")
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in {e["name"] for e in agg["env"]}


@pytest.mark.parametrize(("deployment", "gpus"), [("llm-prefill", "1"), ("llm-decode", "2")])
def test_vllm_gpu_resources_equal_tensor_parallel(deployment, gpus):
    assert container(VLLM_PD, deployment)["resources"] == {"requests": {GPU: gpus}, "limits": {GPU: gpus}}


def test_vllm_gpus_default_to_tensor_parallel_when_not_requested():
    obj = _obj(with_(with_(VLLM_PD, "spec.decode.requests", {"cpu": "8"}), "spec.decode.limits", {}))
    assert container(obj, "llm-decode")["resources"] == {"requests": {"cpu": "8", GPU: "2"}, "limits": {GPU: "2"}}


def test_vllm_probes_and_shm():
    c = container(VLLM_PD, "llm-decode")
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v1/models", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/v1/models", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 1800
    spec = pod_spec(VLLM_PD, "llm-decode")
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", str(vllm.PRESTOP_SLEEP_S)]}}}
    assert spec["terminationGracePeriodSeconds"] > vllm.PRESTOP_SLEEP_S + vllm.SHUTDOWN_TIMEOUT_S
    deadline = children(VLLM_PD)[("Deployment", "llm-decode")]["spec"]["progressDeadlineSeconds"]
    assert deadline > vllm.STARTUP_PERIOD_S * vllm.STARTUP_FAILURES


def test_vllm_image_default_and_override():
    assert container(VLLM_PD, "llm-decode")["image"] == SETTINGS.serve_image
    obj = _obj(with_(VLLM_PD, "spec.decode.image", "registry.example/vllm:0.11"))
    assert container(obj, "llm-decode")["image"] == "registry.example/vllm:0.11"
    assert pod_spec(obj, "llm-decode")["initContainers"][0]["image"] == "registry.example/vllm:0.11"


def test_placement_is_rendered():
    obj = _obj(with_(with_(VLLM_PD, "spec.decode.nodeSelector", {"gpu": "h100"}), "spec.decode.tolerations",
                     [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]))
    spec = pod_spec(obj, "llm-decode")
    assert spec["nodeSelector"] == {"gpu": "h100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


# ---------------------------------------------------------------------------------------------------------
# Init container: model fetch


@pytest.mark.parametrize(("obj", "deployment"), [(VLLM_PD, "llm-prefill"), (REF_PD, "tiny-decode"),
                                                 (REF_AGG, "one")])
def test_init_container_fetches_the_model_once_per_pod(obj, deployment):
    spec = pod_spec(obj, deployment)
    (init,) = spec["initContainers"]
    name = obj["metadata"]["name"]
    assert init["command"] == ["python", "-m", "kubeforge.runtime.fetch", URI, f"/models/{name}"]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    assert {"name": "model", "emptyDir": {}} in spec["volumes"]
    engine = spec["containers"][0]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in engine["volumeMounts"]
    assert not any("AWS" in e["name"] for e in engine["env"]) and "envFrom" not in engine
    assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("tokenizer", [{"uri": "s3://kubeforge/tokenizers/llama"}, {"builtin": "byte"}])
@pytest.mark.parametrize(("obj", "deployment"), [(VLLM_PD, "llm-decode"), (REF_PD, "tiny-prefill"),
                                                 (REF_AGG, "one")])
def test_model_tokenizer_is_fetched_and_handed_to_the_engine(obj, deployment, tokenizer):
    obj = _obj(with_(obj, "spec.model.tokenizer", tokenizer))
    spec = pod_spec(obj, deployment)
    (init,) = spec["initContainers"]
    source = tokenizer.get("uri") or "builtin:byte"
    assert init["command"][-4:] == ["--tokenizer", source, "--tokenizer-dir", "/models/.tokenizer"]
    argv = spec["containers"][0]["command"]
    assert flag(argv, "--tokenizer") == "/models/.tokenizer"
    if argv[0] == "python":  # the reference engine's CLI takes it
        from kubeforge.runtime.serve.engine import parse_args

        assert parse_args(_expand(argv, POD_ENV)[3:]).tokenizer == "/models/.tokenizer"
    # without model.tokenizer the engines use the model's own
    assert "--tokenizer" not in container(VLLM_PD, "llm-decode")["command"]
    assert "--tokenizer" not in pod_spec(REF_PD, "tiny-prefill")["initContainers"][0]["command"]


def test_init_container_gets_the_secret():
    init = pod_spec(REF_PD, "tiny-prefill")["initContainers"][0]
    assert init["envFrom"] == [{"secretRef": {"name": "kubeforge-s3"}}]
    assert "envFrom" not in pod_spec(REF_AGG, "one")["initContainers"][0]


# ---------------------------------------------------------------------------------------------------------
# Reference engine and router: rendered argv parses with the real CLIs


def _expand(argv: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv]


POD_ENV = {contract.ENV_POD_IP: "10.0.0.7", contract.ENV_POD_NAME: "tiny-decode-abc"}


@pytest.mark.parametrize(("obj", "deployment", "role"), [
    (REF_PD, "tiny-prefill", "prefill"), (REF_PD, "tiny-decode", "decode"), (REF_AGG, "one", "both")])
def test_reference_engine_argv_parses(obj, deployment, role):
    from kubeforge.runtime.serve.engine import parse_args

    c = container(obj, deployment)
    argv = _expand(c["command"], POD_ENV)
    assert argv[:3] == ["python", "-m", "kubeforge.runtime.serve.engine"]
    a = parse_args(argv[3:])
    name = obj["metadata"]["name"]
    assert (a.model, a.role, a.host, a.port) == (f"/models/{name}", role, "10.0.0.7", 8000)
    assert a.engine_id == "tiny-decode-abc"
    assert a.drain_timeout == sv.REFERENCE_DRAIN_S
    assert pod_spec(obj, deployment)["terminationGracePeriodSeconds"] > vllm.PRESTOP_SLEEP_S + a.drain_timeout
    assert "preStop" in c["lifecycle"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "resources" not in c or GPU not in json.dumps(c["resources"])


def test_reference_engine_spec_fields():
    from kubeforge.runtime.serve.engine import parse_args

    a = parse_args(_expand(container(REF_PD, "tiny-prefill")["command"], POD_ENV)[3:])
    assert (a.served_model_name, a.max_model_len, a.kv_load_failure_policy, a.threads) == ("tiny-llm", 256, "fail", 1)


@pytest.mark.parametrize(("obj", "prefill_sel", "decode_sel"), [
    (REF_PD, "kubeforge.dev/job-name=tiny,kubeforge.dev/job-kind=InferenceDeployment,kubeforge.dev/role=prefill",
     "kubeforge.dev/job-name=tiny,kubeforge.dev/job-kind=InferenceDeployment,kubeforge.dev/role=decode"),
    (REF_AGG_ROUTER, None,
     "kubeforge.dev/job-name=one,kubeforge.dev/job-kind=InferenceDeployment,kubeforge.dev/role=aggregated"),
])
def test_router_argv_parses_with_kubernetes_discovery(obj, prefill_sel, decode_sel):
    from kubeforge.runtime.serve.router import parse_args

    name = obj["metadata"]["name"]
    d = children(obj)[("Deployment", f"{name}-router")]
    c = d["spec"]["template"]["spec"]["containers"][0]
    a = parse_args(_expand(c["command"], POD_ENV)[3:])
    assert (a.k8s_namespace, a.k8s_prefill_selector, a.k8s_decode_selector, a.k8s_port) == \
        ("ns1", prefill_sel, decode_sel, 8000)
    assert (a.host, a.port) == ("10.0.0.7", 8000)
    assert d["spec"]["template"]["spec"]["serviceAccountName"] == f"{name}-router"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    if obj is REF_PD:
        assert (a.prefill_threshold_tokens, a.picking) == (16, "round-robin")
    assert (a.request_timeout, a.stream_timeout, a.max_in_flight) == (600, 0, 1024)  # the API's defaults


def test_router_timeouts_and_concurrency_come_from_the_spec():
    obj = _obj(with_(REF_PD, "spec.router", {"requestTimeoutSeconds": 1200, "streamTimeoutSeconds": 7200,
                                             "maxInFlight": 64}))
    from kubeforge.runtime.serve.router import parse_args

    c = children(obj)[("Deployment", "tiny-router")]["spec"]["template"]["spec"]["containers"][0]
    a = parse_args(_expand(c["command"], POD_ENV)[3:])
    assert (a.request_timeout, a.stream_timeout, a.max_in_flight) == (1200, 7200, 64)


@pytest.mark.parametrize("obj", [REF_PD, REF_AGG, REF_AGG_ROUTER], ids=["pd", "agg", "agg-router"])
def test_kv_token_reaches_engines_and_router_by_secret_reference_only(obj):
    name = obj["metadata"]["name"]
    for (kind, _), m in children(obj).items():
        if kind != "Deployment":
            continue
        spec = m["spec"]["template"]["spec"]
        engine_or_router = spec["containers"][0]
        refs = [e for e in engine_or_router["env"] if e["name"] == contract.ENV_KV_TOKEN]
        assert refs == [{"name": contract.ENV_KV_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": f"{name}-kv-token", "key": contract.KV_TOKEN_SECRET_KEY}}}]
        for c in spec.get("initContainers", []):  # the model fetch needs S3 only
            assert all(e["name"] != contract.ENV_KV_TOKEN for e in c.get("env", []))


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's meaning (matchLabels and the In operator, all this code renders)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In"
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


@pytest.mark.parametrize("obj", [REF_PD, VLLM_PD], ids=["reference", "vllm"])
def test_network_policy_admits_only_the_deployments_own_pods_to_the_engines(obj):
    name = obj["metadata"]["name"]
    policy = children(obj)[("NetworkPolicy", f"{name}-engines")]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["spec"]["policyTypes"] == ["Ingress"]
    pods = {pool: children(obj)[("Deployment", f"{name}-{pool}")]["spec"]["template"]["metadata"]["labels"]
            for pool in ("prefill", "decode", "router")}
    target = policy["spec"]["podSelector"]
    assert _selects(target, pods["prefill"]) and _selects(target, pods["decode"])
    assert not _selects(target, pods["router"])  # clients reach the router
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule  # every port: HTTP, /kv/*, vLLM's side channel
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector / ipBlock: this namespace's pods only
    assert all(_selects(peer["podSelector"], labels) for labels in pods.values())
    other = with_(obj, "metadata.name", "other")
    for labels in (pods["router"], {**pods["router"], contract.LABEL_JOB_NAME: "other"},
                   {**pods["router"], contract.LABEL_JOB_KIND: "PretrainJob"}):
        foreign = labels[contract.LABEL_JOB_NAME] != name or labels[contract.LABEL_JOB_KIND] != "InferenceDeployment"
        assert _selects(peer["podSelector"], labels) is not foreign
    assert children(other)[("NetworkPolicy", "other-engines")]["spec"]["podSelector"]["matchLabels"][
        contract.LABEL_JOB_NAME] == "other"


@pytest.mark.parametrize("obj", [REF_AGG, REF_AGG_ROUTER, VLLM_AGG], ids=["agg", "agg-router", "vllm-agg"])
def test_no_network_policy_where_clients_may_reach_the_pool_directly(obj):
    assert not [k for k in children(obj) if k[0] == "NetworkPolicy"]


def test_router_rbac_is_least_privilege():
    by = children(REF_PD)
    assert by[("Role", "tiny-router")]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    rb = by[("RoleBinding", "tiny-router")]
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tiny-router"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "tiny-router", "namespace": "ns1"}]


# ---------------------------------------------------------------------------------------------------------
# Status


def pod(obj: dict[str, Any], role: str, i: int, ready: bool = True, ip: str | None = None,
        deleting: bool = False, **status: Any) -> dict[str, Any]:
    p = {
        "metadata": {"name": f"{obj['metadata']['name']}-{role}-{i}", "labels": {
            contract.LABEL_JOB_NAME: obj["metadata"]["name"], contract.LABEL_ROLE: role}},
        "status": {"phase": "Running", "podIP": ip or f"10.1.0.{i + 1}",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **status},
    }
    if deleting:
        p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return p


def deployments(obj: dict[str, Any], replicas: dict[str, int]) -> dict[str, dict[str, Any]]:
    out = {}
    for m in sv.desired_children(obj, parse_spec(obj), URI, SETTINGS, replicas):
        if m["kind"] == "Deployment":
            n = m["spec"]["replicas"]
            m["metadata"]["generation"] = 1
            m["status"] = {"observedGeneration": 1, "replicas": n, "updatedReplicas": n, "readyReplicas": n}
            out[m["metadata"]["name"]] = m
    return out


def plan(obj, pods=(), source=None, deps=None, now=T0, signals=None, recs=None):
    spec = parse_spec(obj)
    observed = sv.ServingObserved(source=source or Source(uri=URI), deployments=deps or {}, pods=list(pods),
                                  signals=signals, recommendations=recs or {})
    return sv.plan_serving(obj, spec, observed, now)


def cond(status, type_):
    return next(c for c in status.conditions if c.type == type_)


def settle(obj, p) -> dict[str, Any]:
    """The object as the API would hold it after the plan's status write."""
    out = copy.deepcopy(obj)
    out["status"] = p.status.to_wire()
    return out


ALL_UP = ("prefill", "decode", "router")


@pytest.mark.parametrize(("ready_roles", "ready"), [
    (ALL_UP, True),
    (("prefill", "decode"), False),  # no router: nothing can answer a client
    (("prefill", "router"), False),  # no decode pod
    (("decode", "router"), False),  # no prefill pod
    ((), False),
])
def test_ready_only_when_a_request_can_be_served(ready_roles, ready):
    pods = [pod(REF_PD, r, 0, ready=r in ready_roles) for r in ALL_UP]
    st = plan(REF_PD, pods).status
    assert cond(st, "Ready").status == ("True" if ready else "False")
    assert st.ready_pools == f"{len({'prefill', 'decode'} & set(ready_roles))}/2"


def test_aggregated_router_switched_on_serves_from_the_pool_until_the_router_is_ready():
    pool_only = [pod(REF_AGG_ROUTER, "aggregated", 0), pod(REF_AGG_ROUTER, "router", 0, ready=False)]
    p = plan(REF_AGG_ROUTER, pool_only)
    assert not p.service_to_router and cond(p.status, "Ready").status == "True"
    svc = sv.desired_children(REF_AGG_ROUTER, parse_spec(REF_AGG_ROUTER), URI, SETTINGS, p.replicas,
                              p.service_to_router)[-1]
    assert svc["spec"]["selector"][contract.LABEL_ROLE] == "aggregated"
    p = plan(REF_AGG_ROUTER, [pod(REF_AGG_ROUTER, "aggregated", 0), pod(REF_AGG_ROUTER, "router", 0)])
    assert p.service_to_router and cond(p.status, "Ready").status == "True"
    assert plan(REF_PD).service_to_router  # disaggregated: always the router


def test_terminating_pods_do_not_count():
    pods = [pod(REF_PD, "prefill", 0), pod(REF_PD, "decode", 0, deleting=True), pod(REF_PD, "router", 0)]
    st = plan(REF_PD, pods).status
    assert cond(st, "Ready").status == "False"
    assert st.pools["decode"].replicas == 0 and st.pools["decode"].ready_replicas == 0


def test_status_fields_and_phases_through_a_rollout():
    obj = REF_PD
    p1 = plan(obj, [pod(obj, "prefill", 0, ready=False)])
    st = p1.status
    assert st.phase == "Progressing" and st.endpoint == "http://tiny.ns1.svc:8000/v1"
    assert st.resolved_model_uri == URI and st.observed_generation == 1
    assert {k: (v.replicas, v.ready_replicas, v.desired_replicas) for k, v in st.pools.items()} == {
        "prefill": (1, 0, 1), "decode": (0, 0, 1), "router": (0, 0, 1)}
    assert cond(st, "Reconciling").status == "True" and cond(st, "Stalled").status == "False"
    assert [e.reason for e in p1.events] == ["Progressing"]

    obj2 = settle(obj, p1)
    all_ready = [pod(obj, r, 0) for r in ALL_UP]
    p2 = plan(obj2, all_ready, deps=deployments(obj, {}))
    assert p2.status.phase == "Ready" and cond(p2.status, "Ready").status == "True"
    assert cond(p2.status, "Reconciling").status == "False"
    assert [(e.type, e.reason) for e in p2.events] == [("Normal", "Ready")]
    assert p2.requeue_after == 10.0  # decode is autoscaled

    obj3 = settle(obj2, p2)
    p3 = plan(obj3, all_ready, deps=deployments(obj, {}))
    assert p3.events == [] and p3.status.to_wire() == obj3["status"]  # level-based: nothing new

    # the decode pod dies: Degraded (was serving), then back to Ready when the Deployment replaced it
    p4 = plan(obj3, [pod(obj, "prefill", 0), pod(obj, "router", 0)], deps=deployments(obj, {}))
    assert p4.status.phase == "Degraded" and cond(p4.status, "Ready").status == "False"
    assert [(e.type, e.reason) for e in p4.events] == [("Warning", "Degraded")]
    assert "decode" in p4.status.message
    p5 = plan(settle(obj3, p4), all_ready, deps=deployments(obj, {}))
    assert p5.status.phase == "Ready" and [e.reason for e in p5.events] == ["Ready"]


def test_spec_change_is_progressing_while_still_serving():
    ready = settle(REF_PD, plan(REF_PD, [pod(REF_PD, r, 0) for r in ALL_UP], deps=deployments(REF_PD, {})))
    ready = settle(ready, plan(ready, [pod(REF_PD, r, 0) for r in ALL_UP], deps=deployments(REF_PD, {})))
    assert ready["status"]["phase"] == "Ready"
    changed = copy.deepcopy(ready)
    changed["metadata"]["generation"] = 2
    p = plan(changed, [pod(REF_PD, r, 0) for r in ALL_UP], deps=deployments(REF_PD, {}))
    assert p.status.phase == "Progressing" and cond(p.status, "Ready").status == "True"
    assert cond(p.status, "Reconciling").status == "True" and p.status.observed_generation == 2


def test_pod_problems_are_shown():
    bad = pod(REF_PD, "decode", 0, ready=False, initContainerStatuses=[{
        "name": "fetch-model", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "message": "model fetch failed: no objects under s3://x"}}}])
    st = plan(REF_PD, [pod(REF_PD, "prefill", 0), bad, pod(REF_PD, "router", 0)]).status
    assert "init container fetch-model CrashLoopBackOff: model fetch failed: no objects under s3://x" in st.message


def _failing(restarts: int, **state: Any) -> list[dict[str, Any]]:
    return [{"name": "fetch-model", "restartCount": restarts, "state": state}]


@pytest.mark.parametrize(("init_statuses", "stalled"), [
    (_failing(3, terminated={"exitCode": 1, "message": "model fetch failed: no objects under s3://x"}), True),
    (_failing(5, waiting={"reason": "CrashLoopBackOff"}), True),
    (_failing(1, terminated={"exitCode": 1}), False),  # may still be a transient S3 outage
    (_failing(0, waiting={"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}), True),
    (_failing(0, running={}), False),
])
def test_stalled_when_a_pool_cannot_come_up_without_a_change(init_statuses, stalled):
    bad = pod(REF_PD, "decode", 0, ready=False, initContainerStatuses=init_statuses)
    st = plan(REF_PD, [pod(REF_PD, "prefill", 0), bad, pod(REF_PD, "router", 0)]).status
    assert cond(st, "Stalled").status == ("True" if stalled else "False")
    assert cond(st, "Ready").status == "False" and st.phase == "Progressing"
    # a second decode pod that is fine means the pool is not stuck
    ok = pod(REF_PD, "decode", 1, ready=False)
    st = plan(REF_PD, [pod(REF_PD, "prefill", 0), bad, ok, pod(REF_PD, "router", 0)]).status
    assert cond(st, "Stalled").status == "False"


@pytest.mark.parametrize(("source", "phase", "reconciling", "stalled", "event"), [
    (Source(waiting="waiting for PretrainJob base to succeed (model.from; now Running)"), "WaitingForModel",
     "True", "False", ("Normal", "WaitingForModel")),
    (Source(failed="PretrainJob base failed, so model.from has no output"), "Failed", "False", "True",
     ("Warning", "Failed")),
])
def test_model_from_waiting_and_failed(source, phase, reconciling, stalled, event):
    obj = _obj(with_(REF_PD, "spec.model", {"from": {"kind": "PretrainJob", "name": "base"}}))
    p = plan(obj, source=source)
    assert p.status.phase == phase and p.status.message == (source.waiting or source.failed)
    assert cond(p.status, "Ready").status == "False"
    assert cond(p.status, "Reconciling").status == reconciling and cond(p.status, "Stalled").status == stalled
    assert p.status.pools == {} and p.status.endpoint is None and p.replicas == {}
    assert [(e.type, e.reason) for e in p.events] == [event]


def test_model_from_resolved_uri():
    p = plan(REF_PD, source=Source(uri="s3://kubeforge/ckpt/base/final"))
    assert p.status.resolved_model_uri == "s3://kubeforge/ckpt/base/final"


# ---------------------------------------------------------------------------------------------------------
# Autoscaling


def sig(pool: str, in_flight: float = 0, queue: float = 0, replicas: int = 1) -> PoolSignal:
    return PoolSignal(pool=pool, replicas=replicas, in_flight=in_flight, queue_depth=queue)


def test_decode_surge_scales_decode_and_leaves_prefill():
    signals = {"prefill": sig("prefill", in_flight=6, queue=0), "decode": sig("decode", in_flight=5)}
    p = plan(REF_PD, signals=signals)
    assert p.status.pools["decode"].desired_replicas == 3  # ceil(1 * 5/2), max 3
    assert p.status.pools["decode"].last_scale_time == "2026-01-01T12:00:00Z"
    assert p.status.pools["prefill"].desired_replicas == 1 and p.status.pools["prefill"].last_scale_time is None
    assert p.replicas == {"prefill": 1, "decode": 3, "router": 1}
    assert [(e.reason, e.message) for e in p.events if e.reason.startswith("Scaled")] == [
        ("ScaledUp", "decode: 1 -> 3 replicas (in-flight 5.00, target 2)")]


def test_desired_replicas_are_read_from_the_status_and_held_without_data():
    obj = settle(REF_PD, plan(REF_PD, signals={"decode": sig("decode", in_flight=4)}))
    assert obj["status"]["pools"]["decode"]["desiredReplicas"] == 2
    p = plan(obj)  # no scrape this time: hold
    assert p.replicas["decode"] == 2
    p = plan(obj, signals={})  # routers answered, but know nothing of decode: hold
    assert p.replicas["decode"] == 2


def test_lost_status_falls_back_to_the_deployment_size():
    p = plan(REF_PD, deps=deployments(REF_PD, {"decode": 3}))
    assert p.replicas["decode"] == 3 and p.status.pools["decode"].desired_replicas == 3
    assert p.replicas["prefill"] == 1  # not autoscaled: the spec rules


def test_scale_down_waits_for_the_stabilization_window():
    up = settle(REF_PD, plan(REF_PD, signals={"decode": sig("decode", in_flight=6)}))
    assert up["status"]["pools"]["decode"]["desiredReplicas"] == 3
    idle = {"decode": sig("decode", in_flight=0)}
    p = plan(up, signals=idle, now=T0 + timedelta(seconds=30))
    assert p.replicas["decode"] == 3  # within 60 s of the last scale
    p = plan(up, signals=idle, now=T0 + timedelta(seconds=61), recs=p.recommendations)
    assert p.replicas["decode"] == 1 and [e.reason for e in p.events] == ["ScaledDown"]


def test_scale_down_never_below_a_recent_recommendation():
    up = settle(REF_PD, plan(REF_PD, signals={"decode": sig("decode", in_flight=6)}))
    recs = {"decode": [((T0 + timedelta(seconds=50)).timestamp(), 2)]}
    p = plan(up, signals={"decode": sig("decode", in_flight=0)}, now=T0 + timedelta(seconds=70), recs=recs)
    assert p.replicas["decode"] == 2


def test_bounds_and_other_metrics():
    obj = _obj(with_(REF_PD, "spec.prefill", {"replicas": 1, "autoscaling": {
        "minReplicas": 1, "maxReplicas": 4, "metric": "queueDepth", "target": 1}}))
    p = plan(obj, signals={"prefill": sig("prefill", queue=10), "decode": sig("decode", in_flight=100)})
    assert p.replicas["prefill"] == 4 and p.replicas["decode"] == 3
    obj = _obj(with_(REF_PD, "spec.decode.autoscaling.metric", "itl"))
    p = plan(obj, signals={"decode": PoolSignal(pool="decode", itl_recent=5.0)})
    assert p.replicas["decode"] == 3


def test_aggregated_pool_reads_the_routers_decode_pool():
    obj = _obj(with_(REF_AGG_ROUTER, "spec.pool", {"replicas": 1, "autoscaling": {
        "minReplicas": 1, "maxReplicas": 2, "target": 1}}))
    assert sv.read_signals([], parse_spec(obj)) is None
    p = plan(obj, signals={"aggregated": sig("decode", in_flight=3)})
    assert p.replicas["aggregated"] == 2


def test_router_urls_from_ready_router_pods():
    pods = [pod(REF_PD, "router", 0, ip="10.2.0.1"), pod(REF_PD, "router", 1, ready=False, ip="10.2.0.2"),
            pod(REF_PD, "decode", 0, ip="10.2.0.3"), pod(REF_PD, "router", 2, ip="10.2.0.4", deleting=True)]
    assert sv.router_urls(pods, 8000) == ["http://10.2.0.1:8000"]


def test_read_signals_from_a_router_metrics_endpoint():
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from kubeforge.runtime.serve import metrics as m
    from kubeforge.runtime.serve.testing import ThreadServer

    text = (f'{m.R_ENDPOINTS}{{pool="decode"}} 1\n{m.R_IN_FLIGHT}{{pool="decode"}} 3\n'
            f'{m.R_ENDPOINTS}{{pool="prefill"}} 1\n{m.R_QUEUE_DEPTH}{{pool="prefill"}} 2\n')
    app = Starlette(routes=[Route("/metrics", lambda r: Response(text, media_type="text/plain"))])
    srv = ThreadServer(app).start()
    try:
        got = sv.read_signals([srv.url, "http://127.0.0.1:9"], parse_spec(REF_PD))
    finally:
        srv.stop()
    assert got is not None
    assert got["decode"].in_flight == 3 and got["prefill"].queue_depth == 2


# ---------------------------------------------------------------------------------------------------------
# Patches


def _stored(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Deployment as the API server returns it: defaults filled in."""
    out = copy.deepcopy(manifest)
    spec = out["spec"]["template"]["spec"]
    spec.update(dnsPolicy="ClusterFirst", restartPolicy="Always", schedulerName="default-scheduler")
    for c in spec["containers"]:
        c.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
    out["spec"]["progressDeadlineSeconds"] = 600
    return out


def test_deployment_patch_none_when_only_defaults_differ():
    d = children(REF_PD)[("Deployment", "tiny-decode")]
    assert sv.deployment_patch(_stored(d), d) is None


def test_deployment_patch_replicas_only():
    d = children(REF_PD)[("Deployment", "tiny-decode")]
    want = children(REF_PD, {"decode": 3})[("Deployment", "tiny-decode")]
    assert sv.deployment_patch(_stored(d), want) == {"spec": {"replicas": 3}}


def test_deployment_patch_template_change_rolls():
    d = children(REF_PD)[("Deployment", "tiny-decode")]
    obj = _obj(with_(REF_PD, "spec.decode.env", [{"name": "X", "value": "1"}]))
    want = children(obj)[("Deployment", "tiny-decode")]
    patch = sv.deployment_patch(_stored(d), want)
    assert patch["metadata"]["annotations"][sv.HASH_ANNOTATION] == want["metadata"]["annotations"][sv.HASH_ANNOTATION]
    assert patch["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert patch["spec"]["progressDeadlineSeconds"] == 600
    env = patch["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "X", "value": "1"} in env
    assert "replicas" not in patch["spec"]


def test_service_patch():
    svc = children(REF_AGG)[("Service", "one")]
    stored = copy.deepcopy(svc)
    stored["spec"]["clusterIP"] = "10.0.0.1"
    assert sv.service_patch(stored, svc) is None
    want = children(REF_AGG_ROUTER)[("Service", "one")]
    assert sv.service_patch(stored, want) == {"spec": {"selector": {contract.LABEL_ROLE: "router"}}}


# ---------------------------------------------------------------------------------------------------------
# A whole reconcile against an in-memory API


class FakeKube:
    """Like the API server where the reconciler relies on it: every write gets a new resourceVersion, and a
    patch naming another one than the stored object's is refused (409)."""

    def __init__(self, *objs: dict[str, Any]) -> None:
        self.store: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.events: list[tuple[str, str]] = []
        self.version = 0
        for o in objs:
            o = copy.deepcopy(o)
            o["metadata"]["resourceVersion"] = self.next_version()
            self.store[(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])] = o

    def next_version(self) -> str:
        self.version += 1
        return str(self.version)

    @staticmethod
    def _kind(res: Resource) -> str:
        return next(k for k, r in RESOURCES.items() if r == res)

    def get(self, res, ns, name):
        o = self.store.get((self._kind(res), ns, name))
        return copy.deepcopy(o) if o else None

    def list(self, res, ns, selector=None):
        want = dict(kv.split("=") for kv in selector.split(",")) if selector else {}
        return [copy.deepcopy(o) for (k, n, _), o in self.store.items() if k == self._kind(res) and n == ns
                and want.items() <= (o["metadata"].get("labels") or {}).items()]

    def create(self, manifest):
        key = (manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        assert resource_for(manifest) is not None
        if key in self.store:
            return False
        o = copy.deepcopy(manifest)
        o["metadata"]["generation"] = 1
        o["metadata"]["resourceVersion"] = self.next_version()
        self.store[key] = o
        self.calls.append(("create", *key[::2]))
        return True

    def merge_patch(self, res, ns, name, patch, subresource=None):
        key = (self._kind(res), ns, name)

        def merge(a, b):
            if not isinstance(b, dict):
                return b
            a = dict(a) if isinstance(a, dict) else {}
            for k, v in b.items():
                if v is None:
                    a.pop(k, None)
                else:
                    a[k] = merge(a.get(k), v)
            return a

        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != self.store[key]["metadata"]["resourceVersion"]:
            from kubernetes.client.exceptions import ApiException

            raise ApiException(status=409, reason="Conflict")
        self.store[key] = merge(self.store[key], patch)
        self.store[key]["metadata"]["resourceVersion"] = self.next_version()
        self.calls.append(("patch" + (f"/{subresource}" if subresource else ""), key[0], name))
        return copy.deepcopy(self.store[key])

    def delete(self, res, ns, name, grace_seconds=None, uid=None):
        self.calls.append(("delete", self._kind(res), name))
        key = (self._kind(res), ns, name)
        if uid is not None and key in self.store and self.store[key]["metadata"].get("uid") != uid:
            return False
        return self.store.pop(key, None) is not None

    def post_event(self, obj, type_, reason, message):
        self.events.append((type_, reason))

    def served(self, group, version):
        return (group, version) == ("policy", "v1")

    def serves(self, res, ns):  # no Kueue here
        return False


def test_reconcile_creates_then_converges_then_rolls():
    kube = FakeKube(REF_PD)
    r = Reconciler(kube, SETTINGS, clock=lambda: T0)  # type: ignore[arg-type]
    assert r.reconcile("InferenceDeployment", "ns1", "tiny") == 2.0
    created = sorted((k, n) for op, k, n in kube.calls if op == "create")
    assert created == sorted([("Deployment", "tiny-decode"), ("Deployment", "tiny-prefill"),
                              ("Deployment", "tiny-router"), ("PodDisruptionBudget", "tiny-decode"),
                              ("PodDisruptionBudget", "tiny-prefill"), ("PodDisruptionBudget", "tiny-router"),
                              ("Role", "tiny-router"), ("RoleBinding", "tiny-router"),
                              ("NetworkPolicy", "tiny-engines"), ("Secret", "tiny-kv-token"),
                              ("Service", "tiny"), ("ServiceAccount", "tiny-router")])
    assert kube.events == [("Normal", "Progressing")]
    st = kube.store[("InferenceDeployment", "ns1", "tiny")]["status"]
    assert st["phase"] == "Progressing" and st["readyPools"] == "0/2"

    kube.calls.clear()
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    assert [c for c in kube.calls if c[0] != "patch/status"] == []  # idempotent: no writes to children

    # a spec change rolls the changed pool only
    obj = kube.store[("InferenceDeployment", "ns1", "tiny")]
    obj["spec"]["decode"]["env"] = [{"name": "X", "value": "1"}]
    obj["metadata"]["generation"] = 2
    kube.calls.clear()
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    assert [c for c in kube.calls if c[0] == "patch"] == [("patch", "Deployment", "tiny-decode")]


def test_reconcile_creates_the_kv_token_once_and_renders_it_nowhere():
    kube = FakeKube(REF_PD)
    r = Reconciler(kube, SETTINGS, clock=lambda: T0)  # type: ignore[arg-type]
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    secret = kube.store[("Secret", "ns1", "tiny-kv-token")]
    token = secret["stringData"][contract.KV_TOKEN_SECRET_KEY]
    assert len(token) >= 40 and secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    assert kube.store[("Secret", "ns1", "tiny-kv-token")]["stringData"][contract.KV_TOKEN_SECRET_KEY] == token
    # the value is in the Secret only: not in a Deployment, the status, an event or another object
    for key, o in kube.store.items():
        if key[0] != "Secret":
            assert token not in json.dumps(o), key
    assert all(token not in reason for _, reason in kube.events)
    other = FakeKube(REF_PD)
    Reconciler(other, SETTINGS, clock=lambda: T0).reconcile("InferenceDeployment", "ns1", "tiny")  # type: ignore[arg-type]
    assert other.store[("Secret", "ns1", "tiny-kv-token")]["stringData"]["token"] != token  # random, per object


def test_reconcile_waits_for_model_from_and_creates_nothing():
    obj = _obj(with_(REF_PD, "spec.model", {"from": {"kind": "PretrainJob", "name": "base"}}))
    kube = FakeKube(obj)
    r = Reconciler(kube, SETTINGS, clock=lambda: T0)  # type: ignore[arg-type]
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    assert [c for c in kube.calls if c[0] == "create"] == []
    st = kube.store[("InferenceDeployment", "ns1", "tiny")]["status"]
    assert st["phase"] == "WaitingForModel" and "PretrainJob base to exist" in st["message"]
    # the job succeeds: its output is served
    kube.store[("PretrainJob", "ns1", "base")] = {
        "kind": "PretrainJob", "metadata": {"name": "base", "namespace": "ns1"},
        "status": {"phase": "Succeeded", "output": {"uri": "s3://kubeforge/ckpt/base/final"}}}
    r.reconcile("InferenceDeployment", "ns1", "tiny")
    dep = kube.store[("Deployment", "ns1", "tiny-decode")]
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][3] == "s3://kubeforge/ckpt/base/final"
    assert kube.store[("InferenceDeployment", "ns1", "tiny")]["status"]["resolvedModelUri"] == \
        "s3://kubeforge/ckpt/base/final"


def test_reconcile_router_switched_off_deletes_its_deployment():
    kube = FakeKube(REF_AGG_ROUTER)
    r = Reconciler(kube, SETTINGS, clock=lambda: T0)  # type: ignore[arg-type]
    r.reconcile("InferenceDeployment", "ns1", "one")
    assert ("Deployment", "ns1", "one-router") in kube.store
    assert ("PodDisruptionBudget", "ns1", "one-router") in kube.store
    kube.store[("InferenceDeployment", "ns1", "one")]["spec"]["router"] = {"enabled": False}
    r.reconcile("InferenceDeployment", "ns1", "one")
    assert ("Deployment", "ns1", "one-router") not in kube.store
    assert ("PodDisruptionBudget", "ns1", "one-router") not in kube.store  # its budget goes with it
    assert ("PodDisruptionBudget", "ns1", "one") in kube.store
    svc = kube.store[("Service", "ns1", "one")]
    assert svc["spec"]["selector"][contract.LABEL_ROLE] == "aggregated"


# ---------------------------------------------------------------------------------------------------------
# Model fetch (the init container) against a real S3 server


def test_fetch_downloads_then_skips_present_files(s3_client, bucket, tmp_path, capsys):
    from kubeforge.runtime import fetch

    files = {"config.json": b"{}", "model.safetensors": b"x" * 5000, "sub/tokenizer.json": b"{\"a\": 1}"}
    for k, v in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"models/tiny/{k}", Body=v)
    s3_client.put_object(Bucket=bucket, Key="models/tiny-other/config.json", Body=b"no")
    dest = tmp_path / "m"
    got = fetch.fetch(f"s3://{bucket}/models/tiny", dest, client=s3_client)
    assert got == {"objects": 3, "downloaded": 3, "kept": 0, "bytes": sum(map(len, files.values()))}
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    (dest / "model.safetensors").write_bytes(b"short")  # a partial file from an earlier pod
    got = fetch.fetch(f"s3://{bucket}/models/tiny/", dest, client=s3_client)
    assert (got["downloaded"], got["kept"]) == (1, 2)
    assert (dest / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_fetch_cli_fails_clearly(s3_env, bucket, tmp_path, capsys, monkeypatch):
    from kubeforge.runtime import fetch

    monkeypatch.setenv("KUBEFORGE_TERMINATION_LOG", str(tmp_path / "term"))
    assert fetch.main([f"s3://{bucket}/models/missing", str(tmp_path / "m")]) == fetch.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"model fetch failed: no objects under s3://{bucket}/models/missing" in err
    assert (tmp_path / "term").read_text().startswith("model fetch failed")
    assert fetch.main(["s3://no-such-bucket-kf/models/x", str(tmp_path / "m")]) == fetch.EXIT_FAILED
    assert "NoSuchBucket" in capsys.readouterr().err


def test_fetch_materialises_model_tokenizer_for_the_engine(s3_env, bucket, tmp_path, capsys, monkeypatch):
    """A model exported without tokenizer files, served with model.tokenizer from S3 or built in: the init
    container's CLI puts both in place and the reference engine encodes with the given tokenizer."""
    from kubeforge.runtime import fetch
    from kubeforge.runtime.serve.engine import Engine
    from kubeforge.runtime.tinymodel import byte_tokenizer, save_tiny_model
    from kubeforge.storage import make_client

    client = make_client()
    src = save_tiny_model(tmp_path / "export", seed=1)
    for f in src.iterdir():
        key = "tokenizers/byte" if f.name.startswith(("tokenizer", "special_tokens")) else "models/bare"
        client.upload_file(str(f), bucket, f"{key}/{f.name}")
    monkeypatch.setenv("KUBEFORGE_TERMINATION_LOG", str(tmp_path / "term"))

    for source in (f"s3://{bucket}/tokenizers/byte", "builtin:byte"):
        dest, tok_dir = tmp_path / source.split(":")[0] / "m", tmp_path / source.split(":")[0] / ".tokenizer"
        assert fetch.main([f"s3://{bucket}/models/bare", str(dest), "--tokenizer", source,
                           "--tokenizer-dir", str(tok_dir)]) == 0
        assert not list(dest.glob("tokenizer*")) and (dest / "config.json").is_file()
        engine = Engine(str(dest), "bare", tokenizer_dir=str(tok_dir))
        text = "kubeforge \u00e9"
        assert engine.tokenizer(text, add_special_tokens=False)["input_ids"] == list(text.encode())
        assert engine.tokenizer.get_vocab() == byte_tokenizer().get_vocab()

    assert fetch.main([f"s3://{bucket}/models/bare", str(tmp_path / "x"), "--tokenizer", "builtin:nope",
                       "--tokenizer-dir", str(tmp_path / "t")]) == fetch.EXIT_FAILED
    assert "tokenizer fetch failed: unknown built-in tokenizer 'nope' (known: byte)" in capsys.readouterr().err
    assert fetch.main([f"s3://{bucket}/models/bare", str(tmp_path / "x"), "--tokenizer",
                       f"s3://{bucket}/tokenizers/none", "--tokenizer-dir", str(tmp_path / "t")]) == fetch.EXIT_FAILED
    assert (tmp_path / "term").read_text() == \
        f"tokenizer fetch failed: no objects under s3://{bucket}/tokenizers/none " \
        "(wrong URI, or the tokenizer was not exported there)"
