"""Learner -> engine weight sync over HTTP (CPU / the reference engine), with policy version stamps.

Engine side (`engine_weight_routes`, mounted by kubeforge.runtime.serve.engine):
- `PUT /kubeforge/v1/weights?version=N`: a safetensors blob of the full state dict; loaded in place, then the
  engine's KV store (prefix / hand-off entries computed with the old weights) is cleared and its policy
  version set to N. Engine weights and KV entries of two versions never mix.
- `GET /kubeforge/v1/weights`: {"version": N} (0 until the first sync: the weights it was started with).
- `POST /kubeforge/v1/shutdown`: drain and exit 0 (the learner is done; the rollout pod succeeds).
- `POST /kubeforge/v1/logprobs`: {"prompt_ids", "completion_ids", "version"} -> the log-probabilities of the
  completion tokens under the engine's weights, stamped with its version; a request that expects another
  version is answered 409 (the engine is stale), so nobody trains on a stale engine's numbers by accident.

Learner side: `push_weights` sends the weights; `EngineClient` reads versions and log-probabilities and raises
`StaleEngine` when an engine's version is not the one the learner published.

vLLM's side of the same idea (`weightSync.method: nccl`): the tensors go over a broadcast group
(kubeforge.runtime.rl.broadcast) into kubeforge's worker extension (kubeforge.runtime.rl.vllm_worker), driven
through vLLM's dev endpoints `POST /collective_rpc` and `POST /reset_prefix_cache`. The reference engine serves
those two endpoints as well, with the same extension class over its Hugging Face model (`ReferenceWorker`,
gloo on CPU), so the learner's NCCL-path client (kubeforge.runtime.rl.vllm_sync) runs against it in tests.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from .vllm_worker import WeightSyncWorkerExtension, rpc_methods

WEIGHTS_PATH = "/kubeforge/v1/weights"
COLLECTIVE_RPC_PATH = "/collective_rpc"  # vLLM's (VLLM_SERVER_DEV_MODE=1)
RESET_PREFIX_CACHE_PATH = "/reset_prefix_cache"  # vLLM's (VLLM_SERVER_DEV_MODE=1)
LOGPROBS_PATH = "/kubeforge/v1/logprobs"
SHUTDOWN_PATH = "/kubeforge/v1/shutdown"


class StaleEngine(Exception):
    """An engine serves another policy version than the learner published."""

    def __init__(self, url: str, have: int, want: int) -> None:
        super().__init__(f"engine {url} serves policy version {have}, the learner is at {want}")
        self.url, self.have, self.want = url, have, want


def state_dict_bytes(model: Any) -> bytes:
    from safetensors.torch import save

    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
          if not k.startswith("kf_value_head")}
    # tied weights share storage; safetensors refuses shared tensors, so each gets its own copy
    return save({k: v.clone() for k, v in sd.items()})


def load_weights(model: Any, blob: bytes) -> int:
    """Copy a safetensors blob into the model's parameters in place; returns the tensors loaded."""
    import torch
    from safetensors.torch import load

    new = load(blob)
    own = model.state_dict()
    missing = [k for k in own if k not in new]
    unexpected = [k for k in new if k not in own]
    if unexpected or (missing and not all(k.endswith("lm_head.weight") for k in missing)):
        raise ValueError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, v in new.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))
    return len(new)


class ReferenceWorker(WeightSyncWorkerExtension):
    """The worker extension over the reference engine's model: what `_kf_load` gets goes into the Hugging Face
    parameters in place (names as in its state dict), under the engine's lock; after an update the engine's KV
    store is cleared and its HTTP version fence moves too."""

    def __init__(self, engine: Any, lock: Any) -> None:
        self.engine, self.lock = engine, lock

    def _kf_rank(self) -> int:
        return 0

    def _kf_device(self) -> Any:
        return next(self.engine.model.parameters()).device

    def _kf_load(self, weights: list[tuple[str, Any]]) -> None:
        import torch

        with self.lock, torch.no_grad():
            own = self.engine.model.state_dict()
            for name, t in weights:
                if name not in own:
                    raise ValueError(f"{name}: not a tensor of the engine's model")
                if own[name].shape != t.shape:
                    raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(own[name].shape)}")
                own[name].copy_(t.to(own[name].dtype))

    def _kf_loaded(self, version: int) -> None:
        with self.lock:
            self.engine.store.clear()  # its KV entries were computed with the old weights
            self.engine.policy_version = version


def teacher_forced_logprobs(model: Any, prompt_ids: list[int], completion_ids: list[int],
                            temperature: float = 1.0) -> list[float]:
    import torch

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:-1].float()
    if temperature > 0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, dim=-1)
    return [float(x) for x in lp.gather(1, torch.tensor(completion_ids).unsqueeze(1)).squeeze(1)]


