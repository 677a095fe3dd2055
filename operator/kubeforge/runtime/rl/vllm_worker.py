"""The rollout engine's side of the weight sync: a vLLM worker extension.

vLLM mixes this class into every worker of an engine started with
`vllm serve ... --worker-extension-cls kubeforge.runtime.rl.vllm_worker.WeightSyncWorkerExtension`; the learner
calls its methods on all workers at once through vLLM's `POST /collective_rpc` (served when
`VLLM_SERVER_DEV_MODE=1`; arguments travel as strings, so every argument here is one JSON string):

- `kubeforge_init_weight_group(init)`: join the broadcast group of kubeforge.runtime.rl.broadcast with the
  learner's rank 0 (`{"masterAddress", "masterPort", "rankOffset", "worldSize", "backend"}`); this worker's
  rank is rankOffset + its rank in the engine (tensor-parallel workers each receive the full tensors and load
  their own shard through the model's `load_weights`).
- `kubeforge_update_weights(update)`: `{"version", "tensors": [{"name", "dtype", "shape"}], "bucketBytes"}`:
  receive the buckets the learner broadcasts, load each into the model (Hugging Face names; vLLM's
  `load_weights` maps them onto its fused layers), then take the policy version. The learner resets the
  engine's prefix cache afterwards (`POST /reset_prefix_cache`): cached blocks hold the old weights' keys.
- `kubeforge_policy_version()`: `{"version": N}`, 0 until the first update.
- `kubeforge_close_weight_group()`, `kubeforge_stop_server()` (the learner is done: SIGTERM to the API server
  named by KUBEFORGE_STOP_PID, which the operator sets to 1: the container's command is `vllm serve`).

The only vLLM specifics are `_kf_rank` (the worker's rank in its engine) and `_kf_load` (the model runner's
`load_weights`); kubeforge's reference engine subclasses the extension with a Hugging Face model behind them,
so the code that runs inside vLLM runs in the CPU tests too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

from .broadcast import DEFAULT_BUCKET_BYTES, TensorMeta, WeightGroup, bucket_plan, unflatten

log = logging.getLogger("kubeforge.rl.worker")

EXTENSION_CLASS = "kubeforge.runtime.rl.vllm_worker.WeightSyncWorkerExtension"
STOP_PID_ENV = "KUBEFORGE_STOP_PID"


class WeightSyncWorkerExtension:
    """Methods vLLM adds to its worker (`self.device`, `self.model_runner` are the worker's)."""

    _kf_group: WeightGroup | None = None
    _kf_version: int = 0

    # --- seams: what differs between a vLLM worker and the reference engine ------------------------------
    def _kf_rank(self) -> int:
        from vllm.distributed.parallel_state import get_world_group

        return int(get_world_group().rank)

    def _kf_load(self, weights: list[tuple[str, Any]]) -> None:
        self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]

    def _kf_device(self) -> Any:
        return self.device  # type: ignore[attr-defined]

    def _kf_loaded(self, version: int) -> None:
        """After an update is in place (the reference engine stamps its HTTP fence here)."""

    # --- called through /collective_rpc ------------------------------------------------------------------
    def kubeforge_init_weight_group(self, init: str) -> dict[str, Any]:
        info = json.loads(init)
        if self._kf_group is not None:
            self.kubeforge_close_weight_group()
        rank = int(info["rankOffset"]) + self._kf_rank()
        self._kf_group = WeightGroup(str(info["masterAddress"]), int(info["masterPort"]), rank,
                                     int(info["worldSize"]), str(info.get("backend", "nccl")),
                                     device=self._kf_device(), timeout_s=float(info.get("timeoutSeconds", 600)))
        log.info("joined the weight-sync group as rank %d of %d", rank, int(info["worldSize"]))
        return {"rank": rank}

    def kubeforge_update_weights(self, update: str) -> dict[str, Any]:
        import torch

        if self._kf_group is None:
            raise RuntimeError("kubeforge_init_weight_group was not called")
        req = json.loads(update)
        metas = [TensorMeta.from_wire(t) for t in req["tensors"]]
        device = self._kf_device()
        loaded = 0
        for bucket in bucket_plan(metas, int(req.get("bucketBytes", DEFAULT_BUCKET_BYTES))):
            part = [metas[i] for i in bucket]
            flat = torch.empty(sum(m.numel for m in part), dtype=getattr(torch, part[0].dtype), device=device)
            self._kf_group.broadcast(flat, src=0)
            self._kf_load([(m.name, t) for m, t in zip(part, unflatten(flat, part), strict=True)])
            loaded += len(part)
            del flat
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        self._kf_version = int(req["version"])
        self._kf_loaded(self._kf_version)
        return {"version": self._kf_version, "tensors": loaded}

    def kubeforge_policy_version(self) -> dict[str, Any]:
        return {"version": self._kf_version}

    def kubeforge_close_weight_group(self) -> dict[str, Any]:
        if self._kf_group is not None:
            self._kf_group.close()
            self._kf_group = None
        return {"closed": True}

    def kubeforge_stop_server(self) -> dict[str, Any]:
        pid = os.environ.get(STOP_PID_ENV)
        if not pid or not pid.isdigit():
            return {"stopping": False}
        self.kubeforge_close_weight_group()
        os.kill(int(pid), signal.SIGTERM)
        return {"stopping": True}


def rpc_methods(worker: Any) -> set[str]:
    """The extension's methods a server may expose by name (never the worker's other methods)."""
    return {m for m in dir(WeightSyncWorkerExtension) if m.startswith("kubeforge_") and callable(getattr(worker, m))}


__all__ = ["EXTENSION_CLASS", "STOP_PID_ENV", "WeightSyncWorkerExtension", "rpc_methods"]
