"""The four kinds: PretrainJob, ContextExtensionJob, RLJob and InferenceDeployment."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel
from .common import (
    CheckpointSpec,
    DataSource,
    ModelSource,
    Name,
    ObjectRef,
    OptimizerSpec,
    ParallelismSpec,
    PodTemplate,
    Resources,
    RunPolicy,
    S3Uri,
    SchedulingSpec,
)

# ---------------------------------------------------------------------------------------------------------
# PretrainJob


class TrainingSpec(ApiModel):
    """How long and how wide to train."""

    total_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run; exactly one of totalSteps or totalTokens."""
    total_tokens: int | None = Field(default=None, ge=1)
    """Training tokens to consume; converted to steps with globalBatchSize x seqLen."""
    seq_len: int = Field(default=2048, ge=8, le=1 << 24)
    """Tokens per packed training sequence."""
    global_batch_size: int = Field(default=8, ge=1)
    """Sequences per optimizer step over the whole gang."""
    micro_batch_size: int = Field(default=1, ge=1)
    """Sequences per forward/backward per process; the rest is gradient accumulation."""
    log_interval_steps: int = Field(default=1, ge=1)
    """Report progress every this many steps."""
    seed: int = Field(default=0, ge=0)
    """Seed for initialisation and data order."""
    on_divergence: Literal["Fail", "Restart"] = "Fail"
    """A non-finite loss (NaN/Inf): Fail stops the job at once with reason Diverged (retrying from the same
    checkpoint and data replays the same NaN); Restart restarts the gang from the newest checkpoint,
    spending the restart budget (for a divergence that does not reproduce, e.g. a hardware fault)."""


class EntrypointSpec(ApiModel):
    """Your own training program in the image, started by torchrun in every pod of the gang."""

    module: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
                               max_length=256)
    """Python module to run, as torchrun -m (e.g. mypkg.train); exactly one of module or script."""
    script: str | None = Field(default=None, min_length=1, max_length=1024)
    """Path of a Python script in the image (e.g. /workspace/train.py); exactly one of module or script."""
    args: list[str] = Field(default_factory=list, max_length=256)
    """Arguments passed to the module or script."""


# The built-in trainer's settings: a job sets these or entrypoint, never both.
BUILTIN_TRAINER_FIELDS = {"model": "model", "data": "data", "training": "training", "optimizer": "optimizer",
                          "parallelism": "parallelism"}


class PretrainJobSpec(ApiModel):
    """Train a causal language model from scratch or continue pre-training, checkpointing to S3."""

    model: ModelSource | None = None
    """Model to train: config (from scratch), uri or from (continue). Built-in trainer only."""
    data: DataSource | None = None
    """Training data. Built-in trainer only."""
    training: TrainingSpec | None = None
    """Steps, sequence length and batch sizes. Built-in trainer only."""
    entrypoint: EntrypointSpec | None = None
    """Run your own training script instead of the built-in trainer (then model, data, training, optimizer
    and parallelism are not set)."""
    checkpoint: CheckpointSpec
    """Checkpoint store; the final model goes to <uri>/final/."""
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    """Optimizer and learning-rate schedule."""
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    """Data parallelism strategy and precision."""
    resources: Resources = Field(default_factory=Resources)
    """Gang size and per-pod resources."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Gang scheduling."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Suspension, restarts and deadlines."""


# ---------------------------------------------------------------------------------------------------------
# ContextExtensionJob

