"""Status shared by the kinds: phase, metav1-shaped conditions, progress, checkpoint and output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import StatusModel

# Condition types. kstatus (Argo CD, Flux) reads Ready / Reconciling / Stalled; the rest describe jobs.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
ADMITTED = "Admitted"
RUNNING = "Running"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"

# one condition per type, as metav1.Condition lists are (server-side apply merges them by type)
CONDITIONS_LIST = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}

JobPhase = Literal["Pending", "Queued", "Starting", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
ServingPhase = Literal["Pending", "WaitingForModel", "Progressing", "Ready", "Degraded", "Failed"]


class Condition(StatusModel):
    """A condition shaped like metav1.Condition."""

    type: str
    """Condition type, e.g. Ready, Reconciling, Stalled, Admitted, Running, Succeeded, Failed."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str = Field(default="Unknown", max_length=1024)
    """CamelCase machine-readable reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""
    last_transition_time: str = ""
    """RFC 3339 time the status last changed."""
    observed_generation: int | None = None
    """metadata.generation this condition was computed from."""


class Progress(StatusModel):
    """Training progress as reported by rank 0."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    tokens: int | None = None
    """Training tokens consumed."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: float | None = None
    """Recent training throughput over the whole gang."""
    percent: int | None = None
    """step / totalSteps in percent."""
    eta: str | None = None
    """Estimated time left, e.g. 1h02m."""
    stage: int | None = None
    """Current stage index (ContextExtensionJob)."""
    reward: float | None = None
    """Mean reward of the latest batch (RLJob)."""
    updated_at: str | None = None
    """When rank 0 last reported."""


class RewardPoint(StatusModel):
    """One point of the reward curve."""

    step: int
    """Learner step."""
    reward: float
    """Mean reward of that step's batch."""


class RLStatus(StatusModel):
    """RLJob metrics of the latest learner step, as reported by rank 0."""

    initial_reward: float | None = None
    """Mean reward of the first step's batch: the starting policy's."""
    reward_std: float | None = None
    """Standard deviation of the latest batch's rewards."""
    kl: float | None = None
    """Mean KL to the reference (0 when klCoef is 0)."""
    response_length: float | None = None
    """Mean completion length in tokens."""
    reward_failures: int | None = None
    """Completions whose reward could not be computed (e.g. an unparsable judge reply), in total."""
    dropped_stale: int | None = None
    """Completions dropped because an engine sampled them with a stale policy version, in total."""
    importance_corrected: int | None = None
    """Completions an older policy version sampled (within weightSync.maxLag) kept with truncated importance
    weights, in total."""
    policy_version: int | None = None
    """Policy version the learner last published."""
    engine_versions: list[int] = Field(default_factory=list)
    """Policy version each rollout engine serves."""
    reward_curve: list[RewardPoint] = Field(default_factory=list, max_length=64)
    """Recent (step, mean reward) points."""


FREE_FORM: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class StageStatus(StatusModel):
    """One stage of a ContextExtensionJob."""

    index: int
    """0-based position in spec.stages."""
    seq_len: int
    """Training sequence length."""
    rope_theta: float | None = None
    """Effective RoPE base (auto resolved)."""
    rope_scaling: dict[str, Any] | None = Field(default=None, json_schema_extra=FREE_FORM)
    """RoPE scaling block (yarn, linear, llama3), when the method sets one."""
    state: Literal["Pending", "Running", "Succeeded", "Failed"] = "Pending"
    """Where the stage is."""
    steps: int | None = None
    """Optimizer steps of the stage."""
    steps_done: int | None = None
    """Steps done in the stage."""
    loss: float | None = None
    """Latest training loss in the stage."""
    tokens_per_second: float | None = None
    """Latest throughput in the stage."""
    evals: dict[str, Any] | None = Field(default=None, json_schema_extra=FREE_FORM)
    """Results after the stage: perplexity per length, needleScore (share of the grid retrieved)."""


class CheckpointRef(StatusModel):
    """The newest committed checkpoint."""

    uri: str
    """s3:// URI of the step directory."""
    step: int
    """Step it was taken at."""
    time: str | None = None
    """When its manifest was committed."""


