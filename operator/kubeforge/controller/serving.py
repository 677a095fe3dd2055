"""InferenceDeployment: engine pools, a router and a Service, kept in step with the spec.

Children (deterministic names, kubeforge labels, owned by the InferenceDeployment):

  aggregated                           disaggregated
  Deployment <name>       (pool)       Deployment <name>-prefill, <name>-decode
  Deployment <name>-router (if         Deployment <name>-router
             router.enabled)
  Service    <name>  -> router pods when there is a router, else straight to the pool (no extra hop);
                        an aggregated pool's router takes the Service over once a router pod is ready
  ServiceAccount/Role/RoleBinding <name>-router: list/watch pods in the namespace (router discovery)
  Secret     <name>-kv-token: the deployment's own random token, created once by the operator (which may
                        create Secrets but never read one); engines and router get it by secretKeyRef.
                        Engines answer /kv/* (KV-cache hand-off), /kubeforge/v1/* and kv_transfer_params
                        only with it; the router and decode engines send it
  NetworkPolicy <name>-engines (disaggregated): the engine pods take connections only from this
                        deployment's own pods (router, prefill, decode); clients reach them through the
                        router. Enforced by the cluster's network plugin, where it has one
  PodDisruptionBudget per Deployment (same name): maxUnavailable 1, so a node drain or a cluster
                        autoscaler scale-down evicts a pool's pods one at a time (policy/v1, or v1beta1 on
                        servers older than 1.21)

Why Deployments (not StatefulSets, not bare pods): an engine replica is stateless. It fetches the model from
S3 into its own volume (an init container) and holds nothing another replica needs, so pods need neither
stable names nor ordered start-up; the router finds them through the Kubernetes API by label, not by DNS.
A Deployment gives exactly what serving wants: a rolling update with maxUnavailable=0 / maxSurge=1, so a
new pod is Ready before an old one gets SIGTERM and the endpoint never drops; a `replicas` field the
autoscaler sets; and self-healing when a pod or node dies. Engines drain on SIGTERM (the reference engine
stops taking work, finishes what is in flight and hands off pending KV caches; vLLM's server waits for
open requests), and terminationGracePeriodSeconds covers the drain.

Reconcile, as for every kind: read (the object, the model.from source, our Deployments and pods, and, for
autoscaled pools, the router's /metrics) -> pure `plan_serving` (status, replicas per pool, events) and pure
`desired_children` -> apply the difference (create, or merge-patch a Deployment whose template hash or
replicas differ) -> ONE status write -> events after it.

Autoscaling memory lives in the status (`pools[*].desiredReplicas`, `lastScaleTime`): the planner reads the
current size from there, so an operator restart neither resets nor flaps the pools. The HPA-style
scale-down window additionally remembers recent raw recommendations in this process only; losing them on
a restart can only delay a scale-down, never cause one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubeforge import contract
from kubeforge.api.kinds import InferenceDeploymentSpec, Pool
from kubeforge.api.status import READY, PoolStatus, ServedModel, ServingStatus
from kubeforge.api.validation import parse_spec
from kubeforge.runtime.serve import autoscale as asc
from kubeforge.settings import OperatorSettings

from . import pods as podutil
from . import vllm
from .children import (
    downward_env,
    job_labels,
    metadata,
    own_pods_only_policy,
    placement,
    resources_block,
    s3_env,
    selector,
    selector_labels,
)
from .conditions import find, parse_time, rfc3339, set_kstatus
from .kube import RESOURCES, resource_for
from .lineage import SOURCE_FAILED, Source
from .podsecurity import harden
from .reconciler import merge_patch_diff
from .training import Event

log = logging.getLogger(__name__)

AGGREGATED, PREFILL, DECODE, ROUTER = "aggregated", "prefill", "decode", "router"
ENGINE_ROLE = {AGGREGATED: "both", PREFILL: "prefill", DECODE: "decode"}
# The router names its pools prefill and decode; an aggregated pool is its only (decode) pool.
ROUTER_POOL = {AGGREGATED: DECODE, PREFILL: PREFILL, DECODE: DECODE}

MODEL_VOLUME, MODEL_ROOT = "model", "/models"
SHM_VOLUME = "dshm"
FETCH_CONTAINER = "fetch-model"
HASH_ANNOTATION = "kubeforge.dev/template-hash"
REFERENCE_DRAIN_S = 30  # the engines' --drain-timeout
ROUTER_DRAIN_S = 30
METRIC = {"queueDepth": "queue-depth", "inFlight": "in-flight", "ttft": "ttft", "itl": "itl"}
SCRAPE_TIMEOUT_S = 1.0


# ---------------------------------------------------------------------------------------------------------
# Names and shape


def engine_pools(spec: InferenceDeploymentSpec) -> dict[str, Pool]:
    """Engine pools by kubeforge pool name (validation guarantees the right ones are set)."""
    if spec.mode == "aggregated":
        return {AGGREGATED: spec.pool} if spec.pool is not None else {}
    return {k: p for k, p in ((PREFILL, spec.prefill), (DECODE, spec.decode)) if p is not None}


def router_enabled(spec: InferenceDeploymentSpec) -> bool:
    return spec.mode == "disaggregated" or spec.router.enabled is True


def pool_names(spec: InferenceDeploymentSpec) -> list[str]:
    return [*engine_pools(spec), *([ROUTER] if router_enabled(spec) else [])]


def deployment_name(obj: dict[str, Any], pool: str) -> str:
    name = str(obj["metadata"]["name"])
    return name if pool == AGGREGATED else f"{name}-{pool}"


def service_name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def router_account(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['name']}-router"


def kv_token_secret_name(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['name']}-kv-token"


def network_policy_name(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['name']}-engines"


def served_name(obj: dict[str, Any], spec: InferenceDeploymentSpec) -> str:
    return spec.served_model_name or str(obj["metadata"]["name"])


def model_dir(obj: dict[str, Any]) -> str:
    return f"{MODEL_ROOT}/{obj['metadata']['name']}"


def tokenizer_dir(spec: InferenceDeploymentSpec) -> str | None:
    """Where the init container puts model.tokenizer (a name no object can have); None: the model's own."""
    return f"{MODEL_ROOT}/.tokenizer" if spec.model.tokenizer is not None else None


