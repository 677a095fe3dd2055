"""Admission validation, written once: `validate(new, old) -> [FieldError]`.

Used by the admission webhook (kopf.on.validate) and by every handler, because API servers older than 1.25
drop the CEL rules in the CRDs. Messages name the exact field path, Kubernetes style:
`spec.stages[2].seqLen: must be greater than spec.stages[1].seqLen (65536)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .common import DNS_LABEL_PATTERN, QUANTITY_PATTERN, S3_URI_PATTERN, ModelSource, PodTemplate, Resources
from .kinds import (
    BUILTIN_CHECKS,
    BUILTIN_TRAINER_FIELDS,
    ContextExtensionJobSpec,
    InferenceDeploymentSpec,
    Pool,
    PretrainJobSpec,
    RLJobSpec,
)
from .registry import BY_KIND

GPU = "nvidia.com/gpu"
RUNNING_PHASES = frozenset({"Starting", "Running", "Restarting"})


@dataclass(frozen=True, order=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class Errors:
    """Accumulates field errors; `add` reads like the rule it enforces."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(FieldError(path, message))


# ---------------------------------------------------------------------------------------------------------
# Schema errors (pydantic) -> field errors


def _path(loc: Iterable[int | str]) -> str:
    out = "spec"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in {"int", "str", "float", "bool", "list", "dict"}:
            continue  # pydantic names the union branch it tried; not part of the field path
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{part}]"  # map keys such as nvidia.com/gpu
    return out


