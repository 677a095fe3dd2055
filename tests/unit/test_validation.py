"""validate(new, old): one table of invalid manifests, each with the exact field path and message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from builders import (
    context_extension_job,
    inference_deployment,
    pretrain_entrypoint_job,
    pretrain_job,
    rl_job,
    with_,
)
from kubeforge.api.validation import validate

PTJ, CEJ, RLJ, INFD = pretrain_job(), context_extension_job(), rl_job(), inference_deployment()
RUNNING_PTJ = {**PTJ, "status": {"phase": "Running"}}
S3_MSG = "must be an s3:// URI like s3://bucket/prefix (got {!r})"

INVALID: list[tuple[str, dict, dict | None, list[str]]] = [
    # --- shared blocks -------------------------------------------------------------------------------
    ("model none", with_(PTJ, "spec.model", {}), None,
     ["spec.model: exactly one of uri, from, config must be set (got none)"]),
    ("model uri and config", with_(PTJ, "spec.model.uri", "s3://kubeforge/m"), None,
     ["spec.model: exactly one of uri, from, config must be set (got uri, config)"]),
    ("model uri and from", with_(CEJ, "spec.model.uri", "s3://kubeforge/m"), None,
     ["spec.model: exactly one of uri, from, config must be set (got uri, from)"]),
    ("model uri not s3", with_(CEJ, "spec.model", {"uri": "https://hub/model"}), None,
     ["spec.model.uri: " + S3_MSG.format("https://hub/model")]),
    ("bucket too short", with_(CEJ, "spec.model", {"uri": "s3://ab/model"}), None,
     ["spec.model.uri: " + S3_MSG.format("s3://ab/model")]),
    ("bucket uppercase", with_(PTJ, "spec.checkpoint.uri", "s3://Kubeforge/ckpt"), None,
     ["spec.checkpoint.uri: " + S3_MSG.format("s3://Kubeforge/ckpt")]),
    ("data uri missing scheme", with_(PTJ, "spec.data.uri", "kubeforge/data"), None,
     ["spec.data.uri: " + S3_MSG.format("kubeforge/data")]),
    ("from unknown kind", with_(CEJ, "spec.model.from.kind", "Deployment"), None,
     ["spec.model.from.kind: must be one of 'PretrainJob', 'ContextExtensionJob' or 'RLJob' (got 'Deployment')"]),
    ("from bad name", with_(CEJ, "spec.model.from.name", "My_Job"), None,
     ["spec.model.from.name: must be a DNS label: lowercase letters, digits and '-' (got 'My_Job')"]),
    ("from itself", with_(CEJ, "spec.model.from", {"kind": "ContextExtensionJob", "name": "cej"}), None,
     ["spec.model.from.name: must not refer to this object itself"]),
    ("config without model_type", with_(PTJ, "spec.model.config", {"hidden_size": 8}), None,
     ["spec.model.config.model_type: required (a Hugging Face model type such as llama)"]),
    ("config for extension", with_(CEJ, "spec.model", {"config": {"model_type": "llama"}}), None,
     ["spec.model.config: ContextExtensionJob needs a trained model: use uri or from"]),
    ("tokenizer both", with_(PTJ, "spec.model.tokenizer", {"builtin": "byte", "uri": "s3://kubeforge/tok"}), None,
     ["spec.model.tokenizer: exactly one of uri, builtin must be set (got uri, builtin)"]),
    ("tokenizer unknown builtin", with_(PTJ, "spec.model.tokenizer", {"builtin": "gpt2"}), None,
     ["spec.model.tokenizer.builtin: must be one of 'byte' (got 'gpt2')"]),
    ("unknown field", with_(PTJ, "spec.trainnig", {}), None, ["spec.trainnig: unknown field"]),
    ("missing checkpoint", with_(PTJ, "spec.checkpoint"), None, ["spec.checkpoint: required"]),
    ("fractional gpu", with_(PTJ, "spec.resources.requests", {"nvidia.com/gpu": "0.5"}), None,
     ["spec.resources.requests[nvidia.com/gpu]: GPUs are requested in whole numbers (got '0.5')"]),
    ("bad quantity", with_(PTJ, "spec.resources.requests", {"cpu": "2 cores"}), None,
     ["spec.resources.requests[cpu]: '2 cores' is not a valid quantity"]),
    ("zero nodes", with_(PTJ, "spec.resources.numNodes", 0), None,
     ["spec.resources.numNodes: must be >= 1 (got 0)"]),
    ("nodes not integer", with_(PTJ, "spec.resources.numNodes", "two"), None,
     ["spec.resources.numNodes: must be an integer (got 'two')"]),
    ("negative restarts", with_(PTJ, "spec.runPolicy", {"maxRestarts": -1}), None,
     ["spec.runPolicy.maxRestarts: must be >= 0 (got -1)"]),
    ("suspend not bool", with_(PTJ, "spec.runPolicy", {"suspend": "maybe"}), None,
     ["spec.runPolicy.suspend: must be true or false (got 'maybe')"]),
    ("keep zero", with_(PTJ, "spec.checkpoint.keep", 0), None, ["spec.checkpoint.keep: must be >= 1 (got 0)"]),
    ("endpoint not url", with_(PTJ, "spec.checkpoint.endpoint", "minio:9000"), None,
     ["spec.checkpoint.endpoint: must match ^https?://[^\\s]+$ (got 'minio:9000')"]),
    ("kueue without queue", with_(PTJ, "spec.scheduling", {"gang": "kueue"}), None,
     ["spec.scheduling.queueName: required when gang is kueue"]),
    ("queue with volcano", with_(PTJ, "spec.scheduling", {"queueName": "team-a", "gang": "volcano"}), None,
     ["spec.scheduling.gang: must be kueue (or unset) when queueName is set (got 'volcano')"]),
    ("unknown gang", with_(PTJ, "spec.scheduling", {"gang": "yunikorn"}), None,
     ["spec.scheduling.gang: must be one of 'kueue', 'volcano', 'coscheduling' or 'builtin' (got 'yunikorn')"]),
    # --- PretrainJob ---------------------------------------------------------------------------------
    ("steps and tokens", with_(PTJ, "spec.training.totalTokens", 1000), None,
     ["spec.training: exactly one of totalSteps, totalTokens must be set (got totalSteps, totalTokens)"]),
    ("neither steps nor tokens", with_(PTJ, "spec.training.totalSteps"), None,
     ["spec.training: exactly one of totalSteps, totalTokens must be set (got none)"]),
    ("batch not divisible", with_(PTJ, "spec.training.globalBatchSize", 6), None,
     ["spec.training.globalBatchSize: must be a multiple of microBatchSize x numNodes x processesPerNode (4)"]),
    ("seq longer than positions", with_(PTJ, "spec.training.seqLen", 4096), None,
     ["spec.training.seqLen: exceeds model.config.max_position_embeddings (512)"]),
    ("seq longer than float positions", with_(PTJ, "spec.model.config.max_position_embeddings", 32.0), None,
     ["spec.training.seqLen: exceeds model.config.max_position_embeddings (32)"]),
    ("unknown strategy", with_(PTJ, "spec.parallelism", {"strategy": "zero3"}), None,
     ["spec.parallelism.strategy: must be one of 'ddp' or 'fsdp' (got 'zero3')"]),
    ("lr zero", with_(PTJ, "spec.optimizer", {"lr": 0}), None, ["spec.optimizer.lr: must be > 0 (got 0)"]),
    ("model changed", with_(PTJ, "spec.model.config.hidden_size", 128), PTJ, ["spec.model: is immutable"]),
    ("nodes changed while running", with_(PTJ, "spec.resources.numNodes", 4), RUNNING_PTJ,
     ["spec.training.globalBatchSize: must be a multiple of microBatchSize x numNodes x processesPerNode (8)",
      "spec.resources.numNodes: cannot change while the job is Running; suspend it first"]),
    # --- ContextExtensionJob -------------------------------------------------------------------------
    ("stage not increasing", with_(CEJ, "spec.stages", [
        {"seqLen": 8192, "steps": 1, "batchTokens": 16384},
        {"seqLen": 65536, "steps": 1, "batchTokens": 131072},
        {"seqLen": 65536, "steps": 1, "batchTokens": 131072}]), None,
     ["spec.stages[2].seqLen: must be greater than spec.stages[1].seqLen (65536)"]),
    ("stage decreasing", with_(CEJ, "spec.stages[1].seqLen", 4096), None,
     ["spec.stages[1].seqLen: must be greater than spec.stages[0].seqLen (8192)"]),
    ("no stages", with_(CEJ, "spec.stages", []), None, ["spec.stages: must have at least 1 items"]),
    ("zigzag not divisible", with_(with_(CEJ, "spec.sequenceParallel", {"impl": "zigzag", "degree": 8}),
                                   "spec.stages[0].seqLen", 8200), None,
     ["spec.stages[0].seqLen: zigzag needs a multiple of 2 x sequenceParallel.degree (16)",
      "spec.stages[0].batchTokens: must be a multiple of seqLen (8200)"]),
    ("ring not divisible", with_(CEJ, "spec.stages[0].seqLen", 8194), None,
     ["spec.stages[0].seqLen: must be a multiple of sequenceParallel.degree (4)",
      "spec.stages[0].batchTokens: must be a multiple of seqLen (8194)"]),
    ("ulysses heads", with_(CEJ, "spec.sequenceParallel", {"impl": "ulysses", "degree": 8, "numAttentionHeads": 12}),
     None, ["spec.sequenceParallel.degree: ulysses splits attention heads: must divide numAttentionHeads (12)"]),
    ("degree not dividing world", with_(CEJ, "spec.sequenceParallel.degree", 3), None,
     ["spec.sequenceParallel.degree: must divide numNodes x processesPerNode (8)",
      "spec.stages[0].seqLen: must be a multiple of sequenceParallel.degree (3)",
      "spec.stages[1].seqLen: must be a multiple of sequenceParallel.degree (3)"]),
    ("rope theta word", with_(CEJ, "spec.stages[0].ropeTheta", "high"), None,
     ["spec.stages[0].ropeTheta: must be an integer or one of 'auto' (got 'high')"]),
    ("rope theta negative", with_(CEJ, "spec.stages[0].ropeTheta", -5), None,
     ["spec.stages[0].ropeTheta: must be a positive number or auto"]),
    ("batch tokens", with_(CEJ, "spec.stages[1].batchTokens", 100000), None,
     ["spec.stages[1].batchTokens: must be a multiple of seqLen (65536)"]),
    ("unknown scaling", with_(CEJ, "spec.scaling", {"method": "rope2"}), None,
     ["spec.scaling.method: must be one of 'theta', 'yarn', 'linear', 'ntk' or 'llama3' (got 'rope2')"]),
    ("needle too long", with_(CEJ, "spec.eval", {"needle": {"lengths": [8192, 131072]}}), None,
     ["spec.eval.needle.lengths[1]: 131072 exceeds the last stage's seqLen (65536)"]),
    ("needle depth", with_(CEJ, "spec.eval", {"needle": {"lengths": [8192], "depths": [0.5, 1.5]}}), None,
     ["spec.eval.needle.depths[1]: must be between 0 and 1 (got 1.5)"]),
    ("stage seq too short", with_(CEJ, "spec.stages[0].seqLen", 64), None,
     ["spec.stages[0].seqLen: must be >= 128 (got 64)"]),
    # --- RLJob ---------------------------------------------------------------------------------------
    ("two rewards", with_(RLJ, "spec.reward.judge", {"url": "http://judge:8000", "rubric": "be right"}), None,
     ["spec.reward: exactly one of verifiable, model, judge must be set (got verifiable, judge)"]),
    ("no reward", with_(RLJ, "spec.reward", {}), None,
     ["spec.reward: exactly one of verifiable, model, judge must be set (got none)"]),
    ("unknown check", with_(RLJ, "spec.reward.verifiable.check", "vibes"), None,
     ["spec.reward.verifiable.check: unknown check 'vibes' (known: exact_match, contains, math_answer, "
      "json_valid, regex_match)"]),
    ("bad entrypoint", with_(RLJ, "spec.reward.verifiable", {"entrypoint": "rewards.py"}), None,
     ["spec.reward.verifiable.entrypoint: must match ^[A-Za-z_][\\w.]*:[A-Za-z_]\\w*$ (got 'rewards.py')"]),
    ("judge both targets", with_(RLJ, "spec.reward", {"judge": {"url": "http://j:8000",
                                                               "inferenceDeployment": "judge", "rubric": "r"}}), None,
     ["spec.reward.judge: exactly one of inferenceDeployment, url must be set (got inferenceDeployment, url)"]),
    ("judge without rubric", with_(RLJ, "spec.reward", {"judge": {"url": "http://j:8000"}}), None,
     ["spec.reward.judge.rubric: required"]),
    ("reward model none", with_(RLJ, "spec.reward", {"model": {}}), None,
     ["spec.reward.model: exactly one of uri, from must be set (got none)"]),
    ("grpo group of one", with_(RLJ, "spec.algorithm.groupSize", 1), None,
     ["spec.algorithm.groupSize: grpo compares completions within a group: must be >= 2"]),
    ("unknown algorithm", with_(RLJ, "spec.algorithm.name", "dpo"), None,
     ["spec.algorithm.name: must be one of 'grpo', 'ppo', 'rloo' or 'dapo' (got 'dpo')"]),
    ("clip high below clip", with_(RLJ, "spec.algorithm", {"name": "dapo", "clipRange": 0.2, "clipRangeHigh": 0.1,
                                                          "groupSize": 4}), None,
     ["spec.algorithm.clipRangeHigh: must be >= clipRange (0.2)"]),
    ("vllm rollout on cpu", with_(RLJ, "spec.rollout.engine", "vllm"), None,
     ["spec.rollout.engine: vllm needs GPUs (spec.resources requests no nvidia.com/gpu); use reference on CPU"]),
    ("nccl sync with reference", with_(RLJ, "spec.weightSync.method", "nccl"), None,
     ["spec.weightSync.method: nccl needs the vllm engine; use http with reference"]),
    ("weight sync through the store", with_(RLJ, "spec.weightSync.method", "checkpoint"), None,
     ["spec.weightSync.method: must be one of 'nccl' or 'http' (got 'checkpoint')"]),
    ("vllm rollouts over http", with_(with_(RLJ, "spec.rollout", {
        "engine": "vllm", "placement": "disaggregated", "resources": {"limits": {"nvidia.com/gpu": 1}}}),
        "spec.weightSync.method", "http"), None,
     ["spec.weightSync.method: disaggregated vllm engines take weights over nccl only"]),
    ("tis cap below one", with_(RLJ, "spec.weightSync.tisCap", 0.5), None,
     ["spec.weightSync.tisCap: must be >= 1 (got 0.5)"]),
    ("temperature negative", with_(RLJ, "spec.rollout.temperature", -1), None,
     ["spec.rollout.temperature: must be >= 0 (got -1)"]),
    # --- InferenceDeployment -------------------------------------------------------------------------
    ("nixl tp", with_(INFD, "spec.prefill", {"tensorParallel": 4, "requests": {"nvidia.com/gpu": 4}}), None,
     ["spec.decode.tensorParallel: must be >= spec.prefill.tensorParallel (4) with NixlConnector"]),
    ("autoscaling min over max", with_(INFD, "spec.decode.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
     None, ["spec.decode.autoscaling.minReplicas: must be <= maxReplicas (2)"]),
    ("autoscaling from zero", with_(INFD, "spec.decode.autoscaling", {"minReplicas": 0, "maxReplicas": 2}),
     None, ["spec.decode.autoscaling.minReplicas: must be >= 1: a pool cannot scale up from zero yet"]),
    ("replicas outside bounds", with_(INFD, "spec.decode.replicas", 9), None,
     ["spec.decode.replicas: must be between autoscaling.minReplicas (1) and maxReplicas (4)"]),
    ("gpus not tp", with_(INFD, "spec.decode.requests", {"nvidia.com/gpu": 1}), None,
     ["spec.decode.requests[nvidia.com/gpu]: must equal tensorParallel (2): one GPU per rank"]),
    ("disaggregated without decode", with_(INFD, "spec.decode"), None, ["spec.decode: required in disaggregated mode"]),
    ("aggregated with prefill", with_(INFD, "spec.mode", "aggregated"), None,
     ["spec.pool: required in aggregated mode",
      "spec.prefill: only allowed in disaggregated mode (use spec.pool)",
      "spec.decode: only allowed in disaggregated mode (use spec.pool)"]),
    ("router off disaggregated", with_(INFD, "spec.router", {"enabled": False}), None,
     ["spec.router.enabled: disaggregated mode needs the router"]),
    ("reference with nixl", with_(with_(INFD, "spec.engine", "reference"), "spec.prefill", {"replicas": 1}), None,
     ["spec.kvTransfer.connector: the reference engine speaks Reference only (got NixlConnector)",
      "spec.decode.tensorParallel: the reference engine runs on one device: must be 1"]),
    ("unknown connector", with_(INFD, "spec.kvTransfer", {"connector": "RdmaMagic"}), None,
     ["spec.kvTransfer.connector: must be one of 'NixlConnector' or 'Reference' (got 'RdmaMagic')"]),
    ("serve a config", with_(INFD, "spec.model", {"config": {"model_type": "llama"}}), None,
     ["spec.model.config: InferenceDeployment needs a trained model: use uri or from"]),
    ("max model len tiny", with_(INFD, "spec.maxModelLen", 8), None, ["spec.maxModelLen: must be >= 16 (got 8)"]),
    ("bad failure policy", with_(INFD, "spec.kvTransfer", {"failurePolicy": "retry"}), None,
     ["spec.kvTransfer.failurePolicy: must be one of 'fail' or 'recompute' (got 'retry')"]),
    ("unknown kind", {"kind": "TrainJob", "spec": {}}, None,
     ["kind: unknown kind 'TrainJob' (known: PretrainJob, ContextExtensionJob, RLJob, InferenceDeployment)"]),
]

# Cases that need two edits to the same map, written out instead of with_().
_gpu_mismatch = with_(PTJ, "spec.resources.requests", {"nvidia.com/gpu": 2})
_gpu_mismatch["spec"]["resources"]["limits"] = {"nvidia.com/gpu": 1}
_mode_changed = with_(with_(with_(INFD, "spec.mode", "aggregated"), "spec.prefill"), "spec.decode")
_mode_changed["spec"]["pool"] = {"replicas": 1, "requests": {"nvidia.com/gpu": 1}}
_agg_autoscaled = with_(with_(with_(INFD, "spec.mode", "aggregated"), "spec.prefill"), "spec.decode")
_agg_autoscaled["spec"]["pool"] = {"requests": {"nvidia.com/gpu": 1},
                                   "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}
INVALID += [
    ("aggregated autoscaling without router", _agg_autoscaled, None,
     ["spec.pool.autoscaling: needs spec.router.enabled: true (the router's metrics drive autoscaling)"]),
    ("gpu limit differs", _gpu_mismatch, None,
     ["spec.resources.limits[nvidia.com/gpu]: must equal requests[nvidia.com/gpu] (2); GPUs cannot be overcommitted"]),
    ("mode changed", _mode_changed, INFD, ["spec.mode: is immutable; create a new InferenceDeployment"]),
]

# spec.entrypoint (the user's own script) or the built-in trainer's settings, never both
BYOS = pretrain_entrypoint_job()
INVALID += [
    ("entrypoint and model", with_(BYOS, "spec.model", {"uri": "s3://kubeforge/m"}), None,
     ["spec.model: must not be set with spec.entrypoint (your script brings its own)"]),
    ("entrypoint and optimizer", with_(BYOS, "spec.optimizer", {"lr": 0.1}), None,
     ["spec.optimizer: must not be set with spec.entrypoint (your script brings its own)"]),
    ("entrypoint module and script", with_(BYOS, "spec.entrypoint.module", "mypkg.train"), None,
     ["spec.entrypoint: exactly one of module, script must be set (got module, script)"]),
    ("entrypoint neither module nor script", with_(BYOS, "spec.entrypoint", {"args": ["x"]}), None,
     ["spec.entrypoint: exactly one of module, script must be set (got none)"]),
    ("entrypoint bad module name", with_(BYOS, "spec.entrypoint", {"module": "my-pkg/train"}), None,
     ["spec.entrypoint.module: must match ^[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)*$ "
      "(got 'my-pkg/train')"]),
    ("neither entrypoint nor trainer", with_(BYOS, "spec.entrypoint"), None,
     ["spec.model: required (or set spec.entrypoint to run your own script)",
      "spec.data: required (or set spec.entrypoint to run your own script)",
      "spec.training: required (or set spec.entrypoint to run your own script)"]),
    ("trainer without training", with_(PTJ, "spec.training"), None,
     ["spec.training: required (or set spec.entrypoint to run your own script)"]),
]


@pytest.mark.parametrize(("new", "old", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_with_exact_path_and_message(new, old, expected):
    assert [str(e) for e in validate(new, old)] == expected


def test_table_is_large_enough():
    assert len(INVALID) >= 40


VALID = [
    ("pretrain", PTJ, None),
    ("pretrain by tokens", with_(with_(PTJ, "spec.training.totalSteps"), "spec.training.totalTokens", 10**9), None),
    ("extension", CEJ, None),
    ("extension zigzag", with_(CEJ, "spec.sequenceParallel", {"impl": "zigzag", "degree": 8}), None),
    ("rl", RLJ, None),
    ("serve", INFD, None),
    ("pretrain suspend while running", with_(PTJ, "spec.runPolicy", {"suspend": True}), RUNNING_PTJ),
    ("pretrain nodes changed when pending", with_(with_(PTJ, "spec.resources.numNodes", 4),
                                                  "spec.training.globalBatchSize", 8), PTJ),
    ("pretrain own script", BYOS, None),
    ("pretrain own module", with_(BYOS, "spec.entrypoint", {"module": "mypkg.train", "args": ["-c", "x.yaml"]}),
     None),
    # JSON numbers as other tools write them: a float in the free-form config, integer quantities.
    ("pretrain float positions", with_(PTJ, "spec.model.config.max_position_embeddings", 512.0), None),
    ("pretrain integer quantities", with_(PTJ, "spec.resources.requests", {"cpu": 2, "nvidia.com/gpu": 1}), None),
    ("rl vllm disaggregated", with_(with_(RLJ, "spec.rollout", {
        "engine": "vllm", "placement": "disaggregated", "resources": {"limits": {"nvidia.com/gpu": 1}}}),
        "spec.weightSync.method", "nccl"), None),
    ("serve aggregated autoscaled", {**INFD, "spec": {
        "model": INFD["spec"]["model"], "mode": "aggregated", "router": {"enabled": True},
        "pool": {"replicas": 2, "requests": {"nvidia.com/gpu": 1}, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}}},
     None),
    ("serve reference disaggregated", with_(with_(with_(with_(INFD, "spec.engine", "reference"),
                                                        "spec.kvTransfer", {"connector": "Reference"}),
                                                  "spec.prefill", {"replicas": 1}), "spec.decode", {"replicas": 1}), None),
]


@pytest.mark.parametrize(("new", "old"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_manifest_passes(new, old):
    assert validate(new, old) == []


EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_valid(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("apiVersion", "").startswith("kubeforge.dev/"):
            assert validate(doc) == [], path.name
