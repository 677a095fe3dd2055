"""Every kind kubeforge serves, with what the CRD needs beyond the schema: names, columns, CEL rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .kinds import (
    ContextExtensionJobSpec,
    InferenceDeploymentSpec,
    PretrainJobSpec,
    RLJobSpec,
)
from .status import JobStatus, ServingStatus

CATEGORY = "kubeforge"


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str
    description: str
    priority: int = 0

    def to_crd(self) -> dict[str, Any]:
        col: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "jsonPath": self.json_path,
            "description": self.description,
        }
        if self.priority:
            col["priority"] = self.priority
        return col


@dataclass(frozen=True)
class CelRule:
    """An x-kubernetes-validations rule at a path of the spec schema ("" is spec itself)."""

    path: str
    rule: str
    message: str


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_name: str
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    description: str
    columns: tuple[PrinterColumn, ...]
    cel_rules: tuple[CelRule, ...] = field(default=())

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def is_job(self) -> bool:
        return self.status_model is JobStatus


JOB_COLUMNS = (
    PrinterColumn("Phase", ".status.phase", "string", "Lifecycle phase"),
    PrinterColumn("Progress", ".status.progress.percent", "integer", "Percent of steps done"),
    PrinterColumn("Step", ".status.progress.step", "integer", "Optimizer steps done"),
    PrinterColumn("Loss", ".status.progress.loss", "number", "Latest training loss"),
    PrinterColumn("Restarts", ".status.restarts", "integer", "Gang restarts after failures"),
    PrinterColumn("Age", ".metadata.creationTimestamp", "date", "Time since creation"),
    PrinterColumn("ETA", ".status.progress.eta", "string", "Estimated time left", priority=1),
    PrinterColumn("Output", ".status.output.uri", "string", "Finished model", priority=1),
)

# Rules both the API server (CEL, v1.25+) and kubeforge.api.validation enforce. The Python validator is the
# one every server runs (older API servers drop x-kubernetes-validations); tests keep the two in step.
MODEL_RULES = (
    CelRule(
        "model",
        "(has(self.uri) ? 1 : 0) + (has(self.from) ? 1 : 0) + (has(self.config) ? 1 : 0) == 1",
        "exactly one of uri, from or config must be set",
    ),
    # Not `self == oldSelf`: CEL compares JSON numbers by type, so a replace that sends `rope_theta: 10000.0`
    # for the stored `10000` would be refused. The typed parts are compared here; model.config's contents
    # (free-form numbers) by validate(), which compares numbers by value.
    CelRule(
        "model",
        "has(self.uri) == has(oldSelf.uri) && (!has(self.uri) || self.uri == oldSelf.uri) && "
        "has(self.from) == has(oldSelf.from) && (!has(self.from) || self.from == oldSelf.from) && "
        "has(self.config) == has(oldSelf.config) && "
        "has(self.tokenizer) == has(oldSelf.tokenizer) && (!has(self.tokenizer) || self.tokenizer == oldSelf.tokenizer)",
        "is immutable",
    ),
    CelRule(
        "model.tokenizer",
        "(has(self.uri) ? 1 : 0) + (has(self.builtin) ? 1 : 0) == 1",
        "exactly one of uri or builtin must be set",
    ),
)
GPU_RULE = "!('nvidia.com/gpu' in self) || string(self['nvidia.com/gpu']).matches('^[0-9]+$')"
GPU_MESSAGE = "nvidia.com/gpu must be a whole number"


def _gpu_rules(prefix: str) -> tuple[CelRule, ...]:
    return (
        CelRule(f"{prefix}.requests", GPU_RULE, GPU_MESSAGE),
        CelRule(f"{prefix}.limits", GPU_RULE, GPU_MESSAGE),
    )


KINDS: tuple[Kind, ...] = (
    Kind(
        kind="PretrainJob",
        plural="pretrainjobs",
        short_name="ptj",
        spec_model=PretrainJobSpec,
        status_model=JobStatus,
        description="Train a causal language model from scratch or continue pre-training.",
        columns=JOB_COLUMNS,
        cel_rules=(
            *MODEL_RULES,
            *_gpu_rules("resources"),
            CelRule(
                "training",
                "(has(self.totalSteps) ? 1 : 0) + (has(self.totalTokens) ? 1 : 0) == 1",
                "exactly one of totalSteps or totalTokens must be set",
            ),
        ),
    ),
    Kind(
        kind="ContextExtensionJob",
        plural="contextextensionjobs",
        short_name="cej",
        spec_model=ContextExtensionJobSpec,
        status_model=JobStatus,
        description="Extend a model's context window in progressive stages.",
        columns=JOB_COLUMNS,
        cel_rules=(
            *MODEL_RULES,
            *_gpu_rules("resources"),
            CelRule(
                "stages",
                "self.map(s, s.seqLen).isSorted() && self.all(a, "
                "self.map(s, s.seqLen).indexOf(a.seqLen) == self.map(s, s.seqLen).lastIndexOf(a.seqLen))",
                "seqLen must increase from stage to stage",
            ),
            CelRule(
                "",
                "!has(self.sequenceParallel) || self.sequenceParallel.impl != 'zigzag' || "
                "self.stages.all(s, s.seqLen % (2 * self.sequenceParallel.degree) == 0)",
                "zigzag needs every stage's seqLen divisible by 2 x sequenceParallel.degree",
            ),
        ),
    ),
    Kind(
        kind="RLJob",
        plural="rljobs",
        short_name="rlj",
        spec_model=RLJobSpec,
        status_model=JobStatus,
        description="Post-train a policy with reinforcement learning (GRPO, PPO, RLOO, DAPO).",
        columns=JOB_COLUMNS,
        cel_rules=(
            *MODEL_RULES,
            *_gpu_rules("resources"),
            CelRule(
                "reward",
                "(has(self.verifiable) ? 1 : 0) + (has(self.model) ? 1 : 0) + (has(self.judge) ? 1 : 0) == 1",
                "exactly one of verifiable, model or judge must be set",
            ),
        ),
    ),
    Kind(
        kind="InferenceDeployment",
        plural="inferencedeployments",
        short_name="infd",
        spec_model=InferenceDeploymentSpec,
        status_model=ServingStatus,
        description="Serve a model with vLLM, aggregated or with disaggregated prefill and decode pools.",
        columns=(
            PrinterColumn("Phase", ".status.phase", "string", "Serving phase"),
            PrinterColumn("Mode", ".spec.mode", "string", "aggregated or disaggregated"),
            PrinterColumn("Ready", ".status.readyPools", "string", "Ready pools / pools"),
            PrinterColumn("Endpoint", ".status.endpoint", "string", "OpenAI-compatible base URL"),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date", "Time since creation"),
            PrinterColumn("Model", ".status.resolvedModelUri", "string", "Model served", priority=1),
        ),
        cel_rules=(
            *MODEL_RULES,
            CelRule(
                "",
                "self.mode != 'aggregated' || (has(self.pool) && !has(self.prefill) && !has(self.decode))",
                "aggregated mode needs pool and no prefill/decode pools",
            ),
            CelRule(
                "",
                "self.mode != 'disaggregated' || (has(self.prefill) && has(self.decode) && !has(self.pool))",
                "disaggregated mode needs prefill and decode pools and no pool",
            ),
            CelRule(
                "",
                "self.mode != 'disaggregated' || !has(self.prefill) || !has(self.decode) || "
                "(has(self.kvTransfer) && self.kvTransfer.connector != 'NixlConnector') || "
                "self.decode.tensorParallel >= self.prefill.tensorParallel",
                "NixlConnector needs decode.tensorParallel >= prefill.tensorParallel",
            ),
            CelRule("mode", "self == oldSelf", "is immutable; create a new InferenceDeployment"),
            CelRule("pool.autoscaling", "self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas"),
            CelRule(
                "prefill.autoscaling", "self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas"
            ),
            CelRule(
                "decode.autoscaling", "self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas"
            ),
            *_gpu_rules("pool"),
            *_gpu_rules("prefill"),
            *_gpu_rules("decode"),
        ),
    ),
)

BY_KIND: dict[str, Kind] = {k.kind: k for k in KINDS}
BY_PLURAL: dict[str, Kind] = {k.plural: k for k in KINDS}