def tokenizer_source(spec: InferenceDeploymentSpec) -> str | None:
    """model.tokenizer as the fetch CLI's --tokenizer: an s3:// URI or builtin:<name>."""
    tok = spec.model.tokenizer
    if tok is None:
        return None
    return tok.uri or f"builtin:{tok.builtin}"


def endpoint(obj: dict[str, Any], spec: InferenceDeploymentSpec) -> str:
    return f"http://{service_name(obj)}.{obj['metadata']['namespace']}.svc:{spec.port}/v1"


def spec_replicas(spec: InferenceDeploymentSpec, pool: str) -> int:
    """Replicas from the spec alone: router.replicas, or the pool's replicas (the autoscaler's start)."""
    if pool == ROUTER:
        return spec.router.replicas
    return engine_pools(spec)[pool].replicas


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Desired children (pure)


def _image(pool: Pool, engine: str, settings: OperatorSettings) -> str:
    """The pool's image, else the operator's for the engine (the CRD defaults none, so this holds for
    objects as the API server stores them)."""
    if pool.image:
        return pool.image
    return settings.serve_image if engine == "vllm" else settings.trainer_image


def _common_env(obj: dict[str, Any]) -> list[dict[str, Any]]:
    meta = obj["metadata"]
    return [
        {"name": contract.ENV_JOB, "value": f"{meta['namespace']}/{meta['name']}"},
        {"name": contract.ENV_JOB_KIND, "value": obj["kind"]},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *downward_env(),
    ]


def kv_token_env(obj: dict[str, Any]) -> dict[str, Any]:
    """The deployment's token, by reference: its value is never in a pod spec, a status or a log."""
    return {"name": contract.ENV_KV_TOKEN, "valueFrom": {"secretKeyRef": {
        "name": kv_token_secret_name(obj), "key": contract.KV_TOKEN_SECRET_KEY}}}


def kv_token_secret(obj: dict[str, Any], token: str) -> dict[str, Any]:
    """The Secret holding the deployment's token (created once; its value is random, so it is not part of
    the pure desired_children)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(obj, kv_token_secret_name(obj)),
        "type": "Opaque",
        "stringData": {contract.KV_TOKEN_SECRET_KEY: token},
    }


def new_kv_token() -> str:
    return secrets.token_urlsafe(32)


def fetch_container(
    obj: dict[str, Any], spec: InferenceDeploymentSpec, uri: str, image: str, python: str
) -> dict[str, Any]:
    """Init container: copy the model (and model.tokenizer, when set) from S3 into the pod's model volume
    before the engine starts. The only container that sees the S3 credentials."""
    secret = spec.model.secret_ref.name if spec.model.secret_ref else None
    env, env_from = s3_env(secret, None)
    command = [python, "-m", "kubeforge.runtime.fetch", uri, model_dir(obj)]
    if (source := tokenizer_source(spec)) is not None:
        command += ["--tokenizer", source, "--tokenizer-dir", str(tokenizer_dir(spec))]
    container: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": command,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *env],
        "volumeMounts": [{"name": MODEL_VOLUME, "mountPath": MODEL_ROOT}],
    }
    if env_from:
        container["envFrom"] = env_from
    return container


def reference_command(
    obj: dict[str, Any], spec: InferenceDeploymentSpec, pool: Pool, role: str, python: str
) -> list[str]:
    """The reference engine's CLI (kubeforge.runtime.serve.engine)."""
    argv = [
        python, "-m", "kubeforge.runtime.serve.engine",
        "--model", model_dir(obj),
        "--served-model-name", served_name(obj, spec),
        "--host", f"$({contract.ENV_POD_IP})",  # pods may share a network namespace (dev cluster)
        "--port", str(spec.port),
        "--role", role,
        "--engine-id", f"$({contract.ENV_POD_NAME})",
        "--kv-load-failure-policy", spec.kv_transfer.failure_policy,
        "--drain-timeout", str(REFERENCE_DRAIN_S),
    ]
    if (tok := tokenizer_dir(spec)) is not None:
        argv += ["--tokenizer", tok]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    return argv + list(pool.extra_args)