def _message(err: Mapping[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    bounds = {
        "greater_than_equal": ("must be >=", "ge"),
        "greater_than": ("must be >", "gt"),
        "less_than_equal": ("must be <=", "le"),
        "less_than": ("must be <", "lt"),
    }
    if kind in bounds:
        text, key = bounds[kind]
        bound = ctx[key]
        return f"{text} {bound:g} (got {value!r})" if isinstance(bound, float) else f"{text} {bound} (got {value!r})"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == S3_URI_PATTERN:
            return f"must be an s3:// URI like s3://bucket/prefix (got {value!r})"
        if ctx.get("pattern") == DNS_LABEL_PATTERN:
            return f"must be a DNS label: lowercase letters, digits and '-' (got {value!r})"
        return f"must match {ctx.get('pattern')} (got {value!r})"
    if kind == "string_too_short":
        return f"must be at least {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} items"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} items"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (got {value!r})"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"must be an integer (got {value!r})"
    if kind in {"float_type", "float_parsing"}:
        return f"must be a number (got {value!r})"
    if kind in {"bool_type", "bool_parsing"}:
        return f"must be true or false (got {value!r})"
    if kind in {"string_type"}:
        return f"must be a string (got {value!r})"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return "must be an object"
    if kind == "list_type":
        return "must be a list"
    return str(err["msg"])


def schema_errors(exc: ValidationError) -> list[FieldError]:
    by_path: dict[str, list[str]] = {}
    for err in exc.errors():
        by_path.setdefault(_path(err["loc"]), []).append(_message(err))
    return [FieldError(p, _join_branches(msgs)) for p, msgs in by_path.items()]


def _join_branches(messages: list[str]) -> str:
    """A union (int | 'auto') fails once per branch: 'must be an integer or one of 'auto' (got 'x')'."""
    unique = list(dict.fromkeys(messages))
    if len(unique) == 1:
        return unique[0]
    got = re.search(r" \(got .*\)$", unique[0])
    parts = [re.sub(r" \(got .*\)$", "", m).removeprefix("must be ") for m in unique]
    return "must be " + " or ".join(parts) + (got.group(0) if got else "")


# ---------------------------------------------------------------------------------------------------------
# Rules shared by every kind


def _exactly_one(errors: Errors, path: str, obj: BaseModel | None, fields: Mapping[str, str]) -> None:
    if obj is None:
        return
    present = [wire for attr, wire in fields.items() if getattr(obj, attr) is not None]
    if len(present) != 1:
        got = ", ".join(present) if present else "none"
        errors.add(path, f"exactly one of {', '.join(fields.values())} must be set (got {got})")


def _check_model(errors: Errors, model: ModelSource, kind: str, name: str | None) -> None:
    _exactly_one(errors, "spec.model", model, {"uri": "uri", "from_": "from", "config": "config"})
    _exactly_one(errors, "spec.model.tokenizer", model.tokenizer, {"uri": "uri", "builtin": "builtin"})
    if model.config is not None:
        if kind != "PretrainJob":
            errors.add("spec.model.config", f"{kind} needs a trained model: use uri or from")
        elif not isinstance(model.config.get("model_type"), str):
            errors.add("spec.model.config.model_type", "required (a Hugging Face model type such as llama)")
    if model.from_ is not None and model.from_.kind == kind and model.from_.name == name:
        errors.add("spec.model.from.name", "must not refer to this object itself")


def _check_pod_resources(errors: Errors, path: str, tpl: PodTemplate) -> None:
    for field, values in (("requests", tpl.requests), ("limits", tpl.limits)):
        for key, value in values.items():
            if not re.fullmatch(QUANTITY_PATTERN, str(value)):
                errors.add(f"{path}.{field}[{key}]", f"{value!r} is not a valid quantity")
            elif key == GPU and not re.fullmatch(r"[0-9]+", str(value)):
                errors.add(f"{path}.{field}[{key}]", f"GPUs are requested in whole numbers (got {value!r})")
    req, lim = tpl.requests.get(GPU), tpl.limits.get(GPU)
    if req is not None and lim is not None and str(req) != str(lim):
        errors.add(f"{path}.limits[{GPU}]", f"must equal requests[{GPU}] ({req}); GPUs cannot be overcommitted")


def gpus(tpl: PodTemplate) -> int:
    """GPUs one pod of this template asks for (whole numbers only; 0 when unset or malformed)."""
    value = tpl.limits.get(GPU, tpl.requests.get(GPU, 0))
    return int(value) if re.fullmatch(r"[0-9]+", str(value)) else 0


def _check_scheduling(errors: Errors, spec: Any) -> None:
    sched = spec.scheduling
    if sched.gang == "kueue" and not sched.queue_name:
        errors.add("spec.scheduling.queueName", "required when gang is kueue")
    if sched.queue_name and sched.gang not in (None, "kueue"):
        errors.add("spec.scheduling.gang", f"must be kueue (or unset) when queueName is set (got {sched.gang!r})")


def _world_size(res: Resources) -> int:
    return res.num_nodes * res.processes_per_node


# ---------------------------------------------------------------------------------------------------------
# Per-kind rules


def _check_entrypoint(errors: Errors, spec: PretrainJobSpec) -> bool:
    """Exactly one of entrypoint or the built-in trainer's settings; True when the trainer's rules apply."""
    builtin = [wire for attr, wire in BUILTIN_TRAINER_FIELDS.items() if attr in spec.model_fields_set]
    if spec.entrypoint is not None:
        _exactly_one(errors, "spec.entrypoint", spec.entrypoint, {"module": "module", "script": "script"})
        for wire in builtin:
            errors.add(f"spec.{wire}", "must not be set with spec.entrypoint (your script brings its own)")
        return False
    for wire in ("model", "data", "training"):
        if getattr(spec, wire) is None:
            errors.add(f"spec.{wire}", "required (or set spec.entrypoint to run your own script)")
    return spec.model is not None and spec.data is not None and spec.training is not None


def _check_pretrain(errors: Errors, spec: PretrainJobSpec) -> None:
    if not _check_entrypoint(errors, spec):
        return
    assert spec.training is not None
    tr = spec.training
    _exactly_one(errors, "spec.training", tr, {"total_steps": "totalSteps", "total_tokens": "totalTokens"})
    per_step = tr.micro_batch_size * _world_size(spec.resources)
    if tr.global_batch_size % per_step:
        errors.add(
            "spec.training.globalBatchSize",
            f"must be a multiple of microBatchSize x numNodes x processesPerNode ({per_step})",
        )
    cfg = spec.model.config or {}
    max_pos = cfg.get("max_position_embeddings")
    # A JSON number, compared by value: 512.0 (as some tools write it) is 512.
    if isinstance(max_pos, (int, float)) and not isinstance(max_pos, bool) and tr.seq_len > max_pos:
        shown = int(max_pos) if float(max_pos).is_integer() else max_pos
        errors.add("spec.training.seqLen", f"exceeds model.config.max_position_embeddings ({shown})")


def _check_context_extension(errors: Errors, spec: ContextExtensionJobSpec) -> None:
    sp = spec.sequence_parallel
    world = _world_size(spec.resources)
    if world % sp.degree:
        errors.add("spec.sequenceParallel.degree", f"must divide numNodes x processesPerNode ({world})")
    if sp.impl == "ulysses" and sp.num_attention_heads is not None and sp.num_attention_heads % sp.degree:
        errors.add(
            "spec.sequenceParallel.degree",
            f"ulysses splits attention heads: must divide numAttentionHeads ({sp.num_attention_heads})",
        )
    for i, stage in enumerate(spec.stages):
        path = f"spec.stages[{i}]"
        if i and stage.seq_len <= spec.stages[i - 1].seq_len:
            errors.add(
                f"{path}.seqLen",
                f"must be greater than spec.stages[{i - 1}].seqLen ({spec.stages[i - 1].seq_len})",
            )
        if sp.impl == "zigzag" and stage.seq_len % (2 * sp.degree):
            errors.add(f"{path}.seqLen", f"zigzag needs a multiple of 2 x sequenceParallel.degree ({2 * sp.degree})")
        elif sp.impl != "zigzag" and stage.seq_len % sp.degree:
            errors.add(f"{path}.seqLen", f"must be a multiple of sequenceParallel.degree ({sp.degree})")
        if stage.batch_tokens % stage.seq_len:
            errors.add(f"{path}.batchTokens", f"must be a multiple of seqLen ({stage.seq_len})")
        if isinstance(stage.rope_theta, int) and stage.rope_theta <= 0:
            errors.add(f"{path}.ropeTheta", "must be a positive number or auto")
        _check_extension_stage(errors, spec, i, world)
        if not isinstance(stage.rope_theta, int) and stage.rope_theta != "auto":
            errors.add(f"{path}.ropeTheta", f"must be a positive integer or auto (got {stage.rope_theta!r})")
    longest = spec.stages[-1].seq_len
    for i, length in enumerate(spec.eval.needle.lengths):
        if length > longest:
            errors.add(f"spec.eval.needle.lengths[{i}]", f"{length} exceeds the last stage's seqLen ({longest})")
    for i, depth in enumerate(spec.eval.needle.depths):
        if not 0.0 <= depth <= 1.0:
            errors.add(f"spec.eval.needle.depths[{i}]", f"must be between 0 and 1 (got {depth})")
    for i, length in enumerate(spec.eval.perplexity_lengths):
        if length > longest:
            errors.add(f"spec.eval.perplexityLengths[{i}]", f"{length} exceeds the last stage's seqLen ({longest})")
    _check_extension_eval_lengths(errors, spec)


def _check_extension_stage(errors: Errors, spec: ContextExtensionJobSpec, i: int, world: int) -> None:
    """What the runtime would otherwise find at step 0 (kubeforge.runtime.extend.run.plan_stages)."""
    stage, sp, path = spec.stages[i], spec.sequence_parallel, f"spec.stages[{i}]"
    replicas = world // sp.degree if world % sp.degree == 0 else 0
    sequences = stage.batch_tokens // stage.seq_len
    if replicas and stage.batch_tokens % stage.seq_len == 0 and sequences % replicas:
        errors.add(f"{path}.batchTokens", f"{sequences} sequences per step do not split over {replicas} data-parallel "
                   f"replicas (numNodes x processesPerNode / sequenceParallel.degree)")
    if isinstance(stage.rope_theta, int) and spec.scaling.method != "theta":
        errors.add(f"{path}.ropeTheta", f"only scaling method theta takes a ropeTheta (method is {spec.scaling.method})")
    elif isinstance(stage.rope_theta, int) and 0 < 2 * math.pi * stage.rope_theta < stage.seq_len:
        # the slowest RoPE pair turns once every ~2πθ tokens: beyond that, positions alias
        errors.add(f"{path}.ropeTheta", f"{stage.rope_theta} cannot address seqLen {stage.seq_len} (2π x ropeTheta "
                   f"must be at least seqLen)")


def _check_extension_eval_lengths(errors: Errors, spec: ContextExtensionJobSpec) -> None:
    sp = spec.sequence_parallel
    unit = 2 * sp.degree if sp.impl == "zigzag" else sp.degree
    for name, lengths in (("needle.lengths", spec.eval.needle.lengths),
                          ("perplexityLengths", spec.eval.perplexity_lengths)):
        for i, length in enumerate(lengths):
            if length % unit:
                errors.add(f"spec.eval.{name}[{i}]", f"evals split sequences like training: must be a multiple of "
                           f"{unit} ({sp.impl} over degree {sp.degree})")


def _check_rl(errors: Errors, spec: RLJobSpec) -> None:
    rw = spec.reward
    _exactly_one(errors, "spec.reward", rw, {"verifiable": "verifiable", "model": "model", "judge": "judge"})
    _exactly_one(errors, "spec.reward.verifiable", rw.verifiable, {"check": "check", "entrypoint": "entrypoint"})
    _exactly_one(errors, "spec.reward.model", rw.model, {"uri": "uri", "from_": "from"})
    _exactly_one(errors, "spec.reward.judge", rw.judge, {"inference_deployment": "inferenceDeployment", "url": "url"})
    if rw.verifiable and rw.verifiable.check and rw.verifiable.check not in BUILTIN_CHECKS:
        errors.add(
            "spec.reward.verifiable.check",
            f"unknown check {rw.verifiable.check!r} (known: {', '.join(BUILTIN_CHECKS)})",
        )
    algo = spec.algorithm
    if algo.name in ("grpo", "rloo", "dapo") and algo.group_size < 2:
        errors.add("spec.algorithm.groupSize", f"{algo.name} compares completions within a group: must be >= 2")
    if algo.clip_range_high is not None and algo.clip_range_high < algo.clip_range:
        errors.add("spec.algorithm.clipRangeHigh", f"must be >= clipRange ({algo.clip_range})")
    ro = spec.rollout
    if ro.engine == "vllm":
        gpu_holder = spec.resources if ro.placement == "colocated" else ro.resources
        where = "spec.resources" if ro.placement == "colocated" else "spec.rollout.resources"
        if gpus(gpu_holder) < 1:
            errors.add("spec.rollout.engine", f"vllm needs GPUs ({where} requests no {GPU}); use reference on CPU")
    if spec.weight_sync.method == "nccl" and ro.engine == "reference":
        errors.add("spec.weightSync.method", "nccl needs the vllm engine; use http with reference")
    if ro.engine == "vllm" and ro.placement == "disaggregated" and spec.weight_sync.method != "nccl":
        errors.add("spec.weightSync.method", "disaggregated vllm engines take weights over nccl only")
    _check_pod_resources(errors, "spec.rollout.resources", ro.resources)


def _check_pool(errors: Errors, path: str, pool: Pool, engine: str) -> None:
    _check_pod_resources(errors, path, pool)
    asc = pool.autoscaling
    if asc is not None:
        if asc.min_replicas < 1:
            errors.add(f"{path}.autoscaling.minReplicas", "must be >= 1: a pool cannot scale up from zero yet")
        elif asc.min_replicas > asc.max_replicas:
            errors.add(f"{path}.autoscaling.minReplicas", f"must be <= maxReplicas ({asc.max_replicas})")
        elif not asc.min_replicas <= pool.replicas <= asc.max_replicas:
            errors.add(
                f"{path}.replicas",
                f"must be between autoscaling.minReplicas ({asc.min_replicas}) and maxReplicas ({asc.max_replicas})",
            )
    n_gpus = gpus(pool)
    if engine == "vllm" and n_gpus and n_gpus != pool.tensor_parallel:
        errors.add(f"{path}.requests[{GPU}]", f"must equal tensorParallel ({pool.tensor_parallel}): one GPU per rank")
    if engine == "reference" and pool.tensor_parallel != 1:
        errors.add(f"{path}.tensorParallel", "the reference engine runs on one device: must be 1")


def _check_inference(errors: Errors, spec: InferenceDeploymentSpec) -> None:
    if spec.mode == "aggregated":
        if spec.pool is None:
            errors.add("spec.pool", "required in aggregated mode")
        for extra in ("prefill", "decode"):
            if getattr(spec, extra) is not None:
                errors.add(f"spec.{extra}", "only allowed in disaggregated mode (use spec.pool)")
    else:
        for needed in ("prefill", "decode"):
            if getattr(spec, needed) is None:
                errors.add(f"spec.{needed}", "required in disaggregated mode")
        if spec.pool is not None:
            errors.add("spec.pool", "only allowed in aggregated mode (use spec.prefill and spec.decode)")
        if spec.router.enabled is False:
            errors.add("spec.router.enabled", "disaggregated mode needs the router")
        kv = spec.kv_transfer
        if spec.engine == "reference" and kv.connector != "Reference":
            errors.add("spec.kvTransfer.connector", f"the reference engine speaks Reference only (got {kv.connector})")
        if spec.engine == "vllm" and kv.connector == "Reference":
            errors.add("spec.kvTransfer.connector", "Reference is for the reference engine; vllm needs a vLLM connector")
        if (
            kv.connector == "NixlConnector"
            and spec.prefill is not None
            and spec.decode is not None
            and spec.decode.tensor_parallel < spec.prefill.tensor_parallel
        ):
            errors.add(
                "spec.decode.tensorParallel",
                f"must be >= spec.prefill.tensorParallel ({spec.prefill.tensor_parallel}) with NixlConnector",
            )
    if spec.mode == "aggregated" and spec.pool is not None and spec.pool.autoscaling and not spec.router.enabled:
        errors.add("spec.pool.autoscaling", "needs spec.router.enabled: true (the router's metrics drive autoscaling)")
    for name in ("pool", "prefill", "decode"):
        pool = getattr(spec, name)
        if pool is not None:
            _check_pool(errors, f"spec.{name}", pool, spec.engine)


_SPEC_CHECKS: dict[str, tuple[type[BaseModel], Callable[[Errors, Any], None]]] = {
    "PretrainJob": (PretrainJobSpec, _check_pretrain),
    "ContextExtensionJob": (ContextExtensionJobSpec, _check_context_extension),
    "RLJob": (RLJobSpec, _check_rl),
    "InferenceDeployment": (InferenceDeploymentSpec, _check_inference),
}


def _check_update(errors: Errors, kind: str, new: Mapping[str, Any], old: Mapping[str, Any]) -> None:
    new_spec, old_spec = new.get("spec") or {}, old.get("spec") or {}
    if new_spec.get("model") != old_spec.get("model"):
        errors.add("spec.model", "is immutable")
    if kind == "InferenceDeployment":
        if new_spec.get("mode", "aggregated") != old_spec.get("mode", "aggregated"):
            errors.add("spec.mode", "is immutable; create a new InferenceDeployment")
        return
    phase = (old.get("status") or {}).get("phase")
    if phase in RUNNING_PHASES:
        for field in ("numNodes", "processesPerNode"):
            before = (old_spec.get("resources") or {}).get(field, 1)
            after = (new_spec.get("resources") or {}).get(field, 1)
            if before != after:
                errors.add(f"spec.resources.{field}", f"cannot change while the job is {phase}; suspend it first")


def validate(new: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[FieldError]:
    """All field errors of `new` (a whole object as the API sees it), given `old` on update."""
    kind = new.get("kind", "")
    if kind not in _SPEC_CHECKS:
        return [FieldError("kind", f"unknown kind {kind!r} (known: {', '.join(BY_KIND)})")]
    model_cls, check = _SPEC_CHECKS[kind]
    errors = Errors()
    try:
        spec = model_cls.model_validate(new.get("spec") or {})
    except ValidationError as exc:
        errors.items.extend(schema_errors(exc))
    else:
        if spec.model is not None:  # a PretrainJob with spec.entrypoint has none
            _check_model(errors, spec.model, kind, (new.get("metadata") or {}).get("name"))
        if hasattr(spec, "resources"):
            _check_pod_resources(errors, "spec.resources", spec.resources)
        if hasattr(spec, "scheduling"):
            _check_scheduling(errors, spec)
        check(errors, spec)
    if old is not None:
        _check_update(errors, kind, new, old)
    return errors.items


def parse_spec(obj: Mapping[str, Any]) -> Any:
    """The typed spec of a stored object (call after validate() returned no errors)."""
    return _SPEC_CHECKS[obj["kind"]][0].model_validate(obj.get("spec") or {})


__all__ = ["FieldError", "validate", "parse_spec", "gpus", "schema_errors"]
