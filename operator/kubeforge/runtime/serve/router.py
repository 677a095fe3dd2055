"""The prefill/decode router: an OpenAI-compatible front for a prefill pool and a decode pool.

Per request (vLLM's disaggregated flow, so it works with vLLM + NixlConnector and with the reference engine):
  1. pick a prefill pod (least outstanding requests) and send the body with stream=false, max_tokens=1
     (max_completion_tokens=1), without min_tokens/stream_options, plus kv_transfer_params
     {do_remote_decode: true, ...}; on a connect error, a timeout or a 5xx try another prefill pod;
  2. pick a decode pod and send the client's original body with the kv_transfer_params the prefill pod
     returned; stream the answer back. The same X-Request-Id goes on both legs. kv_transfer_params a
     client sends are dropped: they name the host an engine fetches from (server-side request forgery).
     Both legs carry the deployment's token ($KUBEFORGE_KV_TOKEN, header X-Kubeforge-Kv-Token), without which
     engines refuse kv_transfer_params; a client's own headers other than Authorization are not forwarded.
Prompts shorter than --prefill-threshold-tokens skip the prefill hop (the decode pod prefills locally), and
so do requests for which no prefill pod could answer (counted; --no-prefill-fallback turns that into a 503).
With only one pool the router is a plain load-aware proxy (aggregated mode).
Every upstream call has bounded connect and read timeouts (a stream: between chunks, and as a whole only with
--stream-timeout); a decode pod that dies mid-stream ends the client's SSE stream with an error event and
`data: [DONE]`, never a hang. A client that disconnects cancels its upstream calls (the engine sees the
connection close and stops generating). At most --max-in-flight client requests run at once; more get 429.

`/metrics` reports per pool (label pool): endpoints, in-flight requests, engine queue depth (scraped from the
engines' vllm:num_requests_waiting), requests, errors, retries, TTFT and inter-token latency histograms and
their recent means: the signals autoscale.py reads to size each pool on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubeforge.contract import ENV_KV_TOKEN, KV_TOKEN_HEADER

from . import metrics as m
from .discovery import Discovery, FileDiscovery, KubernetesDiscovery, StaticDiscovery

log = logging.getLogger("kubeforge.serve.router")

PREFILL, DECODE = "prefill", "decode"


def fast_fail_missing_sniffio() -> None:
    """httpcore tries `import sniffio` on every request; without the package each try scans sys.path
    (about a sixth of the router's CPU under load). A None entry in sys.modules makes that import fail at
    once. Only done when sniffio is really absent; everything here runs on asyncio."""
    import importlib.util
    import sys

    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def error_body(message: str, type_: str = "server_error", code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def error_response(status: int, message: str, type_: str = "server_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, status), status_code=status)


# ------------------------------------------------------------------------------------------- pools


@dataclass
class Endpoint:
    url: str
    outstanding: int = 0
    down_until: float = 0.0  # skipped by picking until then, after a connect error
    waiting: float = 0.0  # last scraped vllm:num_requests_waiting
    running: float = 0.0


class Pool:
    """The endpoints of one pool and least-outstanding-requests picking among them."""

    def __init__(self, name: str, picking: str = "least-outstanding", down_s: float = 5.0):
        self.name = name
        self.picking = picking
        self.down_s = down_s
        self.endpoints: dict[str, Endpoint] = {}
        self._rr = 0

    def sync(self, urls: list[str]) -> None:
        for u in urls:
            if u not in self.endpoints:
                self.endpoints[u] = Endpoint(u)
        for u in list(self.endpoints):
            if u not in urls:
                del self.endpoints[u]  # in-flight requests keep their Endpoint object

    def __len__(self) -> int:
        return len(self.endpoints)

    def pick(self, exclude: set[str] = frozenset()) -> Endpoint | None:  # type: ignore[assignment]
        eps = [e for e in self.endpoints.values() if e.url not in exclude]
        if not eps:
            return None
        now = time.monotonic()
        up = [e for e in eps if e.down_until <= now] or eps  # all marked down: try them anyway
        self._rr += 1
        if self.picking == "round-robin":
            return up[self._rr % len(up)]
        best = min(e.outstanding for e in up)
        ties = [e for e in up if e.outstanding == best]
        if len(ties) > 1:  # break ties by the engines' own queues, then rotate (no hotspot on the first)
            least_q = min(e.waiting for e in ties)
            ties = [e for e in ties if e.waiting == least_q]
        return ties[self._rr % len(ties)]

    def mark_down(self, ep: Endpoint) -> None:
        ep.down_until = time.monotonic() + self.down_s


class RecentMean:
    """Mean of observations over the last `window` seconds (gauges the autoscaler reads)."""

    def __init__(self, window: float = 60.0, maxlen: int = 20000):
        self.window = window
        self._obs: collections.deque[tuple[float, float]] = collections.deque(maxlen=maxlen)

    def add(self, v: float) -> None:
        self._obs.append((time.monotonic(), v))

    def value(self) -> float:
        cutoff = time.monotonic() - self.window
        while self._obs and self._obs[0][0] < cutoff:
            self._obs.popleft()
        if not self._obs:
            return math.nan
        return sum(v for _, v in self._obs) / len(self._obs)


# ------------------------------------------------------------------------------------------- router


@dataclass
class RouterConfig:
    prefill_threshold_tokens: int = 0
    picking: str = "least-outstanding"
    connect_timeout: float = 2.0
    prefill_timeout: float = 60.0  # whole prefill leg
    read_timeout: float = 60.0  # between two chunks of a decode stream
    request_timeout: float = 600.0  # a whole non-streaming decode leg
    stream_timeout: float = 0.0  # a whole stream; 0: unbounded (read_timeout still ends a stalled one)
    max_in_flight: int = 1024  # client requests at once (streams until their end); beyond: 429
    prefill_attempts: int = 3  # distinct prefill pods tried per request
    decode_attempts: int = 2  # distinct decode pods tried while none has accepted the request
    prefill_fallback: bool = True  # no prefill pod answered -> decode pod prefills locally
    tokenizer: str | None = None
    scrape_interval: float = 2.0
    recent_window: float = 60.0
    down_s: float = 5.0
    kv_token: str | None = None  # the deployment's token, sent to engines on both legs
    extra: dict = field(default_factory=dict)


class Router:
    def __init__(self, discovery: Discovery, config: RouterConfig | None = None):
        self.discovery = discovery
        self.cfg = config or RouterConfig()
        self.pools = {p: Pool(p, self.cfg.picking, self.cfg.down_s) for p in (PREFILL, DECODE)}
        self.client: httpx.AsyncClient | None = None
        self._tokenizer = None
        self._scrape_task: asyncio.Task | None = None
        self.recent_ttft = {p: RecentMean(self.cfg.recent_window) for p in (PREFILL, DECODE)}
        self.recent_itl = {p: RecentMean(self.cfg.recent_window) for p in (PREFILL, DECODE)}
        self.in_flight = {PREFILL: 0, DECODE: 0}
        self.recent_prefill = RecentMean(self.cfg.recent_window)
        self.open_requests = 0  # client requests not yet answered (streams count via in_flight)
        self.active = 0  # client requests admitted and not finished, streams included (back-pressure)
        self.draining = False

        r = self.registry = m.Registry()
        r.gauge(
            m.R_ENDPOINTS,
            "Ready endpoints in the pool.",
            ["pool"],
            fn=lambda: {(("pool", p),): len(self.pools[p]) for p in self.pools},
        )
        r.gauge(
            m.R_IN_FLIGHT,
            "Requests the router has outstanding on the pool.",
            ["pool"],
            fn=lambda: {(("pool", p),): self.in_flight[p] for p in self.pools},
        )
        r.gauge(
            m.R_QUEUE_DEPTH,
            "Requests waiting in the pool's engines (last scrape).",
            ["pool"],
            fn=lambda: {
                (("pool", p),): sum(e.waiting for e in self.pools[p].endpoints.values()) for p in self.pools
            },
        )
        r.gauge(
            m.R_ENGINE_RUNNING,
            "Requests running in the pool's engines (last scrape).",
            ["pool"],
            fn=lambda: {
                (("pool", p),): sum(e.running for e in self.pools[p].endpoints.values()) for p in self.pools
            },
        )
        self.m_requests = r.counter(
            m.R_REQUESTS, "Upstream requests by pool and HTTP status.", ["pool", "code"]
        )
        self.m_errors = r.counter(m.R_ERRORS, "Upstream failures by pool and reason.", ["pool", "reason"])
        self.m_retries = r.counter(m.R_RETRIES, "Requests retried on another pod of the pool.", ["pool"])
        self.m_skipped = r.counter(m.R_PREFILL_SKIPPED, "Requests sent straight to decode.", ["reason"])
        self.m_ttft = r.histogram(
            m.R_TTFT, "Time to first token at the router (streams).", ["pool"], m.TTFT_BUCKETS
        )
        self.m_itl = r.histogram(
            m.R_ITL, "Inter-token latency at the router (streams).", ["pool"], m.ITL_BUCKETS
        )
        r.gauge(
            m.R_TTFT_RECENT,
            "Mean TTFT over the recent window (NaN = no data).",
            ["pool"],
            fn=lambda: {(("pool", p),): self.recent_ttft[p].value() for p in self.pools},
        )
        r.gauge(
            m.R_ITL_RECENT,
            "Mean inter-token latency over the recent window (NaN = no data).",
            ["pool"],
            fn=lambda: {(("pool", p),): self.recent_itl[p].value() for p in self.pools},
        )
        self.m_prefill_leg = r.histogram(
            m.R_PREFILL_LEG, "Duration of the prefill leg, retries included.", ["pool"], m.TTFT_BUCKETS
        )
        r.gauge(
            m.R_PREFILL_RECENT,
            "Mean prefill-leg duration over the recent window (NaN = no data).",
            ["pool"],
            fn=lambda: {(("pool", PREFILL),): self.recent_prefill.value()},
        )
        self.m_client_requests = r.counter(
            "kubeforge:router_client_requests_total",
            "Client requests by route and status.",
            ["route", "code"],
        )

    # ---- lifecycle
    async def startup(self) -> None:
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=2000, max_keepalive_connections=500),
            timeout=httpx.Timeout(self.cfg.request_timeout, connect=self.cfg.connect_timeout),
        )
        self.discovery.start()
        self.sync()
        if self.cfg.scrape_interval > 0:
            self._scrape_task = asyncio.create_task(self._scrape_loop())

    async def shutdown(self) -> None:
        if self._scrape_task:
            self._scrape_task.cancel()
            with contextlib.suppress(BaseException):
                await self._scrape_task
        self.discovery.stop()
        if self.client:
            await self.client.aclose()

    def sync(self) -> None:
        snap = self.discovery.snapshot()
        for name, pool in self.pools.items():
            pool.sync(snap.get(name, []))

    async def _scrape_one(self, ep: Endpoint) -> None:
        try:
            r = await self.client.get(ep.url + "/metrics", timeout=httpx.Timeout(1.0, connect=0.5))
            s = m.parse_text(r.text)
            ep.waiting = m.sum_samples(s, m.VLLM_WAITING)
            ep.running = m.sum_samples(s, m.VLLM_RUNNING)
        except (httpx.HTTPError, ValueError):
            pass

    async def _scrape_loop(self) -> None:
        while True:
            self.sync()
            eps = [e for p in self.pools.values() for e in p.endpoints.values()]
            if eps:
                await asyncio.gather(*(self._scrape_one(e) for e in eps))
            await asyncio.sleep(self.cfg.scrape_interval)

    # ---- decisions
    def serving_pools(self) -> tuple[str | None, str | None]:
        """(prefill pool or None, the pool that produces the answer)."""
        has_p, has_d = len(self.pools[PREFILL]) > 0, len(self.pools[DECODE]) > 0
        if has_p and has_d:
            return PREFILL, DECODE
        if has_d:
            return None, DECODE
        if has_p:
            return None, PREFILL  # aggregated with a single pool named prefill
        return None, None

    def estimate_tokens(self, api: str, body: dict) -> int:
        if self.cfg.tokenizer:
            try:
                return self._count_with_tokenizer(api, body)
            except Exception as e:  # noqa: BLE001 - a rough count is good enough
                log.debug("tokenizer count failed: %s", e)
        if api == "/chat/completions":
            chars = 0
            for msg in body.get("messages") or []:
                c = msg.get("content") if isinstance(msg, dict) else None
                if isinstance(c, str):
                    chars += len(c)
                elif isinstance(c, list):
                    chars += sum(len(p.get("text", "")) for p in c if isinstance(p, dict))
            return chars // 4
        p = body.get("prompt", "")
        if isinstance(p, str):
            return len(p) // 4
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return len(p)
        if isinstance(p, list):
            return sum(len(x) // 4 if isinstance(x, str) else len(x) for x in p)
        return 0

    def _count_with_tokenizer(self, api: str, body: dict) -> int:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.cfg.tokenizer)
        tok = self._tokenizer
        if api == "/chat/completions":  # the engine's own way: render the template, then encode
            text = tok.apply_chat_template(
                body.get("messages") or [], add_generation_prompt=True, tokenize=False
            )
            return len(tok.encode(text, add_special_tokens=False))
        p = body.get("prompt", "")
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return len(p)
        return len(tok.encode(p if isinstance(p, str) else "".join(map(str, p))))

    # ---- legs
    def _headers(self, request: Request, rid: str) -> dict[str, str]:
        h = {"X-Request-Id": rid}
        auth = request.headers.get("authorization")
        if auth:
            h["Authorization"] = auth
        if self.cfg.kv_token:
            h[KV_TOKEN_HEADER] = self.cfg.kv_token
        return h

    async def prefill_leg(self, api: str, body: dict, headers: dict) -> tuple[dict | None, Response | None]:
        """(kv_transfer_params, None) on success; (None, None) to prefill on decode; (None, resp) to answer."""
        pool = self.pools[PREFILL]
        req = dict(body)
        req["stream"] = False
        req["max_tokens"] = 1
        if "max_completion_tokens" in req:
            req["max_completion_tokens"] = 1
        for k in ("stream_options", "min_tokens", "min_completion_tokens"):
            req.pop(k, None)
        req["kv_transfer_params"] = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
        timeout = httpx.Timeout(self.cfg.prefill_timeout, connect=self.cfg.connect_timeout)
        tried: set[str] = set()
        t_leg = time.monotonic()
        for attempt in range(self.cfg.prefill_attempts):
            ep = pool.pick(tried)
            if ep is None:
                break
            if attempt:
                self.m_retries.inc(pool=PREFILL)
            tried.add(ep.url)
            ep.outstanding += 1
            self.in_flight[PREFILL] += 1
            try:
                r = await self.client.post(ep.url + "/v1" + api, json=req, headers=headers, timeout=timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                pool.mark_down(ep)
                self.m_errors.inc(pool=PREFILL, reason="connect")
                log.warning("prefill %s unreachable (%s); trying another", ep.url, e)
                continue
            except httpx.TimeoutException:
                self.m_errors.inc(pool=PREFILL, reason="timeout")
                log.warning("prefill %s timed out; trying another", ep.url)
                continue
            except httpx.HTTPError as e:
                self.m_errors.inc(pool=PREFILL, reason="transport")
                log.warning("prefill %s failed (%s); trying another", ep.url, e)
                continue
            finally:
                ep.outstanding -= 1
                self.in_flight[PREFILL] -= 1
            self.m_requests.inc(pool=PREFILL, code=str(r.status_code))
            if r.status_code >= 500:
                self.m_errors.inc(pool=PREFILL, reason=f"http_{r.status_code}")
                log.warning("prefill %s answered %d; trying another", ep.url, r.status_code)
                continue
            if r.status_code >= 400:  # the request itself is wrong: tell the client, like the engine would
                return None, Response(
                    r.content,
                    status_code=r.status_code,
                    media_type=r.headers.get("content-type", "application/json"),
                )
            try:
                j = r.json()
                params = j.get("kv_transfer_params") if isinstance(j, dict) else None
            except ValueError:
                self.m_errors.inc(pool=PREFILL, reason="bad_response")
                continue
            took = time.monotonic() - t_leg
            self.m_prefill_leg.observe(took, pool=PREFILL)
            self.recent_prefill.add(took)
            return (params or None), None
        if self.cfg.prefill_fallback:
            self.m_skipped.inc(reason="prefill_unavailable")
            log.warning("no prefill pod answered (tried %d); decode pod prefills locally", len(tried))
            return None, None
        return None, error_response(503, "no prefill endpoint could serve the request", "service_unavailable")

    async def handle_generate(self, request: Request, api: str) -> Response:
        t0 = time.monotonic()
        try:
            body = await request.json()
        except ValueError as e:
            return error_response(400, f"invalid JSON body: {e}", "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object", "invalid_request_error")
        # kv_transfer_params name the host an engine pulls a KV cache from: only a prefill pod's answer may
        # set them, never a client (who could point the engine at any address: server-side request forgery)
        body.pop("kv_transfer_params", None)
        rid = request.headers.get("x-request-id") or f"kf-{uuid.uuid4().hex}"
        headers = self._headers(request, rid)
        self.sync()
        ppool, dpool = self.serving_pools()
        if dpool is None:
            return error_response(503, "no serving endpoints are ready", "service_unavailable")
        ttft_pool = dpool
        if ppool is not None:
            if self.estimate_tokens(api, body) < self.cfg.prefill_threshold_tokens:
                self.m_skipped.inc(reason="short_prompt")
            else:
                kv, resp = await self.prefill_leg(api, body, headers)
                if resp is not None:
                    return resp
                if kv is not None:
                    body = dict(body)
                    body["kv_transfer_params"] = kv
                    ttft_pool = PREFILL
        return await self.decode_leg(api, body, headers, dpool, ttft_pool, t0)

    async def decode_leg(
        self, api: str, body: dict, headers: dict, pname: str, ttft_pool: str, t0: float
    ) -> Response:
        pool = self.pools[pname]
        stream = bool(body.get("stream"))
        read_timeout = self.cfg.read_timeout if stream else self.cfg.request_timeout
        timeout = httpx.Timeout(read_timeout, connect=self.cfg.connect_timeout)
        tried: set[str] = set()
        last_err = "no decode endpoint available"
        kv_fallback = self.cfg.prefill_fallback and "kv_transfer_params" in body
        for attempt in range(self.cfg.decode_attempts + int(kv_fallback)):
            ep = pool.pick(tried)
            if ep is None:
                break
            if attempt:
                self.m_retries.inc(pool=pname)
            tried.add(ep.url)
            ep.outstanding += 1
            self.in_flight[pname] += 1
            handed_off = False
            try:
                req = self.client.build_request(
                    "POST", ep.url + "/v1" + api, json=body, headers=headers, timeout=timeout
                )
                try:
                    r = await self.client.send(req, stream=True)
                except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                    # Nothing reached the pod, so the KV cache is still waiting: another pod may take it.
                    pool.mark_down(ep)
                    self.m_errors.inc(pool=pname, reason="connect")
                    last_err = f"decode endpoint unreachable: {e}"
                    continue
                except httpx.TimeoutException:
                    self.m_errors.inc(pool=pname, reason="timeout")
                    return error_response(504, "decode endpoint timed out", "timeout")
                except httpx.HTTPError as e:
                    self.m_errors.inc(pool=pname, reason="transport")
                    return error_response(502, f"decode endpoint failed: {e}", "upstream_error")
                if r.status_code == 503 and attempt + 1 < self.cfg.decode_attempts:
                    await r.aclose()  # draining pod refused it before doing anything: try another
                    self.m_requests.inc(pool=pname, code="503")
                    self.m_errors.inc(pool=pname, reason="http_503")
                    last_err = "decode endpoint unavailable"
                    continue
                if r.status_code == 502 and kv_fallback:
                    # The decode pod could not load the KV cache (the prefill pod died or expired it after
                    # answering): run the request again without it, so a decode pod prefills locally.
                    content = await self._read_small(r)
                    if b"kv_transfer_error" in content:
                        self.m_requests.inc(pool=pname, code="502")
                        self.m_errors.inc(pool=pname, reason="kv_transfer")
                        self.m_skipped.inc(reason="kv_transfer_failed")
                        body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
                        kv_fallback = False
                        tried.discard(ep.url)
                        continue
                    return Response(content, status_code=502, media_type="application/json")
                if r.status_code != 200 or not stream:
                    return await self._finish_plain(r, pname)
                handed_off = True
                return StreamingResponse(
                    self._relay(r, ep, pname, ttft_pool, t0),
                    status_code=200,
                    media_type="text/event-stream",
                    headers={"X-Request-Id": headers["X-Request-Id"]},
                )
            finally:
                if not handed_off:
                    ep.outstanding -= 1
                    self.in_flight[pname] -= 1
        return error_response(503, last_err, "service_unavailable")

    @staticmethod
    async def _read_small(r: httpx.Response) -> bytes:
        try:
            return await r.aread()
        except httpx.HTTPError:
            return b""
        finally:
            await r.aclose()

    async def _finish_plain(self, r: httpx.Response, pname: str) -> Response:
        try:
            content = await r.aread()
        except httpx.TimeoutException:
            self.m_errors.inc(pool=pname, reason="timeout")
            return error_response(504, "decode endpoint timed out", "timeout")
        except httpx.HTTPError as e:
            self.m_errors.inc(pool=pname, reason="transport")
            return error_response(502, f"decode endpoint failed mid-response: {e}", "upstream_error")
        finally:
            await r.aclose()
        self.m_requests.inc(pool=pname, code=str(r.status_code))
        if r.status_code >= 500:
            self.m_errors.inc(pool=pname, reason=f"http_{r.status_code}")
        return Response(
            content, status_code=r.status_code, media_type=r.headers.get("content-type", "application/json")
        )

    async def _relay(self, r: httpx.Response, ep: Endpoint, pname: str, ttft_pool: str, t0: float):
        buf = b""
        last: float | None = None
        ok = False
        done = False
        deadline = t0 + self.cfg.stream_timeout if self.cfg.stream_timeout > 0 else math.inf
        try:
            async for chunk in r.aiter_raw():
                now = time.monotonic()
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if event.startswith(b"data: [DONE]"):
                        done = True
                    elif event.startswith(b"data:"):
                        if last is None:
                            self.m_ttft.observe(now - t0, pool=ttft_pool)
                            self.recent_ttft[ttft_pool].add(now - t0)
                        else:
                            self.m_itl.observe(now - last, pool=pname)
                            self.recent_itl[pname].add(now - last)
                        last = now
                yield chunk
                if now > deadline:
                    raise httpx.ReadTimeout("request deadline exceeded")
            if not done:
                raise httpx.RemoteProtocolError("stream ended without [DONE]")
            ok = True
        except httpx.TimeoutException:
            self.m_errors.inc(pool=pname, reason="timeout")
            yield self._sse_error(504, "decode endpoint timed out mid-stream")
        except httpx.HTTPError as e:
            self.m_errors.inc(pool=pname, reason="stream_broken")
            log.warning("decode %s broke mid-stream: %s", ep.url, e)
            yield self._sse_error(502, f"decode endpoint failed mid-stream: {e}")
        finally:
            ep.outstanding -= 1
            self.in_flight[pname] -= 1
            self.m_requests.inc(pool=pname, code="200" if ok else "502")
            await r.aclose()

    async def counted(self, chunks):
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.active -= 1

    @staticmethod
    def _sse_error(code: int, message: str) -> bytes:
        return (
            b"data: "
            + json.dumps(error_body(message, "upstream_error", code)).encode()
            + b"\n\ndata: [DONE]\n\n"
        )

    async def models(self, request: Request) -> Response:
        self.sync()
        tried: set[str] = set()
        for pname in (DECODE, PREFILL):
            pool = self.pools[pname]
            for _ in range(len(pool)):
                ep = pool.pick(tried)
                if ep is None:
                    break
                tried.add(ep.url)
                try:
                    r = await self.client.get(
                        ep.url + "/v1/models", timeout=httpx.Timeout(5.0, connect=self.cfg.connect_timeout)
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    return Response(r.content, media_type="application/json")
        return error_response(503, "no serving endpoints are ready", "service_unavailable")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (call once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work) -> Response | None:
    """The response of `work`, or None when the client disconnected first; then `work` is cancelled, which
    closes its upstream connection, so the engine learns of it and stops generating."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        gone.cancel()
    return None if task.cancelled() else task.result()


def build_app(router: Router) -> Starlette:
    def generate_route(path: str):  # one endpoint per OpenAI route, same flow
        async def endpoint(request: Request) -> Response:
            route = f"/v1{path}"
            if router.cfg.max_in_flight and router.active >= router.cfg.max_in_flight:
                router.m_client_requests.inc(route=route, code="429")
                resp = error_response(429, f"the router has {router.active} requests in flight; retry later",
                                      "rate_limit_exceeded")
                resp.headers["Retry-After"] = "1"
                return resp
            router.active += 1
            router.open_requests += 1
            streaming = False
            try:
                await request.body()  # read before watching for a disconnect: both receive()
                resp = await _unless_disconnected(request, router.handle_generate(request, path))
                if resp is None:
                    router.m_client_requests.inc(route=route, code="499")
                    return Response(status_code=499)
                if isinstance(resp, StreamingResponse):  # counted until the stream ends
                    resp.body_iterator = router.counted(resp.body_iterator)
                    streaming = True
            finally:
                router.open_requests -= 1
                if not streaming:
                    router.active -= 1
            router.m_client_requests.inc(route=route, code=str(resp.status_code))
            return resp

        return endpoint

    completions = generate_route("/completions")
    chat = generate_route("/chat/completions")

    async def health(request: Request) -> Response:
        router.sync()
        return JSONResponse({"status": "ok", "endpoints": {p: len(v) for p, v in router.pools.items()}})

    async def ready(request: Request) -> Response:
        router.sync()
        _, serving = router.serving_pools()
        ok = serving is not None and not router.draining
        return JSONResponse({"ready": ok, "draining": router.draining}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        router.sync()
        return Response(router.registry.render(), media_type=m.CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await router.startup()
        try:
            yield
        finally:
            await router.shutdown()

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", router.models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kubeforge.runtime.serve.router",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", action="append", default=[], metavar="URL", help="prefill endpoint (repeat)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="decode endpoint (repeat)")
    p.add_argument("--discovery-file", help='JSON {"prefill": [urls], "decode": [urls]}, re-read on change')
    p.add_argument("--k8s-namespace", help="watch Pods in this namespace (default: the router's own)")
    p.add_argument("--k8s-prefill-selector", help="label selector of the prefill pool's Pods")
    p.add_argument("--k8s-decode-selector", help="label selector of the decode pool's Pods")
    p.add_argument("--k8s-port", type=int, default=8000, help="engine port on the Pods")
    p.add_argument(
        "--prefill-threshold-tokens",
        type=int,
        default=0,
        help="prompts shorter than this skip the prefill hop",
    )
    p.add_argument("--tokenizer", help="HF tokenizer dir for the threshold count (default: chars/4)")
    p.add_argument("--picking", choices=["least-outstanding", "round-robin"], default="least-outstanding")
    p.add_argument("--connect-timeout", type=float, default=2.0)
    p.add_argument("--prefill-timeout", type=float, default=60.0)
    p.add_argument("--read-timeout", type=float, default=60.0, help="max seconds between stream chunks")
    p.add_argument("--request-timeout", type=float, default=600.0, help="max seconds of a non-streaming answer")
    p.add_argument("--stream-timeout", type=float, default=0.0,
                   help="max seconds of a whole stream (0: no bound; --read-timeout ends a stalled one)")
    p.add_argument("--max-in-flight", type=int, default=1024,
                   help="client requests at once, streams included; more are answered 429 (0: no bound)")
    p.add_argument("--prefill-attempts", type=int, default=3)
    p.add_argument("--decode-attempts", type=int, default=2)
    p.add_argument(
        "--no-prefill-fallback",
        action="store_true",
        help="answer 503 instead of prefilling on decode when no prefill pod answers",
    )
    p.add_argument("--scrape-interval", type=float, default=2.0, help="engine /metrics scrape period (0=off)")
    p.add_argument("--recent-window", type=float, default=60.0)
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="SIGTERM: max seconds to finish requests"
    )
    p.add_argument(
        "--min-drain-seconds",
        type=float,
        default=5.0,
        help="SIGTERM: keep serving at least this long, while endpoints stop routing here",
    )
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def make_discovery(a: argparse.Namespace) -> Discovery:
    if a.k8s_prefill_selector or a.k8s_decode_selector:
        ns = a.k8s_namespace
        if not ns:
            try:
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    ns = f.read().strip()
            except OSError:
                ns = "default"
        return KubernetesDiscovery(
            ns, {PREFILL: a.k8s_prefill_selector or "", DECODE: a.k8s_decode_selector or ""}, a.k8s_port
        )
    if a.discovery_file:
        return FileDiscovery(a.discovery_file)
    return StaticDiscovery({PREFILL: a.prefill, DECODE: a.decode})


def main(argv=None) -> None:
    from .server import serve

    a = parse_args(argv)
    fast_fail_missing_sniffio()
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = RouterConfig(
        prefill_threshold_tokens=a.prefill_threshold_tokens,
        picking=a.picking,
        connect_timeout=a.connect_timeout,
        prefill_timeout=a.prefill_timeout,
        read_timeout=a.read_timeout,
        request_timeout=a.request_timeout,
        stream_timeout=a.stream_timeout,
        max_in_flight=a.max_in_flight,
        prefill_attempts=a.prefill_attempts,
        decode_attempts=a.decode_attempts,
        prefill_fallback=not a.no_prefill_fallback,
        tokenizer=a.tokenizer,
        scrape_interval=a.scrape_interval,
        recent_window=a.recent_window,
        kv_token=os.environ.get(ENV_KV_TOKEN) or None,
    )
    router = Router(make_discovery(a), cfg)
    app = build_app(router)

    def begin_drain() -> None:
        router.draining = True  # /ready answers 503; requests still arriving are served
        log.info("draining: %d open requests", router.open_requests)

    def is_drained() -> bool:
        return router.open_requests == 0 and not any(router.in_flight.values())

    serve(app, a.host, a.port, begin_drain, is_drained, a.drain_timeout, a.min_drain_seconds)


if __name__ == "__main__":
    main()
