"""kubeforge's reference serving engine: a small OpenAI-compatible server on transformers.

It stands in for vLLM on CPU clusters and in CI, and speaks vLLM's disaggregated prefill/decode protocol
with a real KV-cache hand-off (kvcache.py):
  - a request with kv_transfer_params.do_remote_decode=true is prefilled here; its KV cache is kept under a
    transfer id and the answer (one token) carries kv_transfer_params naming this engine
    (remote_engine_id, remote_host, remote_port, remote_block_ids=[transfer id], do_remote_prefill=true);
  - a request with kv_transfer_params.do_remote_prefill=true fetches that cache from
    http://remote_host:remote_port/kv/<id> and continues from it without recomputing the prompt; if the
    fetch fails, --kv-load-failure-policy decides: `fail` (a clean 502) or `recompute` (prefill locally).
Greedy output is identical disaggregated, aggregated and with `model.generate`.

Requests run on one worker thread that interleaves up to --max-num-seqs sequences token by token; the rest
wait in a queue, so vllm:num_requests_waiting / vllm:num_requests_running are real. On SIGTERM the engine
stops taking new requests (readiness /v1/models answers 503, generation 503 so a router retries elsewhere),
keeps serving KV fetches, finishes what is in flight, then exits (bounded by --drain-timeout).

    python -m kubeforge.runtime.serve.engine --model DIR --served-model-name NAME --port 8000 \
        --role {both,prefill,decode} [--max-model-len N] [--engine-id ID]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubeforge.contract import ENV_KV_TOKEN, KV_TOKEN_HEADER

from . import metrics as m
from .kvcache import (
    KVEntry,
    KVStore,
    KVTransferError,
    build_cache,
    cache_layers,
    check_compatible,
    deserialize,
    model_signature,
    serialize,
)

log = logging.getLogger("kubeforge.serve.engine")


class BadRequest(Exception):
    pass


def error_body(message: str, type_: str, code: int) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, status), status_code=status)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass
class Sequence:
    """One request's state on the worker thread."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Any  # callable(event tuple), thread-safe
    remote_decode: bool = False  # prefill-only: keep the KV cache for a decode engine
    kv: KVEntry | None = None  # a cache fetched from a prefill engine
    arrival: float = field(default_factory=time.monotonic)
    cache: Any = None
    next_logits: Any = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    generator: Any = None
    cancelled: bool = False
    first_token_time: float | None = None
    last_token_time: float | None = None


