"""The learner's side of `weightSync.method: nccl`: vLLM rollout engines driven through their dev endpoints.

`RpcEngineClient` is the learner's view of one engine that runs kubeforge's worker extension
(kubeforge.runtime.rl.vllm_worker): its policy version is the workers' (`POST /collective_rpc`
`kubeforge_policy_version`; workers that disagree read as version -1, stale), so the version fences of
kubeforge.runtime.rl.rollout work unchanged. `NcclWeightSync` (learner rank 0 only) opens the broadcast group
with every engine worker and pushes the policy:

1. `connect`: world = 1 + the workers of all engines (each engine reports one version per worker); rank 0
   serves the store on `host:port`; every engine joins with its rank offset (its init RPC runs while the
   learner joins, both block until the group is whole).
2. `push(named_tensors, version)`: the metadata goes to every engine in an update RPC (in a thread: it returns
   only when the engine has loaded everything), the learner broadcasts the buckets, every engine must answer
   the new version, then each engine's prefix cache is reset (its cached blocks hold the old weights' keys and
   values: "stale prefix cache after refit").

The same code runs against kubeforge's reference engine, which serves both endpoints over the same extension
class (gloo on CPU): tests/unit/test_rl_nccl_sync.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from .broadcast import DEFAULT_BUCKET_BYTES, TensorMeta, WeightGroup, bucket_plan, dtype_name, flatten
from .weightsync import COLLECTIVE_RPC_PATH, RESET_PREFIX_CACHE_PATH, EngineClient, StaleEngine

log = logging.getLogger("kubeforge.rl.sync")


class EngineRpcError(RuntimeError):
    pass


class RpcEngineClient(EngineClient):
    """An engine with kubeforge's worker extension, reached through vLLM's dev endpoints."""

    def rpc(self, method: str, *args: str, timeout: float | None = None) -> list[Any]:
        body: dict[str, Any] = {"method": method, "args": list(args)}
        if timeout is not None:
            body["timeout"] = timeout
        r = self.client.post(self.url + COLLECTIVE_RPC_PATH, json=body,
                             timeout=None if timeout is None else timeout + 30)
        if r.status_code >= 400:
            raise EngineRpcError(f"{self.url} {method}: HTTP {r.status_code} {r.text[:300]}")
        return list(r.json().get("results") or [])

    def versions(self) -> list[int]:
        return [int(x["version"]) for x in self.rpc("kubeforge_policy_version", timeout=60)]

    def version(self) -> int:
        have = set(self.versions())
        return have.pop() if len(have) == 1 else -1

    def workers(self) -> int:
        return len(self.versions())

    def wait_ready(self, timeout: float = 1800.0) -> None:
        """vLLM loads and compiles for minutes: until /health answers and the extension does too."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.get(self.url + "/health").raise_for_status()
                self.versions()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(2.0)

    def reset_prefix_cache(self) -> None:
        self.client.post(self.url + RESET_PREFIX_CACHE_PATH).raise_for_status()

    def shutdown(self) -> None:
        """vLLM: the extension signals the API server (KUBEFORGE_STOP_PID); the reference engine has its own
        shutdown endpoint."""
        try:
            if any(r.get("stopping") for r in self.rpc("kubeforge_stop_server", timeout=30)):
                return
        except Exception:  # noqa: BLE001, S110 - already gone is fine
            return
        super().shutdown()


