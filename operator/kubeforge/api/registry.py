"""Every kind kubeforge serves, with what the CRD needs beyond the schema: names, columns, CEL rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from pydantic import BaseModel

from .kinds import (
    BUILTIN_CHECKS,
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
    """An x-kubernetes-validations rule at a path of the spec schema ("" is spec itself, "stages[]" a list's
    items, "/" the whole object, where metadata.name, status and oldSelf's status can be read).

    field_path (a JSON path relative to `path`, e.g. ".training.seqLen") is the field the server names in
    its error, so it matches validate()'s; message_expression builds the message from the values.
    """

    path: str
    rule: str
    message: str
    field_path: str = ""
    message_expression: str = ""


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

RL_COLUMNS = (
    *JOB_COLUMNS[:3],
    PrinterColumn("Reward", ".status.progress.reward", "number", "Mean reward of the latest batch"),
    *JOB_COLUMNS[4:],
)

# ContextExtensionJob: the stage running now ("2/3 512") right after the phase
EXTENSION_COLUMNS = (
    JOB_COLUMNS[0],
    PrinterColumn("Stage", ".status.currentStage", "string", "Stage running now / stages, and its seqLen"),
    *JOB_COLUMNS[1:],
)

def _fmt(text: str, *args: str) -> str:
    """A messageExpression: `text` with its %d/%s filled from the CEL `args`. format(), because CEL's cost
    estimator prices string(number) + '...' as an unbounded string and the server refuses the CRD."""
    quoted = text.replace("'", "\\'")
    return f"'{quoted}'.format([{', '.join(args)}])"


def _exactly_one(path: str, *fields: str) -> CelRule:
    count = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    # Which fields are set, as validate() words it: a ternary over literals (a list's join() is priced
    # unbounded by the cost estimator). Pairs and triples only: the rule holds when exactly one is set.
    got = "'none'"
    for n in range(2, len(fields) + 1):  # the outermost test is the largest set
        for subset in combinations(fields, n):
            cond = " && ".join(f"has(self.{f})" for f in subset)
            got = f"{cond} ? '{', '.join(subset)}' : {got}"
    text = f"exactly one of {', '.join(fields)} must be set"
    return CelRule(path, f"{count} == 1", text, message_expression=_fmt(text + " (got %s)", got))


# Rules both the API server (CEL, v1.25+) and kubeforge.api.validation enforce. The Python validator is the
# one every server runs (older API servers drop x-kubernetes-validations); tests keep the two in step.
MODEL_RULES = (
    _exactly_one("model", "uri", "from", "config"),
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
    _exactly_one("model.tokenizer", "uri", "builtin"),
)
# spec.entrypoint (your own script) or the built-in trainer's settings, never both
ENTRYPOINT_RULES = (
    CelRule(
        "",
        "has(self.entrypoint) ? !has(self.model) && !has(self.data) && !has(self.training)"
        " && !has(self.optimizer) && !has(self.parallelism)"
        " : has(self.model) && has(self.data) && has(self.training)",
        "exactly one of entrypoint or the built-in trainer's settings (model, data, training) must be set",
    ),
    _exactly_one("entrypoint", "module", "script"),
)
GPU_MESSAGE = "GPUs are requested in whole numbers"


def _whole_gpus(field: str) -> str:
    """CEL on a pod template: its requests or limits (`field`) name no fractional nvidia.com/gpu."""
    return (
        f"!has(self.{field}) || !('nvidia.com/gpu' in self.{field}) || "
        f"string(self.{field}['nvidia.com/gpu']).matches('^[0-9]+$')"
    )


def _gpu_rules(prefix: str) -> tuple[CelRule, ...]:
    # On the template, not the map: the server then names the key as validate() does (requests[nvidia.com/gpu]).
    return (
        *(
            CelRule(
                prefix,
                _whole_gpus(m),
                GPU_MESSAGE,
                field_path=f".{m}['nvidia.com/gpu']",
                message_expression=_fmt(GPU_MESSAGE + " (got '%s')", f"string(self.{m}['nvidia.com/gpu'])"),
            )
            for m in ("requests", "limits")
        ),
        CelRule(
            prefix,
            "!has(self.requests) || !has(self.limits) || !('nvidia.com/gpu' in self.requests) || "
            "!('nvidia.com/gpu' in self.limits) || "
            "string(self.requests['nvidia.com/gpu']) == string(self.limits['nvidia.com/gpu'])",
            "must equal requests[nvidia.com/gpu]; GPUs cannot be overcommitted",
            field_path=".limits['nvidia.com/gpu']",
            message_expression=_fmt(
                "must equal requests[nvidia.com/gpu] (%s); GPUs cannot be overcommitted",
                "string(self.requests['nvidia.com/gpu'])",
            ),
        ),
    )


def _gpu_quantity(t: str) -> str:
    """CEL: the nvidia.com/gpu quantity (a string) one pod of template `t` asks for, '0' when none (as gpus())."""
    return (
        f"(has({t}.limits) && 'nvidia.com/gpu' in {t}.limits ? string({t}.limits['nvidia.com/gpu']) : "
        f"has({t}.requests) && 'nvidia.com/gpu' in {t}.requests ? string({t}.requests['nvidia.com/gpu']) : '0')"
    )


def _has_gpus(t: str) -> str:
    """CEL: one pod of template `t` asks for at least one whole GPU."""
    return f"{_gpu_quantity(t)}.matches('^[0-9]*[1-9][0-9]*$')"


def _no_config(kind: str) -> CelRule:
    return CelRule(
        "model", "!has(self.config)", f"{kind} needs a trained model: use uri or from", field_path=".config"
    )


def _not_itself(kind: str) -> CelRule:
    # On the whole object: metadata.name is readable only there.
    return CelRule(
        "/",
        f"!has(self.spec.model) || !has(self.spec.model.from) || self.spec.model.from.kind != '{kind}' || "
        "self.spec.model.from.name != self.metadata.name",
        "must not refer to this object itself",
        field_path=".spec.model.from.name",
    )


RUNNING = "['Starting', 'Running', 'Restarting']"
SCHEDULING_RULES = (
    CelRule(
        "scheduling",
        "!has(self.gang) || self.gang != 'kueue' || has(self.queueName)",
        "required when gang is kueue",
        field_path=".queueName",
    ),
    CelRule(
        "scheduling",
        "!has(self.queueName) || !has(self.gang) || self.gang == 'kueue'",
        "must be kueue (or unset) when queueName is set",
        field_path=".gang",
        message_expression="'must be kueue (or unset) when queueName is set (got \\'' + self.gang + '\\')'",
    ),
)


def _job_rules(kind: str) -> tuple[CelRule, ...]:
    """Rules every job kind shares: not itself, a gang that keeps its size while it runs, scheduling."""
    frozen = tuple(
        CelRule(
            "/",
            f"!has(oldSelf.status) || !has(oldSelf.status.phase) || !(oldSelf.status.phase in {RUNNING}) || "
            f"(has(self.spec.resources) ? self.spec.resources.{f} : 1) == "
            f"(has(oldSelf.spec.resources) ? oldSelf.spec.resources.{f} : 1)",
            "cannot change while the job is running; suspend it first",
            field_path=f".spec.resources.{f}",
            message_expression="'cannot change while the job is ' + oldSelf.status.phase + '; suspend it first'",
        )
        for f in ("numNodes", "processesPerNode")
    )
    return (_not_itself(kind), *frozen, *SCHEDULING_RULES)


WORLD = "(has(self.resources) ? self.resources.numNodes * self.resources.processesPerNode : 1)"
LAST_SEQ_LEN = "self.stages[size(self.stages) - 1].seqLen"


def _pool_rules(name: str) -> tuple[CelRule, ...]:
    """Rules on one pool of an InferenceDeployment (pool, prefill or decode); engine rules sit on spec."""
    pool = f"self.{name}"
    return (
        *_gpu_rules(name),
        CelRule(
            f"{name}.autoscaling",
            "self.minReplicas <= self.maxReplicas",
            "must be <= maxReplicas",
            field_path=".minReplicas",
            message_expression=_fmt("must be <= maxReplicas (%d)", "self.maxReplicas"),
        ),
        CelRule(
            f"{name}.autoscaling",
            "self.minReplicas >= 1",
            "must be >= 1: a pool cannot scale up from zero yet",
            field_path=".minReplicas",
        ),
        CelRule(
            name,
            "!has(self.autoscaling) || self.autoscaling.minReplicas < 1 || "
            "self.autoscaling.minReplicas > self.autoscaling.maxReplicas || "
            "(self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)",
            "must be between autoscaling.minReplicas and maxReplicas",
            field_path=".replicas",
            message_expression=_fmt(
                "must be between autoscaling.minReplicas (%d) and maxReplicas (%d)",
                "self.autoscaling.minReplicas",
                "self.autoscaling.maxReplicas",
            ),
        ),
        CelRule(
            "",
            f"!has({pool}) || self.engine != 'vllm' || "
            f"!{_has_gpus(pool)} || int({_gpu_quantity(pool)}) == {pool}.tensorParallel",
            "must equal tensorParallel: one GPU per rank",
            field_path=f".{name}.requests['nvidia.com/gpu']",
            message_expression=_fmt(
                "must equal tensorParallel (%d): one GPU per rank", f"{pool}.tensorParallel"
            ),
        ),
        CelRule(
            "",
            f"!has({pool}) || self.engine != 'reference' || {pool}.tensorParallel == 1",
            "the reference engine runs on one device: must be 1",
            field_path=f".{name}.tensorParallel",
        ),
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
            _exactly_one("training", "totalSteps", "totalTokens"),
            *_job_rules("PretrainJob"),
            CelRule(
                "model.config",
                "has(self.model_type)",
                "required (a Hugging Face model type such as llama)",
                field_path=".model_type",
            ),
            CelRule(
                "",
                f"!has(self.training) || self.training.globalBatchSize % (self.training.microBatchSize * {WORLD}) == 0",
                "must be a multiple of microBatchSize x numNodes x processesPerNode",
                field_path=".training.globalBatchSize",
                message_expression=_fmt(
                    "must be a multiple of microBatchSize x numNodes x processesPerNode (%d)",
                    f"self.training.microBatchSize * {WORLD}",
                ),
            ),
            CelRule(
                "",
                "!has(self.model) || !has(self.training) || !has(self.model.config) || "
                "!has(self.model.config.max_position_embeddings) || "
                "double(self.training.seqLen) <= self.model.config.max_position_embeddings",
                "exceeds model.config.max_position_embeddings",
                field_path=".training.seqLen",
                message_expression=_fmt(
                    "exceeds model.config.max_position_embeddings (%s)",
                    "self.model.config.max_position_embeddings",
                ),
            ),
            *ENTRYPOINT_RULES,
        ),
    ),
    Kind(
        kind="ContextExtensionJob",
        plural="contextextensionjobs",
        short_name="cej",
        spec_model=ContextExtensionJobSpec,
        status_model=JobStatus,
        description="Extend a model's context window in progressive stages.",
        columns=EXTENSION_COLUMNS,
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
                field_path=".stages",
                message_expression=_fmt(
                    "zigzag needs every stage's seqLen divisible by 2 x sequenceParallel.degree (%d)",
                    "2 * self.sequenceParallel.degree",
                ),
            ),
            _no_config("ContextExtensionJob"),
            *_job_rules("ContextExtensionJob"),
            CelRule(
                "",
                "!has(self.sequenceParallel) || self.sequenceParallel.impl == 'zigzag' || "
                "self.stages.all(s, s.seqLen % self.sequenceParallel.degree == 0)",
                "every stage's seqLen must be a multiple of sequenceParallel.degree",
                field_path=".stages",
                message_expression=_fmt(
                    "every stage's seqLen must be a multiple of sequenceParallel.degree (%d)",
                    "self.sequenceParallel.degree",
                ),
            ),
            CelRule(
                "",
                f"!has(self.sequenceParallel) || {WORLD} % self.sequenceParallel.degree == 0",
                "must divide numNodes x processesPerNode",
                field_path=".sequenceParallel.degree",
                message_expression=_fmt("must divide numNodes x processesPerNode (%d)", WORLD),
            ),
            CelRule(
                "sequenceParallel",
                "self.impl != 'ulysses' || !has(self.numAttentionHeads) || self.numAttentionHeads % self.degree == 0",
                "ulysses splits attention heads: must divide numAttentionHeads",
                field_path=".degree",
                message_expression=_fmt(
                    "ulysses splits attention heads: must divide numAttentionHeads (%d)",
                    "self.numAttentionHeads",
                ),
            ),
            CelRule(
                "stages[]",
                "self.batchTokens % self.seqLen == 0",
                "must be a multiple of seqLen",
                field_path=".batchTokens",
                message_expression=_fmt("must be a multiple of seqLen (%d)", "self.seqLen"),
            ),
            CelRule(
                "stages[]",
                "!has(self.ropeTheta) || type(self.ropeTheta) == int || self.ropeTheta == 'auto'",
                "must be an integer or one of 'auto'",
                field_path=".ropeTheta",
                message_expression=_fmt("must be an integer or one of 'auto' (got '%s')", "self.ropeTheta"),
            ),
            CelRule(
                "stages[]",
                "!has(self.ropeTheta) || type(self.ropeTheta) != int || self.ropeTheta > 0",
                "must be a positive number or auto",
                field_path=".ropeTheta",
            ),
            CelRule(
                "",
                "!has(self.eval) || !has(self.eval.needle) || !has(self.eval.needle.lengths) || "
                f"self.eval.needle.lengths.all(n, n <= {LAST_SEQ_LEN})",
                "must not exceed the last stage's seqLen",
                field_path=".eval.needle.lengths",
                message_expression=_fmt(
                    "lengths %s exceed the last stage's seqLen (%d)",
                    f"self.eval.needle.lengths.filter(n, n > {LAST_SEQ_LEN})",
                    LAST_SEQ_LEN,
                ),
            ),
            CelRule(
                "",
                "!has(self.eval) || !has(self.eval.perplexityLengths) || "
                f"self.eval.perplexityLengths.all(n, n <= {LAST_SEQ_LEN})",
                "must not exceed the last stage's seqLen",
                field_path=".eval.perplexityLengths",
                message_expression=_fmt(
                    "lengths %s exceed the last stage's seqLen (%d)",
                    f"self.eval.perplexityLengths.filter(n, n > {LAST_SEQ_LEN})",
                    LAST_SEQ_LEN,
                ),
            ),
            CelRule(
                "eval.needle",
                "!has(self.depths) || self.depths.all(d, d >= 0.0 && d <= 1.0)",
                "every depth must be between 0 and 1",
                field_path=".depths",
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
        columns=RL_COLUMNS,
        cel_rules=(
            *MODEL_RULES,
            *_gpu_rules("resources"),
            _exactly_one("reward", "verifiable", "model", "judge"),
            _no_config("RLJob"),
            *_job_rules("RLJob"),
            *_gpu_rules("rollout.resources"),
            _exactly_one("reward.verifiable", "check", "entrypoint"),
            _exactly_one("reward.model", "uri", "from"),
            _exactly_one("reward.judge", "inferenceDeployment", "url"),
            CelRule(
                "reward.verifiable",
                f"!has(self.check) || self.check in {list(BUILTIN_CHECKS)}",
                f"unknown check (known: {', '.join(BUILTIN_CHECKS)})",
                field_path=".check",
                message_expression=f"'unknown check \\'' + self.check + '\\' (known: {', '.join(BUILTIN_CHECKS)})'",
            ),
            CelRule(
                "algorithm",
                "!(self.name in ['grpo', 'rloo', 'dapo']) || self.groupSize >= 2",
                "grpo, rloo and dapo compare completions within a group: must be >= 2",
                field_path=".groupSize",
                message_expression="self.name + ' compares completions within a group: must be >= 2'",
            ),
            CelRule(
                "algorithm",
                "!has(self.clipRangeHigh) || self.clipRangeHigh >= self.clipRange",
                "must be >= clipRange",
                field_path=".clipRangeHigh",
                message_expression=_fmt("must be >= clipRange (%s)", "self.clipRange"),
            ),
            CelRule(
                "",
                "(has(self.rollout) && self.rollout.engine != 'vllm') || "
                "((!has(self.rollout) || self.rollout.placement == 'colocated') ? "
                f"has(self.resources) && {_has_gpus('self.resources')} : "
                f"has(self.rollout.resources) && {_has_gpus('self.rollout.resources')})",
                "vllm needs GPUs; use reference on CPU",
                field_path=".rollout.engine",
                message_expression="'vllm needs GPUs (' + (!has(self.rollout) || self.rollout.placement == "
                "'colocated' ? 'spec.resources' : 'spec.rollout.resources') + "
                "' requests no nvidia.com/gpu); use reference on CPU'",
            ),
            CelRule(
                "",
                "(has(self.weightSync) ? self.weightSync.method : 'nccl') != 'nccl' || "
                "(has(self.rollout) ? self.rollout.engine : 'vllm') != 'reference'",
                "nccl needs the vllm engine; use http or checkpoint with reference",
                field_path=".weightSync.method",
            ),
            CelRule(
                "",
                "(has(self.rollout) ? self.rollout.engine : 'vllm') != 'vllm' || "
                "!has(self.rollout) || self.rollout.placement != 'disaggregated' || "
                "(has(self.weightSync) ? self.weightSync.method : 'nccl') == 'nccl'",
                "disaggregated vllm engines take weights over nccl only",
                field_path=".weightSync.method",
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
                field_path=".decode.tensorParallel",
            ),
            CelRule("mode", "self == oldSelf", "is immutable; create a new InferenceDeployment"),
            *_pool_rules("pool"),
            *_pool_rules("prefill"),
            *_pool_rules("decode"),
            _no_config("InferenceDeployment"),
            CelRule(
                "",
                "self.mode != 'disaggregated' || !has(self.router) || !has(self.router.enabled) || self.router.enabled",
                "disaggregated mode needs the router",
                field_path=".router.enabled",
            ),
            CelRule(
                "",
                "self.mode != 'disaggregated' || self.engine != 'reference' || "
                "(has(self.kvTransfer) && self.kvTransfer.connector == 'Reference')",
                "the reference engine speaks Reference only",
                field_path=".kvTransfer.connector",
                message_expression="'the reference engine speaks Reference only (got ' + "
                "(has(self.kvTransfer) ? self.kvTransfer.connector : 'NixlConnector') + ')'",
            ),
            CelRule(
                "",
                "self.mode != 'disaggregated' || self.engine != 'vllm' || !has(self.kvTransfer) || "
                "self.kvTransfer.connector != 'Reference'",
                "Reference is for the reference engine; vllm needs a vLLM connector",
                field_path=".kvTransfer.connector",
            ),
            CelRule(
                "",
                "self.mode != 'aggregated' || !has(self.pool) || !has(self.pool.autoscaling) || "
                "(has(self.router) && has(self.router.enabled) && self.router.enabled)",
                "needs spec.router.enabled: true (the router's metrics drive autoscaling)",
                field_path=".pool.autoscaling",
            ),
        ),
    ),
)

BY_KIND: dict[str, Kind] = {k.kind: k for k in KINDS}
BY_PLURAL: dict[str, Kind] = {k.plural: k for k in KINDS}
