"""TorchX scheduler `kubeforge`: `torchx run -s kubeforge dist.ddp -j 2x1 --script train.py` submits a PretrainJob.

Registered through TorchX's `torchx.schedulers` entry point (pyproject.toml), so the `torchx` CLI and
`torchx.runner` find it once kubeforge is installed with its [torchx] extra. The AppDef's single role becomes
one gang: replicas -> resources.numNodes, torchrun's --nproc_per_node -> processesPerNode, the script or
module after torchrun's own options (and its arguments) -> spec.entrypoint, image / env / cpu / memMB / gpu
-> resources, max_retries -> runPolicy.maxRestarts, and the run config (`-cfg`) supplies the namespace,
the Kueue queue and the checkpoint store. kubeforge's operator then renders its own torchrun (rendezvous on
rank 0's pod), restarts the gang from the last checkpoint, and reports progress in the job's status.

- status: the PretrainJob's phase, message, restarts and pods.
- log: the pods' logs through the API server (`<app>/<role>/<replica>` is pod `<job>-worker-<replica>`).
- cancel: suspends the job (every pod checkpoints on SIGTERM) and marks it cancelled; delete removes it.
- list: the PretrainJobs of the namespace.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from torchx.schedulers.api import (
    DescribeAppResponse,
    ListAppResponse,
    Scheduler,
    Stream,
    StructuredOpts,
    filter_regex,
    split_lines,
)
from torchx.schedulers.ids import make_unique
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, macros, runopts

from kubeforge import API_VERSION, GROUP, VERSION

PLURAL = "pretrainjobs"
CANCELLED_ANNOTATION = "kubeforge.dev/torchx-cancelled"
ROLE_ANNOTATION = "kubeforge.dev/torchx-role"
TORCHRUN = ("torchrun", "torch.distributed.run")
GPU = "nvidia.com/gpu"

STATE_OF_PHASE = {
    "Pending": AppState.PENDING,
    "Queued": AppState.PENDING,
    "Starting": AppState.PENDING,
    "Suspended": AppState.PENDING,
    "Running": AppState.RUNNING,
    "Restarting": AppState.RUNNING,
    "Succeeded": AppState.SUCCEEDED,
    "Failed": AppState.FAILED,
}
REPLICA_STATE = {"Pending": AppState.PENDING, "Running": AppState.RUNNING, "Succeeded": AppState.SUCCEEDED,
                 "Failed": AppState.FAILED}


@dataclass
class Opts(StructuredOpts):
    """Run options of the kubeforge scheduler (`torchx runopts kubeforge`)."""

    checkpoint_uri: str
    """s3:// prefix for checkpoints; the job's go to <prefix>/<job name>."""

    namespace: str = "default"
    """Namespace of the PretrainJob."""

    queue: str | None = None
    """Kueue LocalQueue to admit the gang through (spec.scheduling.queueName)."""

    gang: str | None = None
    """Gang backend: kueue, volcano, coscheduling or builtin (default: kueue with a queue, else builtin)."""

    checkpoint_secret: str | None = None
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the checkpoint store."""

    checkpoint_endpoint: str | None = None
    """Endpoint of an S3-compatible store."""

    checkpoint_interval_steps: int = 100
    """spec.checkpoint.intervalSteps (a hint for scripts; the kubeforge sdk checkpoints when told)."""

    progress_deadline_seconds: int | None = None
    """Restart the gang when no progress (or heartbeat) arrives for this long."""

    priority_class: str | None = None
    """PriorityClass of the pods."""


@dataclass
class PretrainJobRequest:
    namespace: str
    resource: dict[str, Any]

    def __str__(self) -> str:
        import yaml

        return yaml.safe_dump(self.resource, sort_keys=False)


# ------------------------------------------------------------------------------------------------------ AppDef


def job_name(app_name: str) -> str:
    """A unique DNS label short enough for `<job>-worker-<n>` pod names and hostnames."""
    base = re.sub(r"[^a-z0-9-]+", "-", app_name.lower()).strip("-")[:30].strip("-") or "app"
    return make_unique(base, 8).lower()


def _command(role: Role) -> list[str]:
    """The role's command line, with `bash -c '<line>'` (how dist.ddp/spmd wrap torchrun) unwrapped."""
    argv = [role.entrypoint, *role.args]
    if argv[0].rsplit("/", 1)[-1] in ("bash", "sh") and len(argv) >= 3 and argv[1] == "-c":
        return shlex.split(argv[2])
    return argv