class NcclWeightSync:
    """Learner rank 0's broadcast of the policy to every worker of every engine."""

    def __init__(self, engines: list[RpcEngineClient], host: str, port: int, backend: str,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0) -> None:
        self.engines, self.host, self.port, self.backend = engines, host, port, backend
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group: WeightGroup | None = None

    def _on_engines(self, call: Any) -> list[Any]:
        """call(engine) on every engine at once, in threads; re-raises the first failure after all ended."""
        results: list[Any] = [None] * len(self.engines)
        errors: list[BaseException] = []

        def run(i: int, e: RpcEngineClient) -> None:
            try:
                results[i] = call(e)
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i, e), daemon=True) for i, e in enumerate(self.engines)]
        for t in threads:
            t.start()
        return self._join(threads, results, errors)

    def _join(self, threads: list[threading.Thread], results: list[Any], errors: list[BaseException]) -> list[Any]:
        for t in threads:
            t.join(self.timeout_s + 60)
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise EngineRpcError("an engine did not answer the weight-sync call in time")
        return results

    def connect(self) -> None:
        sizes = [e.workers() for e in self.engines]
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        results: list[Any] = [None] * len(self.engines)
        errors: list[BaseException] = []

        def join(i: int, e: RpcEngineClient) -> None:
            try:
                init = {"masterAddress": self.host, "masterPort": self.port, "rankOffset": offsets[i],
                        "worldSize": world, "backend": self.backend, "timeoutSeconds": self.timeout_s}
                results[i] = e.rpc("kubeforge_init_weight_group", json.dumps(init), timeout=self.timeout_s)
            except BaseException as exc:  # noqa: BLE001 - re-raised after the join
                errors.append(exc)

        threads = [threading.Thread(target=join, args=(i, e), daemon=True) for i, e in enumerate(self.engines)]
        for t in threads:
            t.start()
        try:
            self.group = WeightGroup(self.host, self.port, 0, world, self.backend, timeout_s=self.timeout_s)
        finally:
            self._join(threads, results, errors)
        log.info("weight-sync group of %d ranks (%s) with %d engines", world, self.backend, len(self.engines))

    def push(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> int:
        """Broadcast every tensor; returns how many. Raises StaleEngine when an engine did not take `version`."""
        if self.group is None:
            self.connect()
        assert self.group is not None
        items = [(n, t) for n, t in named_tensors]
        metas = [TensorMeta(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in items]
        update = json.dumps({"version": version, "bucketBytes": self.bucket_bytes,
                             "tensors": [m.to_wire() for m in metas]})
        results: list[Any] = [None] * len(self.engines)
        errors: list[BaseException] = []

        def receive(i: int, e: RpcEngineClient) -> None:
            try:
                results[i] = e.rpc("kubeforge_update_weights", update, timeout=self.timeout_s)
            except BaseException as exc:  # noqa: BLE001 - re-raised after the join
                errors.append(exc)

        threads = [threading.Thread(target=receive, args=(i, e), daemon=True) for i, e in enumerate(self.engines)]
        for t in threads:
            t.start()
        try:
            for bucket in bucket_plan(metas, self.bucket_bytes):
                flat = flatten([items[i][1] for i in bucket]).to(self.group.device)
                self.group.broadcast(flat, src=0)
        finally:
            self._join(threads, results, errors)
        for e, per_worker in zip(self.engines, results, strict=True):
            for r in per_worker:
                if int(r["version"]) != version:
                    raise StaleEngine(e.url, int(r["version"]), version)
        self._on_engines(lambda e: e.reset_prefix_cache())
        return len(items)

    def close(self) -> None:
        if self.group is not None:
            try:
                self._on_engines(lambda e: e.rpc("kubeforge_close_weight_group", timeout=60))
            except Exception:  # noqa: BLE001, S110 - closing is best effort
                pass
            self.group.close()
            self.group = None


def full_named_tensors(model: Any) -> list[tuple[str, Any]]:
    """The policy's tensors by Hugging Face name, whole: FSDP2 shards are gathered (a collective: every
    learner rank calls this; only rank 0 sends). ppo's value head is not part of the policy."""
    out = []
    for name, t in model.state_dict().items():
        if name.startswith("kf_value_head"):
            continue
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        out.append((name, full.detach()))
    return out


__all__ = ["EngineRpcError", "NcclWeightSync", "RpcEngineClient", "full_named_tensors"]