RopeTheta = Annotated[
    int | Literal["auto"],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


class ScalingSpec(ApiModel):
    """How RoPE is adapted to longer contexts."""

    method: Literal["theta", "yarn", "linear", "ntk", "llama3"] = "theta"
    """theta raises rope_theta per stage; yarn/linear/ntk/llama3 set rope_scaling."""
    original_max_position_embeddings: int | None = Field(default=None, ge=1)
    """Context length the base model was trained at; defaults to its config."""


class Stage(ApiModel):
    """One stage of progressive extension."""

    seq_len: int = Field(ge=128, le=1 << 24)
    """Training sequence length of this stage."""
    rope_theta: RopeTheta = "auto"
    """RoPE base for this stage, or auto to scale it with the length ratio."""
    steps: int = Field(ge=1)
    """Optimizer steps in this stage."""
    batch_tokens: int = Field(ge=1)
    """Tokens per optimizer step over the whole gang; a multiple of seqLen."""
    lr: float = Field(default=2e-5, gt=0, le=10)
    """Peak learning rate of this stage."""


class SequenceParallelSpec(ApiModel):
    """Split each sequence over several processes."""

    impl: Literal["ring", "zigzag", "ulysses"] = "ring"
    """ring attention, its load-balanced zigzag variant, or ulysses all-to-all over heads."""
    degree: int = Field(default=1, ge=1, le=1024)
    """Processes one sequence is split over; divides the world size."""
    num_attention_heads: int | None = Field(default=None, ge=1)
    """The model's attention heads, so ulysses (which splits heads) is checked at admission too."""


class NeedleEval(ApiModel):
    """Needle-in-a-haystack retrieval grid."""

    lengths: list[int] = Field(default_factory=list, max_length=64)
    """Context lengths to test."""
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], max_length=64)
    """Needle positions as fractions of the context (0 = start, 1 = end)."""


class EvalSpec(ApiModel):
    """Evaluations run after each stage."""

    needle: NeedleEval = Field(default_factory=NeedleEval)
    """Needle-in-a-haystack grid."""
    perplexity_lengths: list[int] = Field(default_factory=list, max_length=64)
    """Context lengths at which held-out perplexity is measured."""


class ContextExtensionJobSpec(ApiModel):
    """Extend a model's context window in progressive stages."""

    model: ModelSource
    """Model to extend: uri or from."""
    data: DataSource
    """Long-document training data."""
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    """RoPE scaling method."""
    stages: list[Stage] = Field(min_length=1, max_length=32)
    """Stages in increasing seqLen."""
    sequence_parallel: SequenceParallelSpec = Field(default_factory=SequenceParallelSpec)
    """Sequence (context) parallelism."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluations after each stage."""
    checkpoint: CheckpointSpec
    """Checkpoint store; the final model goes to <uri>/final/."""
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    """Optimizer settings; per-stage lr overrides optimizer.lr."""
    resources: Resources = Field(default_factory=Resources)
    """Gang size and per-pod resources."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Gang scheduling."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Suspension, restarts and deadlines."""


# ---------------------------------------------------------------------------------------------------------
# RLJob


class AlgorithmSpec(ApiModel):
    """The policy-optimisation algorithm."""

    name: Literal["grpo", "ppo", "rloo", "dapo"] = "grpo"
    """grpo, ppo, rloo or dapo."""
    group_size: int = Field(default=8, ge=1, le=1024)
    """Completions sampled per prompt (the group for grpo/rloo/dapo advantages)."""
    kl_coef: float = Field(default=0.0, ge=0)
    """Weight of the KL penalty against the reference policy."""
    clip_range: float = Field(default=0.2, gt=0, le=10)
    """PPO-style ratio clip epsilon."""
    clip_range_high: float | None = Field(default=None, gt=0, le=10)
    """Upper clip epsilon (dapo's clip-higher); defaults to clipRange."""
    lr: float = Field(default=1e-6, gt=0, le=10)
    """Learner learning rate."""
    steps: int = Field(default=100, ge=1)
    """Learner optimizer steps."""
    prompts_per_step: int = Field(default=8, ge=1)
    """Prompts per learner step (each expanded to groupSize completions)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo advantage scaling: by the group's reward std, the batch's, or none (Dr. GRPO)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator against the reference (used only when klCoef > 0)."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """ppo: discount over completion tokens."""
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    """ppo: GAE lambda."""
    seed: int = Field(default=0, ge=0)
    """Seed of initialisation, prompt order and sampling."""


BUILTIN_CHECKS = ("exact_match", "contains", "math_answer", "json_valid", "regex_match")


class VerifiableReward(ApiModel):
    """A programmatic check of each completion."""

    check: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]*$", max_length=64)
    """Built-in check: exact_match, contains, math_answer, json_valid or regex_match."""
    entrypoint: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", max_length=256
    )
    """module:function returning a float reward for (prompt, completion, reference)."""


class RewardModelSource(ApiModel):
    """A reward model scoring completions."""

    uri: S3Uri | None = None
    """s3:// URI of a Hugging Face sequence-classification model."""
    from_: ObjectRef | None = Field(default=None, alias="from")
    """The finished output of another kubeforge job in this namespace."""