def engine_weight_routes(engine: Any) -> list[Any]:
    """Starlette routes of the weight-sync protocol for a reference engine (`engine.model`, `engine.store`)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    lock = threading.Lock()
    if not hasattr(engine, "policy_version"):
        engine.policy_version = 0

    def _update(blob: bytes, version: int) -> int:
        with lock:
            n = load_weights(engine.model, blob)
            engine.store.clear()  # its KV entries were computed with the old weights
            engine.policy_version = version
            return n

    async def put_weights(request: Request) -> JSONResponse:
        try:
            version = int(request.query_params["version"])
        except (KeyError, ValueError):
            return JSONResponse({"error": "version query parameter required"}, status_code=400)
        blob = await request.body()
        try:
            n = await asyncio.to_thread(_update, blob, version)
        except Exception as exc:  # noqa: BLE001 - a bad blob is the caller's error; the old weights stay
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=400)
        return JSONResponse({"version": engine.policy_version, "tensors": n})

    async def get_weights(request: Request) -> JSONResponse:
        return JSONResponse({"version": engine.policy_version})

    async def logprobs(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            prompt, completion = list(map(int, body["prompt_ids"])), list(map(int, body["completion_ids"]))
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        want = body.get("version")
        if want is not None and int(want) != engine.policy_version:
            return JSONResponse({"error": "stale", "version": engine.policy_version}, status_code=409)

        def run() -> tuple[list[float], int]:
            with lock:
                return (teacher_forced_logprobs(engine.model, prompt, completion, float(body.get("temperature", 1.0))),
                        engine.policy_version)

        lps, version = await asyncio.to_thread(run)
        return JSONResponse({"logprobs": lps, "version": version})

    worker = ReferenceWorker(engine, lock)

    async def collective_rpc(request: Request) -> JSONResponse:
        """vLLM's dev endpoint, for kubeforge's extension methods only: {"method", "args": [str], "kwargs"}
        -> {"results": [one per worker]} (the reference engine is one worker)."""
        try:
            body = json.loads(await request.body())
            method, args, kwargs = body["method"], [str(a) for a in body.get("args", [])], body.get("kwargs") or {}
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        if method not in rpc_methods(worker):
            return JSONResponse({"error": f"unknown method {method!r}"}, status_code=400)
        try:
            result = await asyncio.to_thread(getattr(worker, method), *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the learner; the old weights stay
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        return JSONResponse({"results": [result]})

    async def reset_prefix_cache(request: Request) -> JSONResponse:
        with lock:
            engine.store.clear()
        return JSONResponse({})

    async def shutdown(request: Request) -> JSONResponse:
        """The learner is done: stop like on SIGTERM (drain, exit 0), so a rollout pod of an RLJob's gang
        succeeds with the learners."""
        import os
        import signal

        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
        return JSONResponse({"stopping": True})

    return [Route(WEIGHTS_PATH, put_weights, methods=["PUT"]), Route(WEIGHTS_PATH, get_weights, methods=["GET"]),
            Route(LOGPROBS_PATH, logprobs, methods=["POST"]), Route(SHUTDOWN_PATH, shutdown, methods=["POST"]),
            Route(COLLECTIVE_RPC_PATH, collective_rpc, methods=["POST"]),
            Route(RESET_PREFIX_CACHE_PATH, reset_prefix_cache, methods=["POST"])]


class EngineClient:
    """The learner's view of one rollout engine."""

    def __init__(self, url: str, timeout: float = 120.0, client: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.client = client or httpx.Client(timeout=timeout)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until the engine answers (a rollout pod starts with the learners and loads its model meanwhile)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.version()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def shutdown(self) -> None:
        try:
            self.client.post(self.url + SHUTDOWN_PATH)
        except Exception:  # noqa: BLE001, S110 - already gone is fine
            pass

    def version(self) -> int:
        r = self.client.get(self.url + WEIGHTS_PATH)
        r.raise_for_status()
        return int(r.json()["version"])

    def push(self, blob: bytes, version: int) -> None:
        r = self.client.put(self.url + WEIGHTS_PATH, params={"version": version}, content=blob,
                            headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        if int(r.json()["version"]) != version:
            raise StaleEngine(self.url, int(r.json()["version"]), version)

    def check(self, version: int) -> None:
        have = self.version()
        if have != version:
            raise StaleEngine(self.url, have, version)

    def logprobs(self, prompt_ids: list[int], completion_ids: list[int], version: int,
                 temperature: float = 1.0) -> list[float]:
        r = self.client.post(self.url + LOGPROBS_PATH, json={"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                                                             "version": version, "temperature": temperature})
        if r.status_code == 409:
            raise StaleEngine(self.url, int(r.json()["version"]), version)
        r.raise_for_status()
        return [float(x) for x in r.json()["logprobs"]]


def push_weights(model: Any, engines: list[EngineClient], version: int) -> None:
    """Send the policy's weights to every engine and stamp them with `version`."""
    blob = state_dict_bytes(model)
    for e in engines:
        e.push(blob, version)