class Engine:
    def __init__(
        self,
        model_dir: str,
        served_model_name: str,
        role: str = "both",
        max_model_len: int | None = None,
        engine_id: str | None = None,
        max_num_seqs: int = 8,
        kv_store: KVStore | None = None,
        kv_load_failure_policy: str = "fail",
        advertise_host: str = "127.0.0.1",
        port: int = 8000,
        kv_fetch_timeout: float = 30.0,
        dtype: str = "float32",
        tokenizer_dir: str | None = None,
        max_waiting: int = 1024,
        kv_token: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.torch = torch
        self.model_dir = model_dir
        self.name = served_model_name
        self.role = role
        self.engine_id = engine_id or f"kubeforge-{uuid.uuid4().hex[:12]}"
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting  # queued requests beyond this are answered 429 (0: no bound)
        self.policy = kv_load_failure_policy
        self.advertise_host = advertise_host
        self.port = port
        self.kv_fetch_timeout = kv_fetch_timeout
        # the deployment's token: required on /kv/*, /kubeforge/v1/* and KV-directed requests, sent on fetches
        self.kv_token = kv_token or None
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        cfg = self.model.config
        self.max_model_len = max_model_len or getattr(cfg, "max_position_embeddings", 2048)
        self.sig = {**model_signature(cfg), "dtype": str(self.model.dtype)}
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.store = kv_store or KVStore()
        self.queue: queue.Queue[Sequence] = queue.Queue()
        self.active: list[Sequence] = []
        self.draining = False
        self.open_requests = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self.created = int(time.time())
        from ..provenance import read as read_provenance

        # where the weights came from (kubeforge-provenance.json of an exported model), on /v1/models
        self.provenance = read_provenance(model_dir)
        self._init_metrics()

    # ------------------------------------------------------------------------------------------ metrics
    def _init_metrics(self) -> None:
        r = self.registry = m.Registry()
        lbl = (("model_name", self.name),)
        r.gauge(
            m.VLLM_WAITING,
            "Requests waiting to be processed.",
            ["model_name"],
            fn=lambda: {lbl: self.queue.qsize()},
        )
        r.gauge(
            m.VLLM_RUNNING, "Requests being processed.", ["model_name"], fn=lambda: {lbl: len(self.active)}
        )
        r.gauge(
            m.VLLM_KV_USAGE, "KV-cache usage, 1 = full.", ["model_name"], fn=lambda: {lbl: self._kv_usage()}
        )
        self.m_ttft = r.histogram(m.VLLM_TTFT, "Time to first token.", ["model_name"], m.TTFT_BUCKETS)
        self.m_itl = r.histogram(m.VLLM_ITL, "Inter-token latency.", ["model_name"], m.ITL_BUCKETS)
        self.m_e2e = r.histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", ["model_name"], m.E2E_BUCKETS
        )
        self.m_prompt = r.counter("vllm:prompt_tokens_total", "Prompt tokens processed.", ["model_name"])
        self.m_gen = r.counter("vllm:generation_tokens_total", "Tokens generated.", ["model_name"])
        self.m_success = r.counter(
            "vllm:request_success_total", "Finished requests.", ["model_name", "finished_reason"]
        )
        self.m_prefill_computed = r.counter(
            m.PREFILL_TOKENS_COMPUTED, "Prompt tokens run through the model here.", ["model_name"]
        )
        self.m_kv_fetched = r.counter(
            m.KV_FETCHED, "KV caches fetched from a prefill engine.", ["model_name"]
        )
        self.m_kv_fetched_tokens = r.counter(
            "kubeforge:kv_transfer_fetched_tokens_total",
            "Prompt tokens whose KV came from a prefill engine.",
            ["model_name"],
        )
        self.m_kv_failed = r.counter(m.KV_FETCH_FAILED, "KV fetches that failed.", ["model_name", "reason"])
        self.m_kv_served = r.counter(m.KV_SERVED, "KV caches handed to decode engines.", ["model_name"])
        self.m_kv_bytes = r.counter("kubeforge:kv_transfer_bytes_total", "KV bytes sent.", ["model_name"])
        for c in (
            self.m_prompt,
            self.m_gen,
            self.m_prefill_computed,
            self.m_kv_fetched,
            self.m_kv_fetched_tokens,
            self.m_kv_served,
            self.m_kv_bytes,
        ):
            c.inc(0, model_name=self.name)  # present from the start, so rates and deltas work
        r.gauge(
            "kubeforge:kv_store_entries",
            "KV caches waiting to be fetched.",
            ["model_name"],
            fn=lambda: {lbl: len(self.store)},
        )
        r.gauge(
            "kubeforge:kv_store_expired_total",
            "KV caches dropped unfetched (TTL or bound).",
            ["model_name"],
            fn=lambda: {lbl: self.store.expired + self.store.evicted},
        )
        info = (("model_name", self.name), ("role", self.role), ("engine_id", self.engine_id))
        r.gauge(
            "kubeforge:engine_info",
            "Static facts about this engine (value 1).",
            ["model_name", "role", "engine_id"],
            fn=lambda: {info: 1},
        )
        r.gauge(
            "kubeforge:engine_draining",
            "1 while draining for shutdown.",
            ["model_name"],
            fn=lambda: {lbl: int(self.draining)},
        )

    def _kv_usage(self) -> float:
        cap = self.max_num_seqs * self.max_model_len
        used = sum(len(s.prompt_ids) + len(s.generated) for s in list(self.active)) + self.store.tokens
        return min(1.0, used / cap) if cap else 0.0

    # ------------------------------------------------------------------------------------------ worker
    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker and wait for it: a daemon thread still inside a torch op when the interpreter
        finalizes aborts the process ("terminate called without an active exception", exit -6) instead of
        the clean exit 0 a drained engine owes its pod."""
        self._stop.set()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def submit(self, seq: Sequence) -> None:
        self.queue.put(seq)

    def _run(self) -> None:
        torch = self.torch
        with torch.inference_mode():
            while not self._stop.is_set():
                while len(self.active) < self.max_num_seqs:
                    try:
                        seq = self.queue.get_nowait() if self.active else self.queue.get(timeout=0.05)
                    except queue.Empty:
                        break
                    self._guard(seq, self._begin, seq)
                for seq in list(self.active):
                    if seq.cancelled:
                        self._finish(seq, None)
                        continue
                    self._guard(seq, self._step, seq)
                if not self.active and self.store.ttl:
                    self.store.sweep()

    def _guard(self, seq: Sequence, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:
            log.exception("request %s failed", seq.rid)
            if seq in self.active:
                self.active.remove(seq)
            seq.emit(("error", f"engine error: {e}"))

    def _forward(self, ids: list[int], cache):
        torch = self.torch
        out = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long), past_key_values=cache, use_cache=True
        )
        return out.past_key_values, out.logits[0, -1].float()

    def _begin(self, seq: Sequence) -> None:
        torch = self.torch
        if seq.cancelled:
            seq.emit(("cancelled",))
            return
        if seq.params.seed is not None:
            seq.generator = torch.Generator().manual_seed(int(seq.params.seed))
        if seq.kv is not None:
            # Continue from the prefill engine's cache: no prompt token is recomputed here.
            seq.cache = build_cache(seq.kv.layers, self.model.config)
            seq.next_logits = seq.kv.last_logits.float()
            self.m_kv_fetched_tokens.inc(len(seq.prompt_ids), model_name=self.name)
            seq.kv = None
        else:
            seq.cache, seq.next_logits = self._forward(seq.prompt_ids, None)
            self.m_prefill_computed.inc(len(seq.prompt_ids), model_name=self.name)
        self.m_prompt.inc(len(seq.prompt_ids), model_name=self.name)
        if seq.remote_decode:
            # The prompt's cache is final (this sequence ends after one token), so no copy is needed.
            entry = KVEntry(list(seq.prompt_ids), cache_layers(seq.cache), seq.next_logits, self.sig)
            tid = self.store.put(entry)
            seq.emit(("kv", self.kv_params(tid, seq.rid)))
        self.active.append(seq)
        self._sample_and_emit(seq)

    def kv_params(self, tid: str, rid: str) -> dict:
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": [tid],
            "remote_host": self.advertise_host,
            "remote_port": self.port,
            "remote_request_id": rid,
            "tp_size": 1,
        }

    def _step(self, seq: Sequence) -> None:
        seq.cache, seq.next_logits = self._forward([seq.generated[-1]], seq.cache)
        self._sample_and_emit(seq)

    def _sample(self, seq: Sequence) -> int:
        torch = self.torch
        logits = seq.next_logits
        p = seq.params
        if p.min_tokens and len(seq.generated) < p.min_tokens and not p.ignore_eos:
            logits = logits.clone()
            for t in self.eos_ids | set(p.stop_token_ids):
                if 0 <= t < logits.shape[-1]:
                    logits[t] = float("-inf")
        if p.temperature <= 0:
            return int(torch.argmax(logits).item())
        logits = logits / p.temperature
        if p.top_k and p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cum = torch.cumsum(sp, dim=-1)
            drop = cum - sp > p.top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, si, sp)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=seq.generator).item())

    def _sample_and_emit(self, seq: Sequence) -> None:
        now = time.monotonic()
        tok = self._sample(seq)
        seq.generated.append(tok)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.m_ttft.observe(now - seq.arrival, model_name=self.name)
        else:
            self.m_itl.observe(now - seq.last_token_time, model_name=self.name)
        seq.last_token_time = now
        p = seq.params
        finish = None
        if tok in self.eos_ids and not p.ignore_eos or tok in p.stop_token_ids:
            finish = "stop"
            visible = seq.generated[:-1]
        else:
            visible = seq.generated
        text = self.tokenizer.decode(visible, skip_special_tokens=True)
        if p.stop:
            hits = [text.find(s, max(0, seq.sent - len(s))) for s in p.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                text = text[: min(hits)]
                finish = "stop"
        seq.text = text
        if finish is None and (
            len(seq.generated) >= p.max_tokens
            or len(seq.prompt_ids) + len(seq.generated) >= self.max_model_len
        ):
            finish = "length"
        if finish is None and seq.remote_decode:
            finish = "length"
        # Hold back an incomplete UTF-8 character and a possible stop-string prefix until they resolve.
        upto = len(text)
        if finish is None:
            if text.endswith("\ufffd"):
                upto = len(text.rstrip("\ufffd"))
            if p.stop:
                upto = max(seq.sent, min(upto, len(text) - (max(len(s) for s in p.stop) - 1)))
        if upto > seq.sent:
            seq.emit(("text", text[seq.sent : upto]))
            seq.sent = upto
        if finish is not None:
            self._finish(seq, finish)

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        if seq in self.active:
            self.active.remove(seq)
        seq.cache = None
        if reason is None:
            seq.emit(("cancelled",))
            return
        self.m_gen.inc(len(seq.generated), model_name=self.name)
        self.m_success.inc(finished_reason=reason, model_name=self.name)
        self.m_e2e.observe(time.monotonic() - seq.arrival, model_name=self.name)
        completion = len(seq.generated)
        seq.emit(
            (
                "done",
                reason,
                {
                    "prompt_tokens": len(seq.prompt_ids),
                    "completion_tokens": completion,
                    "total_tokens": len(seq.prompt_ids) + completion,
                },
            )
        )

    # ------------------------------------------------------------------------------------------ requests
    def prompt_ids(self, api: str, body: dict) -> list[int]:
        tok = self.tokenizer
        if api == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise BadRequest("'messages' must be a non-empty list")
            norm = []
            for msg in msgs:
                if not isinstance(msg, dict) or "role" not in msg:
                    raise BadRequest("each message needs a 'role'")
                c = msg.get("content")
                if isinstance(c, list):
                    c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
                norm.append({"role": msg["role"], "content": c or ""})
            text = tok.apply_chat_template(norm, add_generation_prompt=True, tokenize=False)
            return tok.encode(text, add_special_tokens=False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            return list(prompt)
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")

    def sampling_params(self, api: str, body: dict, n_prompt: int) -> SamplingParams:
        if int(body.get("n", 1) or 1) != 1:
            raise BadRequest("only n=1 is supported")
        room = self.max_model_len - n_prompt
        if room <= 0:
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {n_prompt}."
            )
        mt = body.get("max_completion_tokens") if api == "chat" else None
        if mt is None:
            mt = body.get("max_tokens")
        if mt is None:
            mt = 16 if api == "completions" else min(room, 256)
        mt = int(mt)
        if mt < 1:
            raise BadRequest("max_tokens must be >= 1")
        if mt > room:
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"{n_prompt} prompt + {mt} completion tokens do not fit."
            )
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        temp = body.get("temperature")
        return SamplingParams(
            max_tokens=mt,
            temperature=1.0 if temp is None else float(temp),
            top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
            top_k=int(body.get("top_k") or 0),
            seed=body.get("seed"),
            stop=[s for s in stop if s],
            stop_token_ids=[int(t) for t in body.get("stop_token_ids") or []],
            ignore_eos=bool(body.get("ignore_eos", False)),
            min_tokens=int(body.get("min_tokens") or 0),
        )

    async def fetch_kv(self, client: httpx.AsyncClient, params: dict) -> KVEntry:
        host, port = params.get("remote_host"), params.get("remote_port")
        blocks = params.get("remote_block_ids") or []
        if not host or not port or not blocks:
            raise KVTransferError("kv_transfer_params lack remote_host/remote_port/remote_block_ids")
        tid = blocks[0] if isinstance(blocks[0], str) else str(blocks[0])
        h = f"[{host}]" if ":" in str(host) else host
        url = f"http://{h}:{int(port)}/kv/{tid}"
        try:
            headers = {KV_TOKEN_HEADER: self.kv_token} if self.kv_token else None
            r = await client.get(url, headers=headers, timeout=httpx.Timeout(self.kv_fetch_timeout, connect=2.0))
        except httpx.HTTPError as e:
            raise KVTransferError(f"KV fetch from {url} failed: {e!r}") from e
        if r.status_code != 200:
            raise KVTransferError(f"KV fetch from {url} answered {r.status_code}")
        entry = await asyncio.to_thread(deserialize, r.content)
        return entry


# ---------------------------------------------------------------------------------------------- HTTP app


def _chunk(
    api: str, rid: str, created: int, model: str, delta: str | None, finish: str | None, first: bool = False
) -> dict:
    if api == "chat":
        d: dict = {}
        if first:
            d["role"] = "assistant"
        if delta is not None:
            d["content"] = delta
        choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}],
    }


def kv_token_refusal(request: Request, token: str | None) -> Response | None:
    """None when the request may use the engine's internal endpoints: no token configured, or the caller sent
    it (compared in constant time); else 401 (none sent) or 403 (a wrong one)."""
    if not token:
        return None
    sent = request.headers.get(KV_TOKEN_HEADER)
    if sent is None:
        return error_response(401, f"this endpoint needs the deployment's token ({KV_TOKEN_HEADER})",
                              "authentication_error")
    if not hmac.compare_digest(sent.encode(), token.encode()):
        return error_response(403, "wrong token for this deployment", "permission_error")
    return None


def _guarded(endpoint, token: str | None):
    async def guarded(request: Request) -> Response:
        refusal = kv_token_refusal(request, token)
        return refusal if refusal is not None else await endpoint(request)

    return guarded


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (call once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: Engine, request_timeout: float = 600.0) -> Starlette:
    state: dict[str, Any] = {}

    async def generate(request: Request, api: str) -> Response:
        if engine.draining:
            return error_response(503, "engine is draining for shutdown", "service_unavailable")
        if engine.max_waiting and engine.queue.qsize() >= engine.max_waiting:
            resp = error_response(429, f"{engine.queue.qsize()} requests are waiting; retry later",
                                  "rate_limit_exceeded")
            resp.headers["Retry-After"] = "1"
            return resp
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object")
            model = body.get("model")
            if model not in (None, engine.name):
                return error_response(404, f"The model `{model}` does not exist.", "NotFoundError")
            kvp = body.get("kv_transfer_params") or {}
            # kv_transfer_params make this engine keep a cache for, or fetch one from, a host they name:
            # only the router (or a pod of this deployment) may send them
            if kvp and (refusal := kv_token_refusal(request, engine.kv_token)) is not None:
                return refusal
            ids = engine.prompt_ids(api, body)
            remote_decode = bool(kvp.get("do_remote_decode"))
            if remote_decode:  # the prefill leg answers one token, whatever max_tokens says
                body = dict(body, max_tokens=1, max_completion_tokens=1)
            params = engine.sampling_params(api, body, len(ids))
        except (BadRequest, ValueError, TypeError) as e:
            return error_response(400, str(e))
        rid_header = request.headers.get("x-request-id") or uuid.uuid4().hex
        rid = ("chatcmpl-" if api == "chat" else "cmpl-") + rid_header
        kv_entry = None
        engine.open_requests += 1  # counted from here so a drain waits for KV fetches too
        if kvp.get("do_remote_prefill"):
            try:
                kv_entry = await engine.fetch_kv(state["client"], kvp)
                check_compatible(kv_entry, ids, engine.sig)
                engine.m_kv_fetched.inc(model_name=engine.name)
            except KVTransferError as e:
                kv_entry = None
                reason = "incompatible" if e.args and str(e).startswith("KV cache") else "fetch"
                engine.m_kv_failed.inc(model_name=engine.name, reason=reason)
                if engine.policy == "fail":
                    log.warning("request %s: %s (policy fail)", rid, e)
                    engine.open_requests -= 1
                    return error_response(502, f"KV cache transfer failed: {e}", "kv_transfer_error")
                log.warning("request %s: %s; recomputing the prefill locally", rid, e)
            except BaseException:
                engine.open_requests -= 1
                raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev) -> None:  # called on the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        seq = Sequence(
            rid=rid, prompt_ids=ids, params=params, remote_decode=remote_decode, kv=kv_entry, emit=emit
        )
        engine.submit(seq)
        created = int(time.time())
        stream = bool(body.get("stream")) and not remote_decode
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        deadline = time.monotonic() + request_timeout

        async def next_event():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            return await asyncio.wait_for(events.get(), timeout=left)

        if not stream:
            # a client that goes away (or a router that gave up) frees its slot at once, not after the
            # whole generation; a stream learns of it when its next chunk cannot be sent
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                parts: list[str] = []
                kv_out = None
                while True:
                    waiting = asyncio.ensure_future(next_event())
                    await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done():
                        waiting.cancel()
                        seq.cancelled = True
                        return Response(status_code=499)
                    ev = waiting.result()
                    if ev[0] == "text":
                        parts.append(ev[1])
                    elif ev[0] == "kv":
                        kv_out = ev[1]
                    elif ev[0] == "error":
                        return error_response(500, ev[1], "server_error")
                    elif ev[0] == "done":
                        finish, usage = ev[1], ev[2]
                        break
                    elif ev[0] == "cancelled":
                        return error_response(499, "cancelled", "cancelled")
            except TimeoutError:
                seq.cancelled = True
                return error_response(504, "request timed out", "timeout")
            finally:
                gone.cancel()
                engine.open_requests -= 1
            text = "".join(parts)
            if api == "chat":
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
                obj = "chat.completion"
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
                obj = "text_completion"
            out = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": engine.name,
                "choices": [choice],
                "usage": usage,
            }
            if remote_decode or kv_out is not None:
                out["kv_transfer_params"] = kv_out
            return JSONResponse(out)

        async def sse():
            first = True
            try:
                while True:
                    try:
                        ev = await next_event()
                    except TimeoutError:
                        seq.cancelled = True
                        yield _sse(error_body("request timed out", "timeout", 504))
                        break
                    if ev[0] == "text":
                        yield _sse(_chunk(api, rid, created, engine.name, ev[1], None, first))
                        first = False
                    elif ev[0] == "error":
                        yield _sse(error_body(ev[1], "server_error", 500))
                        break
                    elif ev[0] == "done":
                        yield _sse(
                            _chunk(api, rid, created, engine.name, "" if first else None, ev[1], first)
                        )
                        if include_usage:
                            yield _sse(
                                {
                                    "id": rid,
                                    "object": "chat.completion.chunk" if api == "chat" else "text_completion",
                                    "created": created,
                                    "model": engine.name,
                                    "choices": [],
                                    "usage": ev[2],
                                }
                            )
                        break
                    elif ev[0] == "cancelled":
                        break
                yield b"data: [DONE]\n\n"
            finally:
                seq.cancelled = True  # no-op when finished; frees the slot when the client went away
                engine.open_requests -= 1

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"X-Request-Id": rid_header})

    async def completions(request: Request) -> Response:
        return await generate(request, "completions")

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def models(request: Request) -> Response:
        if engine.draining:
            return error_response(503, "engine is draining for shutdown", "service_unavailable")
        if engine.max_waiting and engine.queue.qsize() >= engine.max_waiting:
            resp = error_response(429, f"{engine.queue.qsize()} requests are waiting; retry later",
                                  "rate_limit_exceeded")
            resp.headers["Retry-After"] = "1"
            return resp
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": engine.name,
                        "object": "model",
                        "created": engine.created,
                        "owned_by": "kubeforge",
                        "root": engine.model_dir,
                        "parent": None,
                        "max_model_len": engine.max_model_len,
                        **({"provenance": engine.provenance} if engine.provenance is not None else {}),
                    }
                ],
            }
        )

    async def health(request: Request) -> Response:
        return Response(status_code=200 if engine._worker.is_alive() else 503)

    async def metrics(request: Request) -> Response:
        return Response(engine.registry.render(), media_type=m.CONTENT_TYPE)

    async def kv_get(request: Request) -> Response:
        entry = engine.store.pop(request.path_params["tid"])
        if entry is None:
            return error_response(404, "no such KV transfer (expired or already fetched)", "NotFoundError")
        data = await asyncio.to_thread(serialize, entry)
        engine.m_kv_served.inc(model_name=engine.name)
        engine.m_kv_bytes.inc(len(data), model_name=engine.name)
        return Response(data, media_type="application/octet-stream")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["client"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=256))
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            await state["client"].aclose()

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/kv/{tid}", _guarded(kv_get, engine.kv_token), methods=["GET"]),
            *(Route(r.path, _guarded(r.endpoint, engine.kv_token), methods=r.methods)
              for r in _rl_weight_routes(engine)),
        ],
        lifespan=lifespan,
    )


def _rl_weight_routes(engine: Engine) -> list:
    """RLJob's weight sync and version-stamped log-probabilities (kubeforge.runtime.rl.weightsync)."""
    from kubeforge.runtime.rl.weightsync import engine_weight_routes

    return engine_weight_routes(engine)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# ------------------------------------------------------------------------------------------------- main