def reference_probes() -> dict[str, Any]:
    """Same endpoints as vLLM; a CPU engine loads in seconds, so probes are tighter."""
    return {
        "startupProbe": vllm.http_probe("/v1/models", 2, 150, timeout=5),
        "livenessProbe": vllm.http_probe("/health", 10, 3),
        "readinessProbe": vllm.http_probe("/v1/models", 2, 3, timeout=5),
    }


def engine_deployment(
    obj: dict[str, Any], spec: InferenceDeploymentSpec, pool_name: str, pool: Pool, uri: str,
    settings: OperatorSettings, replicas: int,
) -> dict[str, Any]:
    role = ENGINE_ROLE[pool_name]
    image = _image(pool, spec.engine, settings)
    user_env = [{"name": e.name, "value": e.value} for e in pool.env]
    volumes: list[dict[str, Any]] = [{"name": MODEL_VOLUME, "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": MODEL_VOLUME, "mountPath": MODEL_ROOT, "readOnly": True}]
    if spec.engine == "vllm":
        container: dict[str, Any] = {
            "name": "engine",
            "image": image,
            "command": vllm.vllm_command(spec, pool, role, model_dir(obj), served_name(obj, spec),
                                          tokenizer_dir(spec)),
            "env": [*_common_env(obj), *vllm.vllm_env(spec, role), *user_env],
            "ports": vllm.vllm_ports(spec, role),
            "resources": resources_block(pool, default_gpus=pool.tensor_parallel),
            "lifecycle": vllm.pre_stop(),
            **vllm.vllm_probes(),
        }
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        grace = vllm.GRACE_SECONDS
    else:
        container = {
            "name": "engine",
            "image": image,
            "command": reference_command(obj, spec, pool, role, settings.python),
            "env": [*_common_env(obj), kv_token_env(obj), *user_env],
            "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
            "resources": resources_block(pool),
            "lifecycle": vllm.pre_stop(),
            **reference_probes(),
        }
        grace = vllm.PRESTOP_SLEEP_S + REFERENCE_DRAIN_S + 10
    container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {
        "initContainers": [fetch_container(obj, spec, uri, image, settings.python)],
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,  # engines never talk to the API server
        **placement(pool),
    }
    harden(pod_spec, settings.image_pull_secrets)
    # a big model may load for as long as the startup probe allows; the rollout deadline leaves room for it
    deadline = vllm.STARTUP_PERIOD_S * vllm.STARTUP_FAILURES + 600 if spec.engine == "vllm" else 600
    return _deployment(obj, deployment_name(obj, pool_name), pool_name, pod_spec, replicas, deadline)


def router_deployment(
    obj: dict[str, Any], spec: InferenceDeploymentSpec, settings: OperatorSettings, replicas: int
) -> dict[str, Any]:
    ns = obj["metadata"]["namespace"]
    r = spec.router
    argv = [
        settings.python, "-m", "kubeforge.runtime.serve.router",
        "--host", f"$({contract.ENV_POD_IP})",
        "--port", str(spec.port),
        "--k8s-namespace", ns,
    ]
    if spec.mode == "disaggregated":
        argv += ["--k8s-prefill-selector", selector(obj, PREFILL), "--k8s-decode-selector", selector(obj, DECODE)]
    else:
        argv += ["--k8s-decode-selector", selector(obj, AGGREGATED)]
    argv += [
        "--k8s-port", str(spec.port),
        "--prefill-threshold-tokens", str(r.prefill_threshold_tokens),
        "--picking", r.picking,
        "--drain-timeout", str(ROUTER_DRAIN_S),
        "--request-timeout", f"{r.request_timeout_seconds:g}",
        "--stream-timeout", f"{r.stream_timeout_seconds:g}",
        "--max-in-flight", str(r.max_in_flight),
    ]
    container = {
        "name": "router",
        "image": r.image or settings.router_image,
        "command": argv,
        "env": [*_common_env(obj), kv_token_env(obj)],
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
        "readinessProbe": vllm.http_probe("/ready", 2, 3, timeout=5),
        "livenessProbe": vllm.http_probe("/health", 10, 3),
    }
    pod_spec = {
        "serviceAccountName": router_account(obj),
        "containers": [container],
        "terminationGracePeriodSeconds": ROUTER_DRAIN_S + 10,
    }
    harden(pod_spec, settings.image_pull_secrets)
    return _deployment(obj, deployment_name(obj, ROUTER), ROUTER, pod_spec, replicas)


