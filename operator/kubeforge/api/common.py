"""Spec blocks shared by every kind: model, data, resources, checkpoint, scheduling, runPolicy."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import ApiModel

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

S3Uri = Annotated[str, Field(pattern=S3_URI_PATTERN, max_length=1024)]
# The pattern reaches the CRD only (strings; integers pass it): validate() words its own message for it.
Quantity = Annotated[
    int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN})
]
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]

JobKind = Literal["PretrainJob", "ContextExtensionJob", "RLJob"]


class ObjectRef(ApiModel):
    """A kubeforge object in the same namespace whose finished output is used."""

    kind: JobKind
    """Kind of the producing object: PretrainJob, ContextExtensionJob or RLJob."""
    name: Name
    """Name of the producing object in this namespace."""


class SecretRef(ApiModel):
    """A Secret in the job's namespace holding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL."""

    name: Name
    """Name of the Secret."""


class TokenizerSource(ApiModel):
    """Where the tokenizer comes from: a Hugging Face tokenizer directory in S3, or a built-in one."""

    uri: S3Uri | None = None
    """s3:// URI of a directory with tokenizer.json / tokenizer_config.json."""
    builtin: Literal["byte"] | None = None
    """A tokenizer shipped with kubeforge: `byte` (byte-level, 259 tokens) for tests and demos."""


class ModelSource(ApiModel):
    """The model to start from: exactly one of uri, from or config."""

    uri: S3Uri | None = None
    """s3:// URI of a Hugging Face-format model directory."""
    from_: ObjectRef | None = Field(default=None, alias="from")
    """The finished output (status.output.uri) of another kubeforge object in this namespace."""
    config: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "x-kubernetes-preserve-unknown-fields": True,
            # Declared so the CRD's CEL rules can read them (undeclared fields of a free-form object cannot be).
            "properties": {
                "model_type": {"type": "string", "description": "Hugging Face model type, e.g. llama."},
                "max_position_embeddings": {
                    "type": "number",
                    "description": "Longest sequence the model's position embeddings cover.",
                },
            },
        },
    )
    """A Hugging Face model config (e.g. a Llama config with model_type) to train from scratch."""
    tokenizer: TokenizerSource | None = None
    """Tokenizer to use (training and serving); defaults to the one stored with the model."""
    secret_ref: SecretRef | None = None
    """Secret (AWS_* keys) for the model and tokenizer; default: checkpoint.secretRef (serving: pod identity)."""


class DataSource(ApiModel):
    """Training data: text or JSON lines files (plain, .gz or .zst) under an s3:// prefix, streamed and packed."""

    uri: S3Uri
    """s3:// prefix (or a single object) holding the data files."""
    format: Literal["text", "jsonl"] = "jsonl"
    """File format: plain text documents, or JSON lines with a text field."""
    text_field: str = Field(default="text", min_length=1, max_length=128)
    """Field of each JSON line holding the document text."""
    secret_ref: SecretRef | None = None
    """Secret (AWS_* keys) to read the data; default: checkpoint.secretRef."""
    shuffle_seed: int = Field(default=0, ge=0)
    """Seed for the file order shuffle; the same seed replays the same order on resume."""


class EnvVar(ApiModel):
    """An environment variable for the workload containers."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """Variable name."""
    value: str = ""
    """Variable value."""


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = None
    """Taint key the toleration applies to; empty matches all keys."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal."""
    value: str | None = None
    """Taint value the toleration matches."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class PodTemplate(ApiModel):
    """What every pod of a role gets: image, compute resources, env and placement."""

    image: str | None = Field(default=None, min_length=1, max_length=512)
    """Container image with kubeforge's runtime; default: the operator's image for the role (chart values)."""
    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Resource requests per pod, e.g. cpu, memory, nvidia.com/gpu."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Resource limits per pod; nvidia.com/gpu must equal its request when both are set."""
    env: list[EnvVar] = Field(default_factory=list, max_length=128)
    """Extra environment variables."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Tolerations of the pods."""
    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass of the pods (and of the Kueue Workload)."""


class Resources(PodTemplate):
    """The gang: how many nodes, how many processes per node, and what every pod gets."""

    num_nodes: int = Field(default=1, ge=1, le=4096)
    """Number of worker pods (one per node)."""
    processes_per_node: int = Field(default=1, ge=1, le=64)
    """Processes torchrun starts per pod (usually one per GPU)."""


class CheckpointSpec(ApiModel):
    """Where and how often the runtime checkpoints, and the credentials for that store."""

    uri: S3Uri
    """s3:// prefix that holds step-NNNNNNNN/ checkpoints, the latest pointer and final/."""
    interval_steps: int = Field(default=100, ge=1)
    """Save a checkpoint every this many optimizer steps."""
    keep: int = Field(default=3, ge=1, le=1000)
    """Number of newest committed checkpoints kept; older ones are deleted."""
    secret_ref: SecretRef | None = None
    """Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_ENDPOINT_URL."""
    endpoint: str | None = Field(default=None, pattern=r"^https?://[^\s]+$", max_length=512)
    """Endpoint URL of an S3-compatible store; overrides the Secret's AWS_ENDPOINT_URL."""


class SchedulingSpec(ApiModel):
    """Gang scheduling: all pods of a job start together or not at all."""

    queue_name: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Kueue LocalQueue name; when set, a Kueue Workload gates the pods."""
    gang: Literal["kueue", "volcano", "coscheduling", "builtin"] | None = None
    """Gang backend; defaults to kueue when queueName is set, else builtin (the operator's own)."""
    schedule_timeout_seconds: int = Field(default=300, ge=1)
    """Builtin/coscheduling gangs: time for the whole gang to be running before it is torn down."""
    priority: int | None = None
    """Workload priority passed to Kueue."""


class RunPolicy(ApiModel):
    """Lifecycle: suspension, restart budget and deadlines."""

    suspend: bool = False
    """Stop all pods (after a checkpoint) and keep the job; setting it back to false resumes."""
    max_restarts: int = Field(default=3, ge=0, le=1000)
    """Gang restarts after failures before the job fails; preemptions do not count."""
    backoff_seconds: int = Field(default=10, ge=0, le=3600)
    """Base of the exponential backoff between gang restarts."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job with DeadlineExceeded when it has run this long."""
    progress_deadline_seconds: int | None = Field(default=None, ge=1)
    """Restart the gang when no progress has been reported for this long (a hung collective)."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the job this long after it succeeded or failed."""
    termination_grace_period_seconds: int = Field(default=300, ge=1, le=86400)
    """Grace of every pod after SIGTERM (suspension, eviction, preemption): it must cover finishing the
    current step plus uploading a whole checkpoint, else the kubelet kills the pod mid-upload and the work
    since the previous checkpoint is lost."""


class OptimizerSpec(ApiModel):
    """AdamW with warmup and a decay schedule."""

    lr: float = Field(default=3e-4, gt=0, le=10)
    """Peak learning rate."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(default=0.95, ge=0, lt=1)
    """AdamW beta2."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""


class ParallelismSpec(ApiModel):
    """How the model is spread over the processes."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp replicates the model; fsdp shards parameters, gradients and optimizer state (FSDP2)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""