def default_advertise_host(bind: str) -> str:
    from kubeforge.contract import ENV_POD_IP

    ip = os.environ.get(ENV_POD_IP) or os.environ.get("POD_IP")
    if ip:
        return ip
    if bind not in ("0.0.0.0", "::", ""):
        return bind
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kubeforge.runtime.serve.engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory (default: the model's)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--role", choices=["both", "prefill", "decode"], default="both")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--engine-id", default=None)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests beyond this are answered 429 (0: no bound)")
    p.add_argument("--kv-load-failure-policy", choices=["fail", "recompute"], default="fail")
    p.add_argument("--kv-ttl", type=float, default=60.0, help="seconds an unfetched KV cache is kept")
    p.add_argument("--kv-max-entries", type=int, default=256)
    p.add_argument("--kv-max-bytes", type=int, default=2 << 30)
    p.add_argument("--kv-fetch-timeout", type=float, default=30.0)
    p.add_argument(
        "--advertise-host",
        default=None,
        help="host decode engines use to fetch KV from here (default: $KUBEFORGE_POD_IP)",
    )
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from .server import serve

    a = parse_args(argv)
    from .router import fast_fail_missing_sniffio

    fast_fail_missing_sniffio()
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    engine = Engine(
        a.model,
        a.served_model_name or a.model,
        role=a.role,
        max_model_len=a.max_model_len,
        engine_id=a.engine_id,
        max_num_seqs=a.max_num_seqs,
        kv_store=KVStore(a.kv_max_entries, a.kv_max_bytes, a.kv_ttl),
        kv_load_failure_policy=a.kv_load_failure_policy,
        advertise_host=a.advertise_host or default_advertise_host(a.host),
        port=a.port,
        kv_fetch_timeout=a.kv_fetch_timeout,
        dtype=a.dtype,
        tokenizer_dir=a.tokenizer,
        max_waiting=a.max_waiting,
        kv_token=os.environ.get(ENV_KV_TOKEN),
    )
    if not engine.kv_token:
        log.warning("%s is not set: /kv/* and /kubeforge/v1/* answer anyone who reaches this port", ENV_KV_TOKEN)
    app = build_app(engine, a.request_timeout)
    e = engine

    def begin_drain() -> None:
        e.draining = True
        log.info("draining: %d open requests, %d KV caches to hand off", e.open_requests, len(e.store))

    def is_drained() -> bool:
        e.store.sweep()
        return e.open_requests == 0 and not e.active and e.queue.empty() and len(e.store) == 0

    log.info("engine %s (%s) serving %s on %s:%d", e.engine_id, a.role, e.name, a.host, a.port)
    serve(app, a.host, a.port, begin_drain, is_drained, a.drain_timeout)


if __name__ == "__main__":
    main()