# Deployment spec fields kubeforge owns besides replicas; their hash (with the template's) gates updates.
ROLLOUT_FIELDS = ("strategy", "progressDeadlineSeconds", "revisionHistoryLimit", "template")


def _deployment(obj: dict[str, Any], name: str, pool: str, pod_spec: dict[str, Any], replicas: int,
                progress_deadline_s: int = 600) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "replicas": replicas,
        "selector": {"matchLabels": selector_labels(obj, pool)},
        # a new pod is Ready before an old one is stopped: the endpoint never drops during a rollout
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "progressDeadlineSeconds": progress_deadline_s,
        "revisionHistoryLimit": 3,
        "template": {"metadata": {"labels": job_labels(obj, pool)}, "spec": pod_spec},
    }
    meta = metadata(obj, name, pool)
    meta["annotations"] = {HASH_ANNOTATION: template_hash({k: spec[k] for k in ROLLOUT_FIELDS})}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def service(obj: dict[str, Any], spec: InferenceDeploymentSpec, to_router: bool | None = None) -> dict[str, Any]:
    """The endpoint clients use; targetPort == port (also what the dev cluster's DNS-only Services need).

    It selects the router pods when there is a router (`to_router`, default: whenever one is enabled); an
    aggregated pool whose router is switched on keeps the Service on the pool until a router pod is ready,
    so the endpoint never points at nothing.
    """
    to_router = router_enabled(spec) if to_router is None else to_router
    target = ROUTER if to_router else AGGREGATED
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(obj, service_name(obj)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(obj, target),
            "ports": [{"name": "http", "port": spec.port, "targetPort": spec.port, "protocol": "TCP"}],
        },
    }


def disruption_budget(obj: dict[str, Any], pool: str, api_version: str) -> dict[str, Any]:
    """At most one pod of a pool evicted at a time (node drains, cluster autoscaler scale-downs), so a drain
    never takes a whole pool, and with it the endpoint, down at once. A single-replica pool stays evictable."""
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": metadata(obj, deployment_name(obj, pool), pool),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(obj, pool)}},
    }


def network_policy(obj: dict[str, Any]) -> dict[str, Any]:
    """Disaggregated engines take connections (any port: HTTP, /kv/*, vLLM's KV side channel) only from the
    deployment's own pods."""
    return own_pods_only_policy(obj, network_policy_name(obj), None, {
        "matchLabels": selector_labels(obj),
        "matchExpressions": [{"key": contract.LABEL_ROLE, "operator": "In", "values": [PREFILL, DECODE]}],
    })


def router_rbac(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The router watches the pools' pods: get/list/watch pods in this namespace, nothing else."""
    account = router_account(obj)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(obj, account, ROUTER)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(obj, account, ROUTER),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(obj, account, ROUTER),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": obj["metadata"]["namespace"]}],
        },
    ]


def desired_children(
    obj: dict[str, Any], spec: InferenceDeploymentSpec, resolved_uri: str, settings: OperatorSettings,
    replicas: Mapping[str, int] | None = None, service_to_router: bool | None = None,
    pdb_api_version: str | None = "policy/v1",
) -> list[dict[str, Any]]:
    """Every child of the InferenceDeployment; `replicas` per pool overrides the spec (the autoscaler),
    `service_to_router` where the Service points (see `service`), `pdb_api_version` the PodDisruptionBudget
    version the cluster serves (None: render none)."""
    replicas = replicas or {}
    out: list[dict[str, Any]] = []
    if router_enabled(spec):
        out += router_rbac(obj)
    pools = list(engine_pools(spec))
    for name, pool in engine_pools(spec).items():
        n = replicas.get(name, spec_replicas(spec, name))
        out.append(engine_deployment(obj, spec, name, pool, resolved_uri, settings, n))
    if router_enabled(spec):
        out.append(router_deployment(obj, spec, settings, replicas.get(ROUTER, spec_replicas(spec, ROUTER))))
        pools.append(ROUTER)
    if pdb_api_version:
        out += [disruption_budget(obj, pool, pdb_api_version) for pool in pools]
    if spec.mode == "disaggregated":  # there the Service always points at the router, never at an engine
        out.append(network_policy(obj))
    out.append(service(obj, spec, service_to_router))
    return out


def pdb_api_version(kube: Any) -> str | None:
    """The PodDisruptionBudget apiVersion the cluster serves, or None."""
    for version in ("v1", "v1beta1"):
        if kube.served("policy", version):
            return f"policy/{version}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Applying (pure patches + a thin apply)


