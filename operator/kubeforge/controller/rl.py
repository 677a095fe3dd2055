"""What an RLJob adds to the training-job reconcile: the LLM judge it waits for and calls.

The learner gang itself is PretrainJob's (controller/training.py + torchrun.py, runtime module
kubeforge.runtime.rl.learner); `RLGang` adds the rollout pool when placement is disaggregated. When `reward.judge.inferenceDeployment` is set, the job stays Pending until that
InferenceDeployment's Ready condition is True, and the runtime receives the deployment's in-cluster endpoint
as `reward.judge.url` in its resolved spec.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from .. import contract
from ..api.validation import gpus
from . import gang, kueue, vllm
from .children import (
    child_name,
    downward_env,
    headless_service,
    metadata,
    own_pods_only_policy,
    placement,
    resources_block,
    s3_env,
    selector_labels,
)
from .kube import RESOURCES
from .podsecurity import harden
from .sources import source_of
from .torchrun import TorchrunGang
from .training import Source

RUNTIME_MODULE = "kubeforge.runtime.rl.learner"
ROLLOUT_URLS_ENV = "KUBEFORGE_ROLLOUT_URLS"  # read by kubeforge.runtime.rl.learner
WEIGHT_SYNC_PORT_ENV = "KUBEFORGE_WEIGHT_SYNC_PORT"  # read by kubeforge.runtime.rl.learner


def weight_sync_port(uid: str) -> int:
    """Learner rank 0's port of the nccl weight-sync group's store; per job, like the rendezvous port (the dev
    cluster's pods share the host's network) and apart from it (20000-39999)."""
    return 40000 + zlib.crc32(f"{uid}/weights".encode()) % 10000


def judge_endpoint(kube: Any, obj: dict[str, Any], spec: Any) -> tuple[str | None, str | None]:
    """(endpoint, None) when the judge is ready to call or none is needed; (None, why) while waiting."""
    judge = getattr(spec.reward, "judge", None)
    if judge is None or not judge.inference_deployment:
        return None, None
    name = judge.inference_deployment
    infd = kube.get(RESOURCES["InferenceDeployment"], obj["metadata"]["namespace"], name)
    if infd is None:
        return None, f"waiting for InferenceDeployment {name} to exist (reward.judge)"
    status = infd.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not ready or not status.get("endpoint"):
        return None, f"waiting for InferenceDeployment {name} to be Ready (reward.judge; now " \
                     f"{status.get('phase') or 'Pending'})"
    return str(status["endpoint"]), None


def reward_model_source(kube: Any, obj: dict[str, Any], spec: Any) -> Source:
    """reward.model.from resolved like model.from: the source's output URI once it Succeeded, else why the job
    waits, or a failure when the source failed. Source() when the reward is not a model from another job."""
    model = getattr(spec.reward, "model", None)
    ref = getattr(model, "from_", None)
    if ref is None:
        return Source()
    src = kube.get(RESOURCES[ref.kind], obj["metadata"]["namespace"], ref.name)
    return source_of(ref.kind, ref.name, src, "reward.model.from")


def with_reward_model_uri(wire: dict[str, Any], uri: str | None) -> dict[str, Any]:
    """The resolved spec the runtime reads: the reward model by URI."""
    if not uri:
        return wire
    reward = dict(wire.get("reward") or {})
    model = {k: v for k, v in (reward.get("model") or {}).items() if k != "from"}
    model["uri"] = uri
    reward["model"] = model
    return {**wire, "reward": reward}


def with_judge_url(wire: dict[str, Any], endpoint: str | None) -> dict[str, Any]:
    """The resolved spec the runtime reads: the judge by URL."""
    if not endpoint:
        return wire
    reward = dict(wire.get("reward") or {})
    judge = {k: v for k, v in (reward.get("judge") or {}).items() if k != "inferenceDeployment"}
    judge["url"] = endpoint
    reward["judge"] = judge
    return {**wire, "reward": reward}


# ---------------------------------------------------------------------------------------------- rollout pool

ROLLOUT_ROLE = "rollout"
ENGINE_PORT = 8000
ROLLOUT_MODEL_DIR = "/models/policy"


@dataclass
class RLGang(TorchrunGang):
    """The learner gang (TorchrunGang) plus, when rollout.placement is disaggregated, `rollout.replicas`
    reference engine pods in the same gang: scheduled, restarted and torn down together with the learners
    (a restarted learner pushes its resumed weights to fresh engines). Engines get stable names
    `<job>-rollout-<i>.<job>-rollout.<ns>.svc` through their own headless Service; the learners find them in
    KUBEFORGE_ROLLOUT_URLS and stop them (POST /kubeforge/v1/shutdown) when training is done, so the whole
    gang succeeds."""

    rl_spec: Any = None
    serve_image: str = ""  # the operator's vllm-serve image (rollout.engine vllm, when the spec names none)

    @property
    def disaggregated(self) -> bool:
        return self.rl_spec is not None and self.rl_spec.rollout.placement == "disaggregated"

    @property
    def vllm_rollouts(self) -> bool:
        return self.disaggregated and self.rl_spec.rollout.engine == "vllm"

    def learners(self) -> int:
        return super().gang_size()

    def pod_names(self) -> list[str]:  # the pods that report progress (learners only)
        return [child_name(self.name, "worker", i) for i in range(self.learners())]

    def gang_size(self) -> int:
        return self.learners() + (self.rl_spec.rollout.replicas if self.disaggregated else 0)

    def rollout_service_name(self) -> str:
        return f"{self.name}-{ROLLOUT_ROLE}"

    def rollout_urls(self) -> list[str]:
        return [f"http://{child_name(self.name, ROLLOUT_ROLE, i)}.{self.rollout_service_name()}.{self.namespace}"
                f".svc:{ENGINE_PORT}" for i in range(self.rl_spec.rollout.replicas)]

    def support_children(self, gang_backend: gang.Backend) -> list[dict[str, Any]]:
        out = super().support_children(gang_backend)
        if self.disaggregated:
            svc = headless_service(self.obj, ROLLOUT_ROLE, ENGINE_PORT, "http")
            svc["metadata"]["name"] = self.rollout_service_name()
            out += [svc, self.rollout_network_policy()]
        return out

    def rollout_network_policy(self) -> dict[str, Any]:
        """The rollout engines take connections only from this job's own pods. Their weight endpoints
        (PUT /kubeforge/v1/weights on the reference engine; vLLM's /collective_rpc, which VLLM_SERVER_DEV_MODE
        opens and vLLM's --api-key does not cover) would otherwise let anything in the cluster that reaches
        a pod replace the policy being trained."""
        return own_pods_only_policy(self.obj, f"{self.name}-{ROLLOUT_ROLE}", ROLLOUT_ROLE,
                                    {"matchLabels": selector_labels(self.obj, ROLLOUT_ROLE)})

    def pod(self, rank: int, attempt: int, extra: dict[str, Any], gang_backend: gang.Backend) -> dict[str, Any]:
        if rank >= self.learners():
            return self.rollout_pod(rank - self.learners(), rank, attempt, extra, gang_backend)
        p = super().pod(rank, attempt, extra, gang_backend)
        if self.disaggregated:
            c = p["spec"]["containers"][0]
            c["env"].append({"name": ROLLOUT_URLS_ENV, "value": ",".join(self.rollout_urls())})
            if self.rl_spec.weight_sync.method == "nccl":
                port = weight_sync_port(self.obj["metadata"]["uid"])
                c["env"].append({"name": WEIGHT_SYNC_PORT_ENV, "value": str(port)})
                c.setdefault("ports", []).append({"name": "weight-sync", "containerPort": port})
        return p

    def rollout_pod(self, i: int, rank: int, attempt: int, extra: dict[str, Any],
                    gang_backend: gang.Backend) -> dict[str, Any]:
        ro = self.rl_spec.rollout
        name = child_name(self.name, ROLLOUT_ROLE, i)
        gang_labels, gang_annotations, scheduler = gang.pod_fields(self.obj, gang_backend)
        meta = metadata(self.obj, name, ROLLOUT_ROLE, **{contract.LABEL_REPLICA_INDEX: str(rank),
                                                          contract.LABEL_ATTEMPT: str(attempt)}, **gang_labels)
        if gang_annotations:
            meta["annotations"] = gang_annotations
        model = self.resolved_spec["model"]
        secret = (model.get("secretRef") or {}).get("name") or self.secret_name
        env, env_from = s3_env(secret, self.s3_endpoint)
        volume = {"name": "model", "mountPath": "/models"}
        # the CRD defaults no image: the operator's (vllm-serve for vllm, which holds kubeforge too)
        image = ro.resources.image or (self.serve_image if self.vllm_rollouts else "") or self.default_image
        fetch = {"name": "fetch-model", "image": image, "volumeMounts": [volume],
                 "command": [self.python, "-m", "kubeforge.runtime.fetch", model["uri"], ROLLOUT_MODEL_DIR],
                 "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *env], "envFrom": env_from}
        user_env = [{"name": e.name, "value": e.value} for e in ro.resources.env]
        if self.vllm_rollouts:
            engine = self.vllm_engine(i, image, volume, ro, user_env)
            grace = vllm.GRACE_SECONDS
        else:
            engine = self.reference_engine(image, volume, ro, user_env)
            grace = 30
        pod_spec: dict[str, Any] = {
            "restartPolicy": "Never", "hostname": name, "subdomain": self.rollout_service_name(),
            "terminationGracePeriodSeconds": grace, "initContainers": [fetch], "containers": [engine],
            "volumes": [{"name": "model", "emptyDir": {}}], **placement(ro.resources),
        }
        if scheduler:
            pod_spec["schedulerName"] = scheduler
        if extra.get("nodeSelector"):
            pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **extra["nodeSelector"]}
        harden(pod_spec, list(self.image_pull_secrets))  # Pod Security restricted, as the learners
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}

    def reference_engine(self, image: str, volume: dict[str, Any], ro: Any,
                         user_env: list[dict[str, Any]]) -> dict[str, Any]:
        """kubeforge's transformers engine (CPU): weights over http (PUT /kubeforge/v1/weights)."""
        return {
            "name": "engine", "image": image, "volumeMounts": [volume],
            "command": [self.python, "-m", "kubeforge.runtime.serve.engine", "--model", ROLLOUT_MODEL_DIR,
                        "--served-model-name", "policy", "--host", f"$({contract.ENV_POD_IP})",
                        "--port", str(ENGINE_PORT), "--engine-id", f"$({contract.ENV_POD_NAME})",
                        "--threads", "1"],
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *downward_env(), *user_env],
            "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
            "resources": resources_block(ro.resources),
        }

    def vllm_engine(self, i: int, image: str, volume: dict[str, Any], ro: Any,
                    user_env: list[dict[str, Any]]) -> dict[str, Any]:
        """`vllm serve` with kubeforge's worker extension (weights over the learner's broadcast group), one
        tensor-parallel worker per GPU of the pod, seeded per engine so the engines sample apart."""
        return {
            "name": "engine", "image": image, "volumeMounts": [volume],
            "command": vllm.rollout_command(ROLLOUT_MODEL_DIR, "policy", ENGINE_PORT, max(1, gpus(ro.resources)),
                                            self.rl_spec.algorithm.seed + i),
            "env": [*vllm.rollout_env(), *downward_env(), *user_env],
            "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
            "resources": resources_block(ro.resources),
            **vllm.vllm_probes(),
        }

    def pod_sets(self, attempt: int) -> list[kueue.PodSet]:
        sets = [kueue.PodSet(s.name, self.learners(), s.template) for s in super().pod_sets(attempt)]
        if self.disaggregated:
            t = self.rollout_pod(0, self.learners(), attempt, {}, "kueue")
            sets.append(kueue.PodSet(ROLLOUT_ROLE, self.rl_spec.rollout.replicas,
                                     {"metadata": {"labels": t["metadata"]["labels"]}, "spec": t["spec"]}))
        return sets