class JudgeSpec(ApiModel):
    """An LLM judge scoring completions against a rubric."""

    inference_deployment: Name | None = None
    """InferenceDeployment in this namespace serving the judge."""
    url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$", max_length=512)
    """OpenAI-compatible base URL of the judge."""
    rubric: str = Field(min_length=1, max_length=65536)
    """Instructions the judge scores each completion by."""


class RewardSpec(ApiModel):
    """Where rewards come from: exactly one of verifiable, model or judge."""

    verifiable: VerifiableReward | None = None
    """Programmatic check."""
    model: RewardModelSource | None = None
    """Reward model."""
    judge: JudgeSpec | None = None
    """LLM judge."""


class RolloutSpec(ApiModel):
    """The inference engine that samples completions."""

    engine: Literal["vllm", "reference"] = "vllm"
    """vllm on GPU; reference (kubeforge's transformers engine) on CPU."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """colocated shares the learner's GPUs; disaggregated runs separate rollout pods."""
    replicas: int = Field(default=1, ge=1, le=1024)
    """Rollout engine pods when disaggregated."""
    temperature: float = Field(default=1.0, ge=0, le=10)
    """Sampling temperature."""
    max_new_tokens: int = Field(default=512, ge=1, le=1 << 20)
    """Completion length limit."""
    resources: PodTemplate = Field(default_factory=PodTemplate)
    """Per-pod resources of the rollout pods."""


class WeightSyncSpec(ApiModel):
    """How new policy weights reach the rollout engines."""

    interval_steps: int = Field(default=1, ge=1)
    """Push weights to the engines every this many learner steps."""
    method: Literal["nccl", "http"] = "nccl"
    """nccl: a broadcast from the learner to vLLM engines (GPU); http: the reference engines take the weights
    over their own endpoint (CPU)."""
    max_lag: int | None = Field(default=None, ge=0, le=1024)
    """How many policy versions a completion may lag the learner by; older ones are dropped (counted in
    status.rl.droppedStale). Defaults to intervalSteps - 1, the lag the sync interval itself causes."""
    off_policy: Literal["tis", "drop"] = "tis"
    """Completions sampled by an older policy version (within maxLag): tis keeps them, each token's loss weighted
    by the truncated importance ratio min(pi_learner / pi_sampler, tisCap); drop drops them."""
    tis_cap: float = Field(default=2.0, ge=1, le=100)
    """Truncation of the importance ratio (tis)."""


class RLJobSpec(ApiModel):
    """Post-train a policy with reinforcement learning."""

    model: ModelSource
    """Initial policy: uri or from."""
    data: DataSource
    """Prompts (JSON lines with a prompt and optional reference answer)."""
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    """Algorithm and its hyperparameters."""
    reward: RewardSpec
    """Reward source."""
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    """Rollout engine."""
    weight_sync: WeightSyncSpec = Field(default_factory=WeightSyncSpec)
    """Learner to engine weight sync."""
    checkpoint: CheckpointSpec
    """Checkpoint store; the final policy goes to <uri>/final/."""
    resources: Resources = Field(default_factory=Resources)
    """Learner gang size and per-pod resources."""
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    """Learner parallelism."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Gang scheduling."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Suspension, restarts and deadlines."""


# ---------------------------------------------------------------------------------------------------------
# InferenceDeployment


class AutoscalingSpec(ApiModel):
    """Scale a pool between min and max on its own signal, read from the router."""

    min_replicas: int = Field(default=1, ge=0, le=1024)
    """Fewest pods."""
    max_replicas: int = Field(default=1, ge=1, le=1024)
    """Most pods."""
    metric: Literal["queueDepth", "ttft", "inFlight", "itl"] | None = None
    """Signal; defaults to queueDepth for prefill and inFlight for decode and aggregated pools."""
    target: float = Field(default=4.0, gt=0)
    """Target value of the signal per pod (requests, or seconds for ttft/itl)."""
    scale_down_stabilization_seconds: int = Field(default=120, ge=0)
    """Scale down only to the highest recommendation seen in this window."""