def deployment_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch bringing an existing Deployment to the desired one, or None.

    The pod template (and the rollout settings) are compared by the hash annotation only (the API server fills in defaults, so a field
    by field comparison would patch forever); when it differs, the patch turns the stored template into
    the desired one exactly (fields we dropped are removed). Replicas are compared as they are.
    """
    patch: dict[str, Any] = {}
    want = desired["metadata"]["annotations"][HASH_ANNOTATION]
    have = (current["metadata"].get("annotations") or {}).get(HASH_ANNOTATION)
    if want != have:
        patch["metadata"] = {"annotations": {HASH_ANNOTATION: want}}
        spec_patch: dict[str, Any] = {k: desired["spec"][k] for k in ROLLOUT_FIELDS if k != "template"}
        tpl = merge_patch_diff(current["spec"].get("template") or {}, desired["spec"]["template"])
        if tpl is not None:
            spec_patch["template"] = tpl
        patch["spec"] = spec_patch
    if current["spec"].get("replicas") != desired["spec"]["replicas"]:
        patch.setdefault("spec", {})["replicas"] = desired["spec"]["replicas"]
    return patch or None


def service_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
    """Selector and ports of an existing Service, when they differ (e.g. the router was switched on)."""
    cur, want = current.get("spec") or {}, desired["spec"]
    patch: dict[str, Any] = {}
    sel = merge_patch_diff(cur.get("selector") or {}, want["selector"])
    if sel is not None:
        patch["selector"] = sel
    have_ports = [{k: p.get(k) for k in ("name", "port", "targetPort", "protocol")} for p in cur.get("ports") or []]
    if have_ports != want["ports"]:
        patch["ports"] = want["ports"]
    return {"spec": patch} if patch else None


def _apply(reconciler: Any, obj: dict[str, Any], children: list[dict[str, Any]],
           deployments: Mapping[str, dict[str, Any]]) -> None:
    kube = reconciler.kube
    ns = obj["metadata"]["namespace"]
    for manifest in children:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if kind == "Deployment":
            current = deployments.get(name)
            if current is None:
                if kube.create(manifest):
                    continue
                current = kube.get(RESOURCES["Deployment"], ns, name)
                if current is None:
                    continue
            patch = deployment_patch(current, manifest)
            if patch is not None:
                log.info("updating Deployment %s/%s: %s", ns, name, sorted(patch.get("spec", {})))
                kube.merge_patch(RESOURCES["Deployment"], ns, name, patch)
        elif kind == "Service":
            if kube.create(manifest):
                continue
            current = kube.get(RESOURCES["Service"], ns, name)
            patch = service_patch(current, manifest) if current is not None else None
            if patch is not None:
                kube.merge_patch(RESOURCES["Service"], ns, name, patch)
        elif kind == "NetworkPolicy":
            if not kube.create(manifest):
                current = kube.get(RESOURCES["NetworkPolicy"], ns, name)
                if current is not None and current.get("spec") != manifest["spec"]:
                    kube.merge_patch(RESOURCES["NetworkPolicy"], ns, name, {"spec": manifest["spec"]})
        elif not kube.create(manifest) and kind == "Role":  # exists: keep its rules ours, patch only a diff
            current = kube.get(RESOURCES["Role"], ns, name)
            if current is not None and current.get("rules") != manifest["rules"]:
                kube.merge_patch(RESOURCES["Role"], ns, name, {"rules": manifest["rules"]})
    # Deployments we no longer want (the router switched off in aggregated mode), with their budgets
    wanted = {m["metadata"]["name"] for m in children if m["kind"] == "Deployment"}
    pdb = next((resource_for(m) for m in children if m["kind"] == "PodDisruptionBudget"), None)
    uid = obj["metadata"].get("uid")
    for name, dep in deployments.items():
        owners = dep["metadata"].get("ownerReferences") or []
        if name not in wanted and any(o.get("uid") == uid for o in owners):
            kube.delete(RESOURCES["Deployment"], ns, name)
            if pdb is not None:
                kube.delete(pdb, ns, name)


# ---------------------------------------------------------------------------------------------------------
# Status (pure)


@dataclass
class ServingObserved:
    source: Source
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    signals: dict[str, asc.PoolSignal] | None = None  # by kubeforge pool name; None = not read this time
    recommendations: dict[str, list[tuple[float, int]]] = field(default_factory=dict)


@dataclass
class ServingPlan:
    status: ServingStatus
    replicas: dict[str, int] = field(default_factory=dict)
    service_to_router: bool = False
    events: list[Event] = field(default_factory=list)
    recommendations: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    requeue_after: float | None = None


def _pod_ready(pod: dict[str, Any]) -> bool:
    if podutil.deleting(pod) or podutil.phase(pod) != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def served_provenance(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The provenance summary the model fetch found in the model folder: the fetch-model init container's
    termination message ({"provenance": {...}}) of the newest engine pod that has one."""
    found: tuple[str, dict[str, Any]] | None = None
    for pod in pods:
        if podutil.label(pod, contract.LABEL_ROLE) == ROUTER:
            continue
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if cs.get("name") != FETCH_CONTAINER or term.get("exitCode") != 0 or not term.get("message"):
                continue
            try:
                prov = json.loads(term["message"]).get("provenance")
            except (ValueError, AttributeError):
                continue
            created = str(pod["metadata"].get("creationTimestamp") or "")
            if isinstance(prov, dict) and (found is None or created > found[0]):
                found = (created, prov)
    return found[1] if found else None


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a pod is not serving, in a few words (a failing model fetch, a crash loop), or None."""
    status = pod.get("status") or {}
    for kind, statuses in (("init container", status.get("initContainerStatuses")),
                           ("container", status.get("containerStatuses"))):
        for cs in statuses or []:
            state = cs.get("state") or {}
            waiting, term = state.get("waiting") or {}, state.get("terminated") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") and waiting["reason"] not in ("PodInitializing", "ContainerCreating"):
                detail = (waiting.get("message") or last.get("message") or "").strip().splitlines()
                tail = f": {detail[-1][:200]}" if detail else ""
                return f"{kind} {cs.get('name')} {waiting['reason']}{tail}"
            if term and term.get("exitCode", 0) != 0:
                detail = (term.get("message") or "").strip().splitlines()
                tail = f": {detail[-1][:200]}" if detail else ""
                return f"{kind} {cs.get('name')} exited {term.get('exitCode')}{tail}"
    return None


STUCK_WAITING = frozenset({"CreateContainerConfigError", "CreateContainerError", "InvalidImageName",
                           "ImagePullBackOff", "ErrImageNeverPull"})
CRASH_LOOP_RESTARTS = 3


def pod_stuck(pod: dict[str, Any]) -> bool:
    """Whether a pod will not come up without someone changing something: a container that cannot be
    created (missing Secret, bad image) or one that keeps failing (a model fetch from a wrong URI)."""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        state = cs.get("state") or {}
        waiting, term = state.get("waiting") or {}, state.get("terminated") or {}
        if waiting.get("reason") in STUCK_WAITING:
            return True
        failing = waiting.get("reason") == "CrashLoopBackOff" or (term and term.get("exitCode", 0) != 0)
        if failing and cs.get("restartCount", 0) >= CRASH_LOOP_RESTARTS:
            return True
    return False


def _rolled_out(dep: dict[str, Any] | None, desired: int) -> bool:
    if dep is None:
        return False
    st = dep.get("status") or {}
    return (
        st.get("observedGeneration", 0) >= dep["metadata"].get("generation", 0)
        and dep["spec"].get("replicas") == desired
        and st.get("updatedReplicas", 0) == desired
        and st.get("replicas", 0) == desired
        and st.get("readyReplicas", 0) == desired
    )


def _autoscale(
    spec: InferenceDeploymentSpec, status: ServingStatus, observed: ServingObserved, now: datetime,
    plan: ServingPlan,
) -> None:
    """HPA-style decision per autoscaled pool from its own router signal; updates desiredReplicas."""
    if observed.signals is None:
        plan.recommendations = {k: list(v) for k, v in observed.recommendations.items()}
        return
    t = now.timestamp()
    for name, pool in engine_pools(spec).items():
        a = pool.autoscaling
        if a is None:
            continue
        ps = status.pools[name]
        current = ps.desired_replicas
        metric = METRIC[a.metric] if a.metric else asc.DEFAULT_METRIC.get(ROUTER_POOL[name], "in-flight")
        sig = observed.signals.get(name)
        value = None if sig is None else asc.pool_metric_value(sig, metric, current)
        if sig is not None and current <= 0 and metric in asc.LOAD_METRICS:
            value = sig.queue_depth if metric == "queue-depth" else sig.in_flight
        window = a.scale_down_stabilization_seconds
        recs = [(rt, n) for rt, n in observed.recommendations.get(name, []) if t - rt < window]
        raw = asc.desired_replicas(value, current, a.min_replicas, a.max_replicas, a.target, None, t,
                                   scale_down_stabilization_s=0)
        last = parse_time(ps.last_scale_time)
        new = asc.desired_replicas(
            value, current, a.min_replicas, a.max_replicas, a.target,
            last.timestamp() if last else None, t,
            scale_down_stabilization_s=window, recommendations=recs,
        )
        if value is not None:
            recs.append((t, raw))
        plan.recommendations[name] = recs
        if new != current:
            ps.desired_replicas = new
            ps.last_scale_time = rfc3339(now)
            shown = "no data" if value is None else f"{value:.2f}"
            plan.events.append(Event(
                "Normal", "ScaledUp" if new > current else "ScaledDown",
                f"{name}: {current} -> {new} replicas ({metric} {shown}, target {a.target:g})",
            ))


PHASE_EVENT = {
    "WaitingForModel": "Normal", "Progressing": "Normal", "Ready": "Normal", "Degraded": "Warning",
    "Failed": "Warning",
}


def plan_serving(
    obj: dict[str, Any], spec: InferenceDeploymentSpec, observed: ServingObserved, now: datetime
) -> ServingPlan:
    """The new status, the replicas per pool and the events, from what was read."""
    old = ServingStatus.model_validate(obj.get("status") or {})
    status = old.model_copy(deep=True)
    gen = obj["metadata"].get("generation")
    status.observed_generation = gen
    plan = ServingPlan(status=status)
    src = observed.source

    def finish(phase: str, ready: bool, reconciling: bool, stalled: bool, reason: str, message: str) -> ServingPlan:
        status.phase = phase  # type: ignore[assignment]
        status.message = message
        set_kstatus(status.conditions, ready=ready, reconciling=reconciling, stalled=stalled, reason=reason,
                    message=message, generation=gen, now=now)
        if old.phase != phase:
            plan.events.append(Event(PHASE_EVENT[phase], phase, message))
        return plan

    if src.failed:
        # not terminal: a Deployment-like object follows its spec, so a source re-created and succeeding
        # later is served then (the resync reconciles this object again)
        plan.requeue_after = 30.0
        return finish("Failed", False, False, True, SOURCE_FAILED, src.failed)
    if src.waiting or not src.uri:
        plan.requeue_after = 5.0
        return finish("WaitingForModel", False, True, False, src.reason, src.waiting or "no model URI")

    status.resolved_model_uri = src.uri
    if src.pinned is not None and status.source != src.pinned:
        status.source = src.pinned
        plan.events.append(Event("Normal", "SourceResolved", f"model.from {src.pinned.kind} {src.pinned.name} "
                                 f"(uid {src.pinned.uid}, generation {src.pinned.generation}): {src.pinned.uri}"))
    # the provenance the engines' model fetch reported, kept while no pod shows it (pods replaced)
    known = status.model.provenance if status.model is not None and status.model.uri == src.uri else None
    status.model = ServedModel(uri=src.uri, provenance=served_provenance(observed.pods) or known)
    status.endpoint = endpoint(obj, spec)
    pools: dict[str, PoolStatus] = {}
    for name in pool_names(spec):
        prev = old.pools.get(name)
        n = spec_replicas(spec, name)
        a = engine_pools(spec)[name].autoscaling if name != ROUTER else None
        if a is not None:
            # the autoscaler's memory is the status; a status lost (restored object) falls back to the
            # Deployment's size rather than to spec.replicas, so nothing is scaled down by accident
            dep = observed.deployments.get(deployment_name(obj, name))
            remembered = prev.desired_replicas if prev is not None else (dep or {}).get("spec", {}).get("replicas")
            if remembered is not None:
                n = max(a.min_replicas, min(a.max_replicas, remembered))
        pools[name] = PoolStatus(desired_replicas=n, last_scale_time=prev.last_scale_time if prev else None)
    status.pools = pools
    _autoscale(spec, status, observed, now, plan)

    by_role: dict[str, list[dict[str, Any]]] = {}
    for pod in observed.pods:
        by_role.setdefault(podutil.label(pod, contract.LABEL_ROLE) or "", []).append(pod)
    problems: list[str] = []
    settled = old.observed_generation == gen
    for name, ps in pools.items():
        live = [p for p in by_role.get(name, []) if not podutil.deleting(p)]
        ps.replicas = len(live)
        ps.ready_replicas = sum(1 for p in live if _pod_ready(p))
        plan.replicas[name] = ps.desired_replicas
        if ps.ready_replicas < ps.desired_replicas:
            problem = next((f"{podutil.name(p)}: {x}" for p in live if (x := pod_problem(p))), None)
            if problem:
                problems.append(problem)
        dep = observed.deployments.get(deployment_name(obj, name))
        if not _rolled_out(dep, ps.desired_replicas) or ps.ready_replicas != ps.desired_replicas:
            settled = False

    engines = list(engine_pools(spec))
    ready_engines = [n for n in engines if pools[n].ready_replicas > 0]
    status.ready_pools = f"{len(ready_engines)}/{len(engines)}"
    # disaggregated: clients always go through the router; aggregated: through it once it is up
    router_up = router_enabled(spec) and pools[ROUTER].ready_replicas > 0
    plan.service_to_router = spec.mode == "disaggregated" or router_up
    servable = len(ready_engines) == len(engines) and (router_up or not plan.service_to_router)
    counts = ", ".join(f"{n} {p.ready_replicas}/{p.desired_replicas}" for n, p in pools.items())
    detail = f"; {'; '.join(problems)}" if problems else ""
    if any(pool.autoscaling for pool in engine_pools(spec).values()):
        plan.requeue_after = 10.0
    if servable and settled:
        return finish("Ready", True, False, False, "Ready", f"serving at {status.endpoint} ({counts})")
    plan.requeue_after = 2.0
    if servable:
        return finish("Progressing", True, True, False, "Progressing",
                      f"serving at {status.endpoint} while rolling out ({counts}){detail}")
    was_serving = old.phase in ("Ready", "Degraded") or (
        (c := find(old.conditions, READY)) is not None and c.status == "True")
    missing = [n for n in pools if pools[n].ready_replicas == 0]
    message = f"no ready pod in {', '.join(missing)} ({counts}){detail}"
    # kstatus Stalled: a pool with no ready pod whose pods all fail in a way retrying does not fix
    stalled = any(
        (live := [p for p in by_role.get(n, []) if not podutil.deleting(p)]) and all(map(pod_stuck, live))
        for n in missing
    )
    phase = "Degraded" if was_serving else "Progressing"
    if stalled:
        return finish(phase, False, True, True, "PodsFailing", message)
    if was_serving:
        return finish("Degraded", False, True, False, "Degraded", message)
    return finish("Progressing", False, True, False, "Progressing", f"starting: {counts} ready{detail}")


def compute_status(
    obj: dict[str, Any], spec: InferenceDeploymentSpec, observed: ServingObserved, now: datetime
) -> ServingStatus:
    return plan_serving(obj, spec, observed, now).status


# ---------------------------------------------------------------------------------------------------------
# Reading the routers' metrics (I/O)


def router_urls(pods: list[dict[str, Any]], port: int) -> list[str]:
    """Base URLs of the ready router pods, by pod IP (the operator may be outside the cluster DNS)."""
    out = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if podutil.label(pod, contract.LABEL_ROLE) == ROUTER and ip and _pod_ready(pod):
            out.append(f"http://{ip}:{port}")
    return sorted(out)


def read_signals(urls: list[str], spec: InferenceDeploymentSpec,
                 timeout: float = SCRAPE_TIMEOUT_S) -> dict[str, asc.PoolSignal] | None:
    """Per kubeforge pool, the routers' merged view; None when no router answered (hold the pools)."""
    try:
        merged = asc.read_router_signals(urls, timeout=timeout) if urls else {}
    except ValueError as e:  # a malformed /metrics: hold the pools rather than fail the reconcile
        log.warning("router metrics unreadable: %s", e)
        return None
    if not merged:
        return None
    return {name: merged[ROUTER_POOL[name]] for name in engine_pools(spec) if ROUTER_POOL[name] in merged}