class Output(StatusModel):
    """What the finished job produced."""

    uri: str
    """s3:// URI of the Hugging Face-format model directory."""


class SourceRef(StatusModel):
    """The model.from output this object consumed, pinned the first time it was resolved: a re-created source
    of the same name never changes what an object that started from it uses."""

    kind: str
    """Kind of the producing object."""
    name: str
    """Name of the producing object."""
    uid: str | None = None
    """metadata.uid of the producing object when its output was taken."""
    generation: int | None = None
    """metadata.generation of the producing object when its output was taken."""
    uri: str
    """The producing object's status.output.uri at that time: what this object uses."""
    resolved_at: str | None = None
    """When it was pinned."""


class JobStatus(StatusModel):
    """Observed state of a training job."""

    phase: JobPhase | None = None
    """Pending, Queued, Starting, Running, Restarting, Suspended, Succeeded or Failed."""
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    """Latest observations; Ready/Reconciling/Stalled follow kstatus."""
    observed_generation: int | None = None
    """metadata.generation the status reflects."""
    attempt: int = 0
    """Current gang attempt (the pods' kubeforge.dev/attempt label)."""
    restarts: int = 0
    """Gang restarts spent after failures (preemptions excluded)."""
    preemptions: int = 0
    """Times the gang was stopped by eviction, suspension or a scheduling timeout."""
    start_time: str | None = None
    """When the first gang started running."""
    completion_time: str | None = None
    """When the job succeeded or failed."""
    gang_created_at: str | None = None
    """When the current gang's pods were created (for the builtin gang timeout)."""
    backoff_until: str | None = None
    """No new gang is created before this time."""
    resolved_model_uri: str | None = None
    """The model URI after resolving model.from."""
    source: SourceRef | None = None
    """model.from: the source output consumed (kind, name, uid, generation, uri), pinned at first resolution."""
    progress: Progress | None = None
    """Progress reported by rank 0."""
    rl: RLStatus | None = None
    """RLJob: rewards, KL, response length and engines' policy versions."""
    last_checkpoint: CheckpointRef | None = None
    """Newest committed checkpoint."""
    output: Output | None = None
    """Finished model."""
    message: str | None = None
    """Short human summary of the current state."""
    stages: list[StageStatus] | None = None
    """ContextExtensionJob: every stage's length, RoPE, state, loss, throughput and evals."""
    current_stage: str | None = None
    """ContextExtensionJob: the stage running now, as "2/3 512" (stage/stages seqLen)."""


class PoolStatus(StatusModel):
    """Observed state of one serving pool."""

    replicas: int = 0
    """Pods that exist."""
    ready_replicas: int = 0
    """Pods ready to serve."""
    desired_replicas: int = 0
    """Replicas the operator (or its autoscaler) wants."""
    last_scale_time: str | None = None
    """When the autoscaler last changed desiredReplicas."""


class ServedModel(StatusModel):
    """What the engines serve, as their model fetch found it."""

    uri: str | None = None
    """s3:// URI of the model directory served."""
    provenance: dict[str, Any] | None = Field(default=None, json_schema_extra=FREE_FORM)
    """Summary of the model folder's kubeforge-provenance.json (kind, name, uid, steps, final loss or
    reward, evals, created) and its source chain; absent when the folder has none."""


class ServingStatus(StatusModel):
    """Observed state of an InferenceDeployment."""

    phase: ServingPhase | None = None
    """Pending, WaitingForModel, Progressing, Ready, Degraded or Failed."""
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    """Latest observations; Ready is True only when a request can be served."""
    observed_generation: int | None = None
    """metadata.generation the status reflects."""
    resolved_model_uri: str | None = None
    """The model URI after resolving model.from."""
    source: SourceRef | None = None
    """model.from: the source output served (kind, name, uid, generation, uri), pinned at first resolution."""
    model: ServedModel | None = None
    """The model served and its provenance."""
    endpoint: str | None = None
    """In-cluster base URL of the OpenAI-compatible API."""
    ready_pools: str | None = None
    """Ready pools over pools, e.g. 2/2."""
    pools: dict[str, PoolStatus] = Field(default_factory=dict)
    """Per pool (aggregated, prefill, decode, router) replica counts."""
    message: str | None = None
    """Short human summary of the current state."""