def program_of(role: Role) -> tuple[dict[str, Any], int]:
    """(spec.entrypoint, processes per node) from a torchrun (or plain python) command line."""
    argv = _command(role)
    exe = argv[0].rsplit("/", 1)[-1]
    if exe == "torchrun":
        torchrun_args = argv[1:]
    elif exe.startswith("python") and argv[1:3] == ["-m", "torch.distributed.run"]:
        torchrun_args = argv[3:]
    elif exe.startswith("python") and len(argv) > 1:  # one process per node, no torchrun options
        if argv[1] == "-m" and len(argv) > 2:
            return {"module": argv[2], "args": argv[3:]}, 1
        return {"script": argv[1], "args": argv[2:]}, 1
    else:
        raise ValueError(f"role {role.name}: kubeforge runs torchrun or python commands, not {argv[0]!r}; "
                         "use dist.ddp, dist.spmd or dist.torchrun")
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args(torchrun_args)
    nproc = int(ns.nproc_per_node) if str(ns.nproc_per_node).isdigit() else max(1, role.resource.gpu)
    key = "module" if ns.module else "script"
    if ns.no_python:
        raise ValueError(f"role {role.name}: torchrun --no-python is not supported; run a Python script")
    return {key: ns.training_script, "args": list(ns.training_script_args)}, nproc


def _cpu(cpu: float) -> str:
    return str(int(cpu)) if float(cpu).is_integer() else f"{int(round(cpu * 1000))}m"


def app_to_pretrain_job(app: AppDef, cfg: Opts, name: str) -> dict[str, Any]:
    """The PretrainJob that runs `app` (one role) on kubeforge; pure."""
    if len(app.roles) != 1:
        raise ValueError(f"a PretrainJob runs one gang: the AppDef has {len(app.roles)} roles")
    values = macros.Values(img_root="", app_id=name, replica_id="$(NODE_RANK)", rank0_env="MASTER_ADDR")
    role = values.apply(app.roles[0])
    entrypoint, nproc = program_of(role)
    res = role.resource
    requests: dict[str, str] = {}
    if res.cpu and res.cpu > 0:
        requests["cpu"] = _cpu(res.cpu)
    if res.memMB and res.memMB > 0:
        requests["memory"] = f"{int(res.memMB)}Mi"
    resources: dict[str, Any] = {
        "numNodes": role.num_replicas,
        "processesPerNode": nproc,
        "image": role.image,
        "env": [{"name": k, "value": str(v)} for k, v in sorted(role.env.items())],
        "requests": requests,
    }
    if res.gpu and res.gpu > 0:
        requests[GPU] = str(res.gpu)
        resources["limits"] = {GPU: str(res.gpu)}
    if cfg.priority_class:
        resources["priorityClassName"] = cfg.priority_class
    checkpoint: dict[str, Any] = {"uri": f"{cfg.checkpoint_uri.rstrip('/')}/{name}",
                                  "intervalSteps": cfg.checkpoint_interval_steps}
    if cfg.checkpoint_secret:
        checkpoint["secretRef"] = {"name": cfg.checkpoint_secret}
    if cfg.checkpoint_endpoint:
        checkpoint["endpoint"] = cfg.checkpoint_endpoint
    scheduling: dict[str, Any] = {}
    if cfg.queue:
        scheduling["queueName"] = cfg.queue
    if cfg.gang:
        scheduling["gang"] = cfg.gang
    run_policy: dict[str, Any] = {"maxRestarts": role.max_retries}
    if cfg.progress_deadline_seconds:
        run_policy["progressDeadlineSeconds"] = cfg.progress_deadline_seconds
    return {
        "apiVersion": API_VERSION,
        "kind": "PretrainJob",
        "metadata": {
            "name": name,
            "namespace": cfg.namespace,
            "labels": {"app.kubernetes.io/managed-by": "torchx"},
            "annotations": {ROLE_ANNOTATION: app.roles[0].name, "kubeforge.dev/torchx-app": app.name},
        },
        "spec": {
            "entrypoint": entrypoint,
            "checkpoint": checkpoint,
            "resources": resources,
            "scheduling": scheduling,
            "runPolicy": run_policy,
        },
    }


# ------------------------------------------------------------------------------------------------------ scheduler


