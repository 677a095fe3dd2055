"""Rendering of vLLM engine containers for InferenceDeployment pools (engine `vllm`).

Pure functions from the spec to the `vllm serve` command line, its environment, ports and probes. Flag and
config names follow vLLM's own (`vllm serve --help`, `vllm/config/kv_transfer.py`, the NixlConnector guide
and its integration scripts):

  vllm serve <local dir> --served-model-name N --host 0.0.0.0 --port P --tensor-parallel-size TP
      --shutdown-timeout S [--tokenizer DIR] [--max-model-len L] [--block-size B]
      [--kv-transfer-config '<JSON KVTransferConfig>'] [extra args]

KVTransferConfig fields used: `kv_connector`, `kv_role` (kv_producer | kv_consumer | kv_both),
`kv_buffer_device` (cuda | cpu), `kv_load_failure_policy` (recompute | fail). NixlConnector is symmetric
(every instance runs `kv_both`; the proxy's kv_transfer_params decide who prefills).

kubeforge's router drives the pull flow NixlConnector uses (the prefill response's kv_transfer_params go
to the decode request). The push-style connectors (P2pNccl, LMCache, Mooncake) need a proxy kubeforge does
not have (concurrent legs, bootstrap parameters), so the API refuses them.

The flags are those of one vLLM release, VLLM_VERSION: the vllm-serve image is built on it and the tests
check every rendered command line against that release's own argument parser (tests/data/).

NIXL's handshake runs over a side channel: `VLLM_NIXL_SIDE_CHANNEL_HOST` must be an address the peer
engines can reach (the pod IP, from the downward API) and `VLLM_NIXL_SIDE_CHANNEL_PORT` a port free in the
pod; the prefill engine hands both to the decode engine inside kv_transfer_params.
"""

from __future__ import annotations

import json
from typing import Any

from kubeforge.api.kinds import InferenceDeploymentSpec, Pool

# The vLLM release the vllm-serve image pins (images/vllm-serve/Dockerfile) and the flags below are for.
VLLM_VERSION = "0.18.0"

# vLLM roles of a pool, by kubeforge pool name.
ROLE_PREFILL, ROLE_DECODE, ROLE_BOTH = "prefill", "decode", "both"
SYMMETRIC_CONNECTORS = frozenset({"NixlConnector"})

# Big checkpoints take minutes to load and compile; the startup probe allows 30 min before liveness counts.
STARTUP_PERIOD_S = 10
STARTUP_FAILURES = 180
# Drain: a preStop pause lets endpoints and routers drop the pod before SIGTERM; then vLLM (>= 0.18,
# --shutdown-timeout) refuses new requests and lets in-flight ones finish. The grace period covers both.
PRESTOP_SLEEP_S = 5
SHUTDOWN_TIMEOUT_S = 90
GRACE_SECONDS = PRESTOP_SLEEP_S + SHUTDOWN_TIMEOUT_S + 15


def kv_role(connector: str, role: str) -> str:
    """The kv_role of one engine: kv_both for symmetric connectors, else producer (prefill) / consumer."""
    if connector in SYMMETRIC_CONNECTORS or role == ROLE_BOTH:
        return "kv_both"
    return "kv_producer" if role == ROLE_PREFILL else "kv_consumer"


def kv_transfer_config(spec: InferenceDeploymentSpec, role: str) -> dict[str, Any] | None:
    """The `--kv-transfer-config` object of an engine in `role`; None when aggregated (no KV transfer)."""
    if spec.mode != "disaggregated" or role == ROLE_BOTH:
        return None
    kv = spec.kv_transfer
    return {
        "kv_connector": kv.connector,
        "kv_role": kv_role(kv.connector, role),
        "kv_buffer_device": kv.buffer_device,
        "kv_load_failure_policy": kv.failure_policy,
    }


def vllm_command(
    spec: InferenceDeploymentSpec, pool: Pool, role: str, model_dir: str, served_name: str,
    tokenizer_dir: str | None = None,
) -> list[str]:
    """argv of the engine container; tokenizer_dir when model.tokenizer is not the model's own."""
    argv = [
        "vllm", "serve", model_dir,
        "--served-model-name", served_name,
        "--host", "0.0.0.0",
        "--port", str(spec.port),
        "--tensor-parallel-size", str(pool.tensor_parallel),
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
    ]
    if tokenizer_dir is not None:
        argv += ["--tokenizer", tokenizer_dir]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.block_size is not None:
        argv += ["--block-size", str(spec.block_size)]
    cfg = kv_transfer_config(spec, role)
    if cfg is not None:
        argv += ["--kv-transfer-config", json.dumps(cfg, separators=(",", ":"), sort_keys=True)]
    return argv + list(pool.extra_args)