class _Memory:
    """In-process autoscaler memory: last scrape time and recent raw recommendations per object."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_scrape: dict[str, float] = {}
        self.recommendations: dict[str, dict[str, list[tuple[float, int]]]] = {}


_MEMORY = _Memory()


# ---------------------------------------------------------------------------------------------------------
# Reconcile


def reconcile_serving(reconciler: Any, obj: dict[str, Any]) -> float | None:
    spec: InferenceDeploymentSpec = parse_spec(obj)
    kube, settings = reconciler.kube, reconciler.settings
    ns, uid = obj["metadata"]["namespace"], str(obj["metadata"].get("uid"))
    now = reconciler.clock()
    source = reconciler.resolve_source(obj, spec.model)
    observed = ServingObserved(source=source)
    if source.uri and not source.waiting and not source.failed:
        sel = selector(obj)
        observed.deployments = {d["metadata"]["name"]: d for d in kube.list(RESOURCES["Deployment"], ns, sel)}
        observed.pods = kube.list(RESOURCES["Pod"], ns, sel)
        autoscaled = router_enabled(spec) and any(p.autoscaling for p in engine_pools(spec).values())
        with _MEMORY.lock:
            observed.recommendations = {k: list(v) for k, v in _MEMORY.recommendations.get(uid, {}).items()}
            due = time.monotonic() - _MEMORY.last_scrape.get(uid, -1e9) >= settings.autoscale_interval_seconds
            if autoscaled and due:
                _MEMORY.last_scrape[uid] = time.monotonic()
        if autoscaled and due:
            observed.signals = read_signals(router_urls(observed.pods, spec.port), spec)
    plan = plan_serving(obj, spec, observed, now)
    if source.uri and not source.waiting and not source.failed:
        # before the pods that reference it; exists already on every later pass (a 409, nothing read)
        kube.create(kv_token_secret(obj, new_kv_token()))
        children = desired_children(obj, spec, source.uri, settings, plan.replicas, plan.service_to_router,
                                    pdb_api_version(kube))
        _apply(reconciler, obj, children, observed.deployments)
    with _MEMORY.lock:
        _MEMORY.recommendations[uid] = plan.recommendations
    if reconciler.write_status(obj, plan.status):
        reconciler.post_events(obj, plan.events)
    return plan.requeue_after


__all__ = [
    "ServingObserved",
    "ServingPlan",
    "compute_status",
    "deployment_patch",
    "desired_children",
    "plan_serving",
    "pod_problem",
    "pod_stuck",
    "read_signals",
    "reconcile_serving",
    "router_urls",
    "service_patch",
]
