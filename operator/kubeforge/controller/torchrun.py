"""A gang of torchrun pods: one pod per node, static rendezvous on rank 0 through a headless Service.

Used by every training kind; the kind supplies the runtime module and its resolved spec. TorchX's dist.ddp
component renders the same torchrun invocation, but kubeforge renders whole pods (gang labels, Kueue
placement, RBAC, spec file) and the invocation is one list here, so TorchX would add a dependency and remove
no code. TorchX sits at the other end instead: kubeforge.torchx_scheduler turns a TorchX app into a PretrainJob
with spec.entrypoint, which this gang runs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from kubeforge import contract
from kubeforge.api.common import Resources, SchedulingSpec
from kubeforge.api.kinds import EntrypointSpec

from . import gang, kueue
from .children import (
    child_name,
    downward_env,
    headless_service,
    metadata,
    placement,
    progress_rbac,
    resources_block,
    s3_env,
    spec_config_map,
)
from .podsecurity import harden

ROLE = "worker"
SPEC_VOLUME = "kubeforge-spec"
GRACE_SECONDS = 300  # time for the runtime to finish a step and write its checkpoint on SIGTERM (the default
# of runPolicy.terminationGracePeriodSeconds)
HEARTBEAT_SECONDS = 10  # how often rank 0's launcher reports that a user script's processes still work


def master_port(uid: str) -> int:
    """A per-job port: in the dev cluster every pod shares the host's network, so jobs must not collide."""
    return 20000 + zlib.crc32(uid.encode()) % 20000