class Pool(PodTemplate):
    """A pool of engine pods."""

    replicas: int = Field(default=1, ge=0, le=1024)
    """Pods when autoscaling is off."""
    tensor_parallel: int = Field(default=1, ge=1, le=64)
    """Tensor-parallel size of each engine (GPUs per pod)."""
    autoscaling: AutoscalingSpec | None = None
    """Autoscaling; replicas is the starting point when set."""
    extra_args: list[str] = Field(default_factory=list, max_length=64)
    """Extra engine arguments appended verbatim."""


class KVTransferSpec(ApiModel):
    """KV-cache hand-off from prefill to decode."""

    connector: Literal["NixlConnector", "Reference"] = "NixlConnector"
    """NixlConnector (vllm) or Reference (reference engine): the router implements their flow only."""
    # P2pNcclConnector, LMCacheConnectorV1 and MooncakeConnector need a proxy kubeforge's router is not
    # (concurrent prefill/decode legs, bootstrap parameters), so they are refused rather than half-rendered.
    failure_policy: Literal["fail", "recompute"] = "recompute"
    """On a failed KV load: fail the request, or recompute the prefill on the decode pod."""
    side_channel_port: int = Field(default=5600, ge=1024, le=65535)
    """NIXL side-channel port."""
    buffer_device: Literal["cuda", "cpu"] = "cuda"
    """Where the connector stages KV blocks."""


class RouterSpec(ApiModel):
    """The OpenAI-compatible router in front of the pools."""

    enabled: bool | None = None
    """Run a router; always on when disaggregated, off by default when aggregated."""
    replicas: int = Field(default=1, ge=1, le=64)
    """Router pods."""
    prefill_threshold_tokens: int = Field(default=0, ge=0)
    """Prompts shorter than this skip the prefill pool and go straight to decode."""
    picking: Literal["least-outstanding", "round-robin"] = "least-outstanding"
    """How a pod is picked within a pool."""
    image: str | None = Field(default=None, max_length=512)
    """Router image; defaults to the pools' image."""
    request_timeout_seconds: float = Field(default=600, gt=0, le=86400)
    """Longest non-streaming answer; beyond it the client gets 504."""
    stream_timeout_seconds: float = Field(default=0, ge=0, le=604800)
    """Longest whole stream; 0: no bound (a stream that stops sending for a minute ends anyway)."""
    max_in_flight: int = Field(default=1024, ge=1, le=1_000_000)
    """Client requests one router pod serves at once, streams until their end; more are answered 429."""


class InferenceDeploymentSpec(ApiModel):
    """Serve a model with vLLM (or the reference engine), aggregated or disaggregated."""

    model: ModelSource
    """Model to serve: uri or from (config is not servable)."""
    engine: Literal["vllm", "reference"] = "vllm"
    """vllm on GPU; reference (kubeforge's transformers engine) on CPU."""
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    """aggregated: one pool; disaggregated: prefill and decode pools with KV transfer."""
    served_model_name: str | None = Field(default=None, min_length=1, max_length=256)
    """Model name clients send; defaults to the object's name."""
    max_model_len: int | None = Field(default=None, ge=16, le=1 << 24)
    """Context length limit of the engines."""
    block_size: Literal[1, 8, 16, 32, 64, 128, 256] | None = None
    """KV-cache block size in tokens (the sizes vLLM accepts)."""
    pool: Pool | None = None
    """The single pool when aggregated."""
    prefill: Pool | None = None
    """Prefill pool when disaggregated."""
    decode: Pool | None = None
    """Decode pool when disaggregated."""
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec)
    """KV-cache transfer when disaggregated."""
    router: RouterSpec = Field(default_factory=RouterSpec)
    """Router."""
    port: int = Field(default=8000, ge=1024, le=65535)
    """Port of the engines and of the Service."""