class KubeforgeScheduler(Scheduler[Opts]):
    """Runs TorchX apps as kubeforge PretrainJobs (gang scheduling, restart from checkpoint, progress)."""

    def __init__(self, session_name: str, client: Any | None = None) -> None:
        super().__init__("kubeforge", session_name)
        self._client = client

    # --- API access
    def _api_client(self) -> Any:
        if self._client is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
            self._client = client.ApiClient(configuration)
        return self._client

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._api_client())

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._api_client())

    def _get(self, app_id: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        namespace, name = app_id.split(":", 1)
        try:
            return dict(self._custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # --- submit
    def _run_opts(self) -> runopts:
        return Opts.as_runopts()

    def _submit_dryrun(self, app: AppDef, cfg: Opts) -> AppDryRunInfo[PretrainJobRequest, Opts]:
        resource = app_to_pretrain_job(app, cfg, job_name(app.name))
        return AppDryRunInfo(PretrainJobRequest(cfg.namespace, resource), str)

    def schedule(self, dryrun_info: AppDryRunInfo[PretrainJobRequest, Opts]) -> str:
        req = dryrun_info.request
        created = self._custom().create_namespaced_custom_object(GROUP, VERSION, req.namespace, PLURAL,
                                                                 req.resource)
        return f"{req.namespace}:{created['metadata']['name']}"

    # --- observe
    def describe(self, app_id: str) -> DescribeAppResponse | None:
        obj = self._get(app_id)
        if obj is None:
            return None
        namespace, name = app_id.split(":", 1)
        status = obj.get("status") or {}
        meta = obj["metadata"]
        role_name = (meta.get("annotations") or {}).get(ROLE_ANNOTATION, "worker")
        state = STATE_OF_PHASE.get(status.get("phase") or "Pending", AppState.UNKNOWN)
        if (meta.get("annotations") or {}).get(CANCELLED_ANNOTATION) and state not in (
                AppState.SUCCEEDED, AppState.FAILED):
            state = AppState.CANCELLED
        spec = obj["spec"]
        res = spec.get("resources") or {}
        replicas = []
        pods = self._core().list_namespaced_pod(namespace, label_selector=f"kubeforge.dev/job-name={name}").items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            index = int((pod.metadata.labels or {}).get("kubeforge.dev/replica-index", "0"))
            replicas.append(ReplicaStatus(id=index, role=role_name,
                                          state=REPLICA_STATE.get(pod.status.phase, AppState.UNKNOWN),
                                          hostname=pod.metadata.name))
        ep = spec.get("entrypoint") or {}
        role = Role(name=role_name, image=res.get("image", ""), num_replicas=int(res.get("numNodes", 1)),
                    entrypoint=ep.get("script") or ep.get("module") or "", args=list(ep.get("args") or []))
        progress = status.get("progress") or {}
        msg = status.get("message") or ""
        if progress.get("step") is not None:
            msg = f"{msg} (step {progress['step']}" + (f", loss {progress['loss']}" if progress.get("loss")
                                                       is not None else "") + ")"
        return DescribeAppResponse(app_id=app_id, state=state, num_restarts=int(status.get("restarts", 0)),
                                   msg=msg, roles=[role], roles_statuses=[RoleStatus(role_name, replicas)],
                                   metadata={"phase": status.get("phase") or "",
                                             "lastCheckpoint": str((status.get("lastCheckpoint") or {})
                                                                   .get("uri", ""))})

    def list(self, cfg: Mapping[str, Any] | None = None) -> list[ListAppResponse]:
        namespace = (cfg or {}).get("namespace") or "default"
        items = self._custom().list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        out = []
        for obj in items:
            state = STATE_OF_PHASE.get((obj.get("status") or {}).get("phase") or "Pending", AppState.UNKNOWN)
            if (obj["metadata"].get("annotations") or {}).get(CANCELLED_ANNOTATION) and state not in (
                    AppState.SUCCEEDED, AppState.FAILED):
                state = AppState.CANCELLED
            out.append(ListAppResponse(app_id=f"{namespace}:{obj['metadata']['name']}", state=state,
                                       name=obj["metadata"]["name"]))
        return out

    def log_iter(self, app_id: str, role_name: str, k: int = 0, regex: str | None = None,
                 since: datetime | None = None, until: datetime | None = None, should_tail: bool = False,
                 streams: Stream | None = None) -> Iterable[str]:
        if until is not None:
            raise ValueError("the Kubernetes API has no `until` for logs")
        if streams not in (None, Stream.COMBINED):
            raise ValueError("pod logs are one combined stream")
        namespace, name = app_id.split(":", 1)
        args: dict[str, Any] = {"name": f"{name}-worker-{k}", "namespace": namespace, "container": "trainer"}
        if since is not None:
            args["since_seconds"] = max(1, int((datetime.now() - since).total_seconds()))
        core = self._core()
        if should_tail:
            from kubernetes import watch

            lines: Iterable[str] = (f"{line}\n" for line in watch.Watch().stream(core.read_namespaced_pod_log,
                                                                                 **args))
        else:
            lines = split_lines(core.read_namespaced_pod_log(**args))
        return filter_regex(regex, lines) if regex else lines

    # --- stop
    def _cancel_existing(self, app_id: str) -> None:
        namespace, name = app_id.split(":", 1)
        patch = {"metadata": {"annotations": {CANCELLED_ANNOTATION: "true"}},
                 "spec": {"runPolicy": {"suspend": True}}}
        self._custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)

    def _delete_existing(self, app_id: str) -> None:
        namespace, name = app_id.split(":", 1)
        self._custom().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def create_scheduler(session_name: str, client: Any | None = None, **kwargs: Any) -> KubeforgeScheduler:
    """The `torchx.schedulers` entry point."""
    return KubeforgeScheduler(session_name, client=client)