# RLJob rollout engines (rollout.engine vllm, placement disaggregated): `vllm serve` with kubeforge's worker
# extension, which joins the learner's weight-broadcast group and loads the tensors it receives
# (kubeforge.runtime.rl.vllm_worker); the learner drives it through the dev endpoints /collective_rpc and
# /reset_prefix_cache, served only with VLLM_SERVER_DEV_MODE=1 (the rollout Service is headless and internal).
RL_WORKER_EXTENSION = "kubeforge.runtime.rl.vllm_worker.WeightSyncWorkerExtension"


def rollout_command(model_dir: str, served_name: str, port: int, tensor_parallel: int, seed: int,
                    extra_args: tuple[str, ...] | list[str] = ()) -> list[str]:
    """argv of an RLJob rollout engine.

    --generation-config vllm: sampling follows the request alone, never the model's generation_config.json
    (a top_p or top_k there would change the behaviour policy behind the learner's back);
    --logprobs-mode processed_logprobs: the log-probabilities the engine returns are those of the
    temperature-scaled distribution it sampled from, the behaviour policy of the off-policy correction."""
    return [
        "vllm", "serve", model_dir,
        "--served-model-name", served_name,
        "--host", "0.0.0.0",
        "--port", str(port),
        "--tensor-parallel-size", str(tensor_parallel),
        "--worker-extension-cls", RL_WORKER_EXTENSION,
        "--generation-config", "vllm",
        "--logprobs-mode", "processed_logprobs",
        "--seed", str(seed),
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
        *extra_args,
    ]


def rollout_env() -> list[dict[str, Any]]:
    return [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "VLLM_SERVER_DEV_MODE", "value": "1"},  # /collective_rpc and /reset_prefix_cache
        # the learner stops the engine through the extension when training is done: SIGTERM to the API
        # server, PID 1 of the container (its command is `vllm serve`, no shell in between)
        {"name": "KUBEFORGE_STOP_PID", "value": "1"},
    ]


def vllm_env(spec: InferenceDeploymentSpec, role: str) -> list[dict[str, Any]]:
    """Engine env: offline model loading, and NIXL's side channel on the pod IP when it is used."""
    env: list[dict[str, Any]] = [
        {"name": "HF_HUB_OFFLINE", "value": "1"},  # the model is local; never reach for the Hub
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if spec.mode == "disaggregated" and role != ROLE_BOTH and spec.kv_transfer.connector == "NixlConnector":
        env += [
            {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(spec.kv_transfer.side_channel_port)},
        ]
    return env


def vllm_ports(spec: InferenceDeploymentSpec, role: str) -> list[dict[str, Any]]:
    ports = [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}]
    if spec.mode == "disaggregated" and role != ROLE_BOTH and spec.kv_transfer.connector == "NixlConnector":
        ports.append({"name": "nixl", "containerPort": spec.kv_transfer.side_channel_port, "protocol": "TCP"})
    return ports


def http_probe(path: str, period: int, failures: int, timeout: int = 5, delay: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def pre_stop(seconds: int = PRESTOP_SLEEP_S) -> dict[str, Any]:
    """A pause before SIGTERM, so Services and routers stop sending new requests first."""
    return {"preStop": {"exec": {"command": ["sleep", str(seconds)]}}}


def vllm_probes() -> dict[str, Any]:
    """liveness /health (the engine process is alive); readiness and startup /v1/models (it serves)."""
    return {
        "startupProbe": http_probe("/v1/models", STARTUP_PERIOD_S, STARTUP_FAILURES),
        "livenessProbe": http_probe("/health", 10, 3),
        "readinessProbe": http_probe("/v1/models", 5, 3),
    }


__all__ = [
    "GRACE_SECONDS",
    "RL_WORKER_EXTENSION",
    "VLLM_VERSION",
    "PRESTOP_SLEEP_S",
    "SHUTDOWN_TIMEOUT_S",
    "http_probe",
    "kv_role",
    "kv_transfer_config",
    "pre_stop",
    "rollout_command",
    "rollout_env",
    "vllm_command",
    "vllm_env",
    "vllm_ports",
    "vllm_probes",
]