@dataclass
class TorchrunGang:
    obj: dict[str, Any]
    resources: Resources
    scheduling: SchedulingSpec
    module: str  # the runtime, e.g. kubeforge.runtime.pretrain
    resolved_spec: dict[str, Any]
    secret_name: str | None
    s3_endpoint: str | None
    python: str = "python"
    model_secret_name: str | None = None  # model.secretRef, when it is not secret_name
    data_secret_name: str | None = None  # data.secretRef, likewise
    grace_seconds: int = GRACE_SECONDS  # runPolicy.terminationGracePeriodSeconds
    entrypoint: EntrypointSpec | None = None  # the user's own script instead of `module`
    default_image: str = "ghcr.io/kubeforge/trainer:0.1.0"  # when resources.image is unset (the operator's)
    image_pull_secrets: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.obj["metadata"]["namespace"])

    def gang_size(self) -> int:
        return self.resources.num_nodes

    def pod_names(self) -> list[str]:
        return [child_name(self.name, ROLE, i) for i in range(self.gang_size())]

    def service_account(self) -> str:
        return child_name(self.name, "runtime")

    def spec_config_map_name(self) -> str:
        return child_name(self.name, "spec")

    def support_children(self, gang_backend: gang.Backend) -> list[dict[str, Any]]:
        port = master_port(self.obj["metadata"]["uid"])
        out = [
            headless_service(self.obj, ROLE, port, "rendezvous"),
            spec_config_map(self.obj, self.resolved_spec, self.spec_config_map_name()),
            *progress_rbac(self.obj, self.service_account(), self.pod_names()),
        ]
        requests = resources_block(self.resources).get("requests", {})
        group = gang.pod_group(self.obj, gang_backend, self.gang_size(), self.scheduling,
                               gang.sum_requests(requests, self.gang_size()))
        if group is not None:
            out.append(group)
        return out

    def command(self, rank: int) -> list[str]:
        master = f"{child_name(self.name, ROLE, 0)}.{self.name}.{self.namespace}.svc"
        return [
            # torchrun, run in-process by a wrapper that keeps the runtime's exit codes (78, 143)
            self.python, "-m", "kubeforge.runtime.launch",
            f"--nnodes={self.resources.num_nodes}",
            f"--nproc-per-node={self.resources.processes_per_node}",
            f"--node-rank={rank}",
            f"--master-addr={master}",
            f"--master-port={master_port(self.obj['metadata']['uid'])}",
            "--max-restarts=0",  # the operator restarts the whole gang, never one rank
            *self.program(),
        ]

    def program(self) -> list[str]:
        """What torchrun starts in each process: kubeforge's runtime module, or the user's entrypoint."""
        ep = self.entrypoint
        if ep is None:
            return ["-m", self.module]
        return ["-m", ep.module, *ep.args] if ep.module else [str(ep.script), *ep.args]

    def entrypoint_env(self, rank: int, master: str, port: int) -> list[dict[str, Any]]:
        """What scripts written for torchrun launchers expect beyond torchrun's own per-process variables:
        the PET_* launcher settings (as Trainer v2 sets them), where to checkpoint and where to resume."""
        res = self.resources
        env = [
            {"name": "PET_NNODES", "value": str(res.num_nodes)},
            {"name": "PET_NPROC_PER_NODE", "value": str(res.processes_per_node)},
            {"name": "PET_NODE_RANK", "value": str(rank)},
            {"name": "PET_MASTER_ADDR", "value": master},
            {"name": "PET_MASTER_PORT", "value": str(port)},
            {"name": contract.ENV_CHECKPOINT_URI, "value": str(self.resolved_spec["checkpoint"]["uri"])},
        ]
        last = ((self.obj.get("status") or {}).get("lastCheckpoint") or {}).get("step")
        if isinstance(last, int):  # a hint from the operator's status; the store's manifests are the truth
            env.append({"name": contract.ENV_RESUME_STEP, "value": str(last)})
        if self.entrypoint is not None:
            env.append({"name": contract.ENV_HEARTBEAT_SECONDS, "value": str(HEARTBEAT_SECONDS)})
        return env

    def pod(self, rank: int, attempt: int, extra: dict[str, Any], gang_backend: gang.Backend) -> dict[str, Any]:
        res = self.resources
        port = master_port(self.obj["metadata"]["uid"])
        master = f"{child_name(self.name, ROLE, 0)}.{self.name}.{self.namespace}.svc"
        env, env_from = s3_env(self.secret_name, self.s3_endpoint)
        for prefix, name in ((contract.MODEL_CREDENTIALS_PREFIX, self.model_secret_name),
                             (contract.DATA_CREDENTIALS_PREFIX, self.data_secret_name)):
            if name and name != self.secret_name:
                env_from.append({"prefix": prefix, "secretRef": {"name": name}})
        gang_labels, gang_annotations, scheduler = gang.pod_fields(self.obj, gang_backend)
        meta = metadata(
            self.obj, child_name(self.name, ROLE, rank), ROLE,
            **{contract.LABEL_REPLICA_INDEX: str(rank), contract.LABEL_ATTEMPT: str(attempt)}, **gang_labels,
        )
        if gang_annotations:
            meta["annotations"] = gang_annotations
        spec_path = f"{contract.SPEC_MOUNT_DIR}/{contract.SPEC_FILE_NAME}"
        container = {
            "name": "trainer",
            "image": res.image or self.default_image,
            "command": self.command(rank),
            "env": [
                {"name": contract.ENV_JOB, "value": f"{self.namespace}/{self.name}"},
                {"name": contract.ENV_JOB_KIND, "value": self.obj["kind"]},
                {"name": contract.ENV_SPEC_FILE, "value": spec_path},
                {"name": contract.ENV_ATTEMPT, "value": str(attempt)},
                {"name": contract.ENV_PROGRESS_MODE, "value": "pod-annotation"},
                {"name": "MASTER_ADDR", "value": master},
                {"name": "MASTER_PORT", "value": str(port)},
                {"name": "NNODES", "value": str(res.num_nodes)},
                {"name": "NODE_RANK", "value": str(rank)},
                {"name": "NPROC_PER_NODE", "value": str(res.processes_per_node)},
                {"name": "PYTHONUNBUFFERED", "value": "1"},
                *self.entrypoint_env(rank, master, port),
                *downward_env(),
                *env,
                *({"name": e.name, "value": e.value} for e in res.env),
            ],
            "envFrom": env_from,
            "ports": [{"name": "rendezvous", "containerPort": port}],
            "resources": resources_block(res),
            "volumeMounts": [
                {"name": SPEC_VOLUME, "mountPath": contract.SPEC_MOUNT_DIR, "readOnly": True},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
            "terminationMessagePath": contract.DEFAULT_TERMINATION_LOG,
            "terminationMessagePolicy": "File",
        }
        pod_spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "hostname": child_name(self.name, ROLE, rank),
            "subdomain": self.name,
            "serviceAccountName": self.service_account(),
            "terminationGracePeriodSeconds": self.grace_seconds,
            "containers": [container],
            "volumes": [
                {"name": SPEC_VOLUME, "configMap": {"name": self.spec_config_map_name()}},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            ],
            **placement(res),
        }
        harden(pod_spec, list(self.image_pull_secrets))
        if scheduler:
            pod_spec["schedulerName"] = scheduler
        if extra.get("nodeSelector"):
            pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **extra["nodeSelector"]}
        if extra.get("tolerations"):
            pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *extra["tolerations"]]
        if extra.get("labels"):  # an admission check's podSetUpdates; ours win on conflict
            meta["labels"] = {**extra["labels"], **meta["labels"]}
        if extra.get("annotations"):
            meta["annotations"] = {**extra["annotations"], **meta.get("annotations", {})}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}

    def pods(self, attempt: int, placement_by_set: dict[str, dict[str, Any]], gang_backend: gang.Backend) -> list[dict]:
        extra = placement_by_set.get(ROLE, {})
        return [self.pod(rank, attempt, extra, gang_backend) for rank in range(self.gang_size())]

    def pod_sets(self, attempt: int) -> list[kueue.PodSet]:
        template = self.pod(0, attempt, {}, "kueue")
        return [kueue.PodSet(ROLE, self.gang_size(), {"metadata": {"labels": template["metadata"]["labels"]},
                                                      "spec": template["spec"]})]

