"""Small builders of valid manifests; tests change one thing and look at what happens."""

from __future__ import annotations

import copy
import re
from typing import Any

from kubeforge import API_VERSION
from kubeforge.runtime.tinymodel import tiny_llama_config

_MISSING = object()


def _obj(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pretrain_job(name: str = "ptj", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    base = {
        "model": {"config": tiny_llama_config(), "tokenizer": {"builtin": "byte"}},
        "data": {"uri": "s3://kubeforge/data/tiny-corpus.jsonl"},
        "training": {"totalSteps": 20, "seqLen": 64, "globalBatchSize": 4, "microBatchSize": 2},
        "checkpoint": {"uri": f"s3://kubeforge/checkpoints/{name}", "intervalSteps": 5, "keep": 2},
        "resources": {"numNodes": 2, "processesPerNode": 1},
    }
    base.update(spec)
    return _obj("PretrainJob", name, base, namespace)


def pretrain_entrypoint_job(name: str = "ptj", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A PretrainJob running the user's own script (spec.entrypoint) instead of the built-in trainer."""
    base = {
        "entrypoint": {"script": "/workspace/train.py", "args": ["--lr", "0.1"]},
        "checkpoint": {"uri": f"s3://kubeforge/checkpoints/{name}"},
        "resources": {"numNodes": 2, "processesPerNode": 1},
    }
    base.update(spec)
    return _obj("PretrainJob", name, base, namespace)


def context_extension_job(name: str = "cej", **spec: Any) -> dict[str, Any]:
    base = {
        "model": {"from": {"kind": "PretrainJob", "name": "ptj"}},
        "data": {"uri": "s3://kubeforge/data/long.jsonl"},
        "stages": [
            {"seqLen": 8192, "ropeTheta": 500000, "steps": 10, "batchTokens": 65536},
            {"seqLen": 65536, "ropeTheta": "auto", "steps": 10, "batchTokens": 131072},
        ],
        "sequenceParallel": {"impl": "ring", "degree": 4},
        "checkpoint": {"uri": "s3://kubeforge/checkpoints/cej"},
        "resources": {"numNodes": 2, "processesPerNode": 4, "requests": {"nvidia.com/gpu": 4}},
    }
    base.update(spec)
    return _obj("ContextExtensionJob", name, base)


def rl_job(name: str = "rlj", **spec: Any) -> dict[str, Any]:
    base = {
        "model": {"uri": "s3://kubeforge/models/base"},
        "data": {"uri": "s3://kubeforge/data/prompts.jsonl"},
        "algorithm": {"name": "grpo", "groupSize": 4},
        "reward": {"verifiable": {"check": "exact_match"}},
        "rollout": {"engine": "reference", "placement": "colocated"},
        "weightSync": {"method": "http"},
        "checkpoint": {"uri": "s3://kubeforge/checkpoints/rlj"},
    }
    base.update(spec)
    return _obj("RLJob", name, base)


def inference_deployment(name: str = "infd", **spec: Any) -> dict[str, Any]:
    base = {
        "model": {"uri": "s3://kubeforge/models/tiny"},
        "engine": "vllm",
        "mode": "disaggregated",
        "prefill": {"replicas": 1, "tensorParallel": 1, "requests": {"nvidia.com/gpu": 1}},
        "decode": {
            "replicas": 2,
            "tensorParallel": 2,
            "requests": {"nvidia.com/gpu": 2},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "target": 8},
        },
    }
    base.update(spec)
    return _obj("InferenceDeployment", name, base)


def with_(obj: dict[str, Any], path: str, value: Any = _MISSING) -> dict[str, Any]:
    """A copy of obj with the field at a dotted path (`spec.stages[1].seqLen`) set, or removed if no value."""
    out = copy.deepcopy(obj)
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    node: Any = out
    for part in parts[:-1]:
        if isinstance(part, str) and part not in node:
            node[part] = {}
        node = node[part]
    if value is _MISSING:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return out
