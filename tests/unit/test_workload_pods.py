"""Pods the operator renders, from objects as the API server stores them (CRD defaults applied): images
from the operator's settings (the chart's values), Pod Security "restricted", private registries, no
writes to the image's root filesystem."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from builders import inference_deployment, pretrain_job, with_
from kubeforge.api.validation import parse_spec, validate
from kubeforge.controller import serving as sv
from kubeforge.controller.torchrun import TorchrunGang
from kubeforge.settings import OperatorSettings
from stored import as_stored

ROOT = Path(__file__).resolve().parents[2]
URI = "s3://kubeforge/models/tiny"
MIRROR = OperatorSettings(
    trainer_image="mirror.corp/ml/trainer:0.1.0", serve_image="mirror.corp/ml/vllm-serve:0.1.0",
    router_image="mirror.corp/ml/router:0.1.0", image_pull_secrets=["corp-registry"],
)


def _stored(obj: dict[str, Any]) -> dict[str, Any]:
    obj = as_stored(obj)
    obj["metadata"].update(uid="uid-1", generation=1, namespace="team-a")
    assert validate(obj) == [], validate(obj)
    return obj


def training_pods(obj: dict[str, Any], settings: OperatorSettings = MIRROR) -> list[dict[str, Any]]:
    spec = parse_spec(obj)
    gang = TorchrunGang(obj=obj, resources=spec.resources, scheduling=spec.scheduling,
                        module="kubeforge.runtime.pretrain", resolved_spec=spec.to_wire(), secret_name=None,
                        s3_endpoint=None, default_image=settings.trainer_image,
                        image_pull_secrets=tuple(settings.image_pull_secrets))
    return gang.pods(0, {}, "builtin")


def serving_pod_specs(obj: dict[str, Any], settings: OperatorSettings = MIRROR) -> dict[str, dict[str, Any]]:
    children = sv.desired_children(obj, parse_spec(obj), URI, settings)
    return {m["metadata"]["name"]: m["spec"]["template"]["spec"] for m in children if m["kind"] == "Deployment"}


VLLM_PD = inference_deployment("llm")
REFERENCE = {**inference_deployment("ref"), "spec": {
    "model": {"uri": URI}, "engine": "reference", "mode": "aggregated", "pool": {"replicas": 1},
    "router": {"enabled": True}}}


# --- images ------------------------------------------------------------------------------------------------
def test_stored_objects_keep_no_image_so_the_operators_images_apply():
    assert "image" not in as_stored(pretrain_job())["spec"]["resources"]
    assert "image" not in as_stored(VLLM_PD)["spec"]["prefill"]


def test_vllm_pools_of_a_stored_object_run_the_serve_image():
    specs = serving_pod_specs(_stored(VLLM_PD))
    for name in ("llm-prefill", "llm-decode"):
        assert specs[name]["containers"][0]["image"] == MIRROR.serve_image
        assert specs[name]["initContainers"][0]["image"] == MIRROR.serve_image
    assert specs["llm-router"]["containers"][0]["image"] == MIRROR.router_image


def test_reference_pools_run_the_trainer_image_and_an_explicit_image_wins():
    assert serving_pod_specs(_stored(REFERENCE))["ref"]["containers"][0]["image"] == MIRROR.trainer_image
    own = _stored(with_(VLLM_PD, "spec.prefill.image", "mine/vllm:1"))
    assert serving_pod_specs(own)["llm-prefill"]["containers"][0]["image"] == "mine/vllm:1"


def test_training_pods_of_a_stored_object_run_the_operators_trainer_image():
    pods = training_pods(_stored(pretrain_job()))
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {MIRROR.trainer_image}
    own = training_pods(_stored(with_(pretrain_job(), "spec.resources.image", "mine/trainer:2")))
    assert {p["spec"]["containers"][0]["image"] for p in own} == {"mine/trainer:2"}


# --- Pod Security "restricted", pull secrets, scratch ---------------------------------------------------------
def _all_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    out = [(p["metadata"]["name"], p["spec"]) for p in training_pods(_stored(pretrain_job()))]
    out += list(serving_pod_specs(_stored(VLLM_PD)).items()) + list(serving_pod_specs(_stored(REFERENCE)).items())
    return out


def _restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """The checks of Pod Security admission's "restricted" level (v1.30+) that a pod spec decides."""
    out = []
    psc = pod_spec.get("securityContext") or {}
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append("pod seccompProfile")
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            out.append(f"{c['name']}: capabilities.drop ALL")
        if set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities.add")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if (sc.get("runAsUser", psc.get("runAsUser")) or 0) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
    for v in pod_spec.get("volumes", []):
        if "hostPath" in v:
            out.append(f"volume {v['name']}: hostPath")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        out.append("host namespaces")
    return out


def test_every_workload_pod_meets_pod_security_restricted():
    for name, spec in _all_pod_specs():
        assert _restricted_violations(spec) == [], name


def test_every_workload_pod_pulls_with_the_configured_secrets():
    for name, spec in _all_pod_specs():
        assert spec.get("imagePullSecrets") == [{"name": "corp-registry"}], name
    plain = serving_pod_specs(_stored(VLLM_PD), OperatorSettings())
    assert all("imagePullSecrets" not in s for s in plain.values())


def test_workload_containers_write_to_an_emptydir_not_the_root_filesystem():
    for name, spec in _all_pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for var in ("KUBEFORGE_WORKDIR", "HF_HOME"):
                path = env.get(var)
                assert path, f"{name}/{c['name']}: {var} unset"
                mount = next((m for m in mounts if path.startswith(m.rstrip("/") + "/")), None)
                assert mount is not None and "emptyDir" in volumes[mounts[mount]], f"{name}/{c['name']}: {var}"


def test_stored_defaults_do_not_change_a_copy():
    obj = pretrain_job()
    before = copy.deepcopy(obj)
    as_stored(obj)
    assert obj == before
