"""The prefill/decode router over real HTTP: reference engines and echo backends on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from kubeforge.runtime.serve import metrics as m
from kubeforge.runtime.serve.autoscale import parse_router_metrics
from kubeforge.runtime.serve.discovery import FileDiscovery, KubernetesDiscovery, StaticDiscovery, wait_for
from kubeforge.runtime.serve.echo import build_app as echo_app
from kubeforge.runtime.serve.router import Router, RouterConfig, build_app
from kubeforge.runtime.serve.testing import ThreadServer, engine_proc, free_port, metric, sse_events

NAME = "tiny"
PROMPT = "Disaggregated serving splits the prompt pass from token generation."
MESSAGES = [{"role": "user", "content": "Tell me about prefill and decode pools, briefly."}]


def router_server(pools=None, discovery=None, **cfg) -> ThreadServer:
    cfg.setdefault("scrape_interval", 0.2)
    r = Router(discovery or StaticDiscovery(pools or {}), RouterConfig(**cfg))
    srv = ThreadServer(build_app(r)).start()
    srv.router = r
    return srv


def poll(get, until, timeout: float = 30.0):
    """Call get() until until(value) holds (or the bound passes); returns the last value: tests wait for the
    state they need instead of sleeping and hoping."""
    deadline = time.monotonic() + timeout
    value = get()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(0.02)
        value = get()
    return value


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: a pod that is gone


# ------------------------------------------------------------------------------------ with real engines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kubeforge.runtime.tinymodel import save_tiny_model

    torch.set_num_threads(1)
    return str(save_tiny_model(tmp_path_factory.mktemp("serve-router") / "model", seed=5))


@pytest.fixture(scope="module", autouse=True)
def victim(model_dir, tmp_path_factory):
    """A decode engine in its own process, to be killed; started first so its start-up overlaps the tests."""
    log = tmp_path_factory.mktemp("victim") / "engine.log"
    proc = engine_proc(model_dir, role="decode", name=NAME, log_path=str(log))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def engines(model_dir):
    from kubeforge.runtime.serve.engine import Engine
    from kubeforge.runtime.serve.engine import build_app as engine_app

    servers = {}
    for role in ("both", "prefill", "decode"):
        srv = ThreadServer(None)
        eng = Engine(model_dir, NAME, role=role, advertise_host="127.0.0.1", port=srv.port)
        srv.server.config.app = engine_app(eng)
        srv.engine = eng
        servers[role] = srv.start()
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def routers(engines):
    pd = router_server({"prefill": [engines["prefill"].url], "decode": [engines["decode"].url]})
    agg = router_server({"decode": [engines["both"].url]})
    yield pd, agg
    pd.stop()
    agg.stop()


def _text(api: str, j: dict) -> str:
    c = j["choices"][0]
    return c["text"] if api == "/v1/completions" else c["message"]["content"]


def _stream_text(api: str, events: list) -> str:
    out = ""
    for e in events[:-1]:
        c = e["choices"][0]
        out += (c.get("text") or "") if api == "/v1/completions" else (c["delta"].get("content") or "")
    return out


@pytest.mark.parametrize(
    "api,extra", [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})]
)
def test_disaggregated_equals_aggregated_equals_generate(model_dir, engines, routers, api, extra):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pd, agg = routers
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if api == "/v1/completions":
        ids = tok.encode(PROMPT)
    else:
        ids = tok.encode(
            tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    want = tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    dec = engines["decode"].url
    computed0, fetched0 = metric(dec, m.PREFILL_TOKENS_COMPUTED), metric(dec, m.KV_FETCHED)
    body = {"model": NAME, "max_tokens": 16, "temperature": 0, **extra}
    got = {}
    for label, srv in (("pd", pd), ("agg", agg)):
        r = httpx.post(srv.url + api, json=body, headers={"X-Request-Id": f"t-{label}"}, timeout=30)
        assert r.status_code == 200, r.text
        got[label] = _text(api, r.json())
        assert r.json()["id"].endswith(f"t-{label}")  # the client's request id reached the engine
        with httpx.stream("POST", srv.url + api, json={**body, "stream": True}, timeout=30) as s:
            assert s.status_code == 200
            ev = sse_events(s)
        assert ev[-1] == "[DONE]"
        got[label + "-stream"] = _stream_text(api, ev)
    assert set(got.values()) == {want}, got
    # The decode engine continued from transferred caches: it recomputed no prompt token.
    assert metric(dec, m.KV_FETCHED) == fetched0 + 2
    assert metric(dec, m.PREFILL_TOKENS_COMPUTED) == computed0


def test_prefill_leg_retried_on_another_pod(engines):
    rt = router_server(
        {"prefill": [dead_url(), engines["prefill"].url], "decode": [engines["decode"].url]},
        prefill_fallback=False,
    )
    try:
        served0 = metric(engines["prefill"].url, m.KV_SERVED)
        for _ in range(3):
            r = httpx.post(
                rt.url + "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        assert metric(engines["prefill"].url, m.KV_SERVED) == served0 + 3
        assert metric(rt.url, m.R_ERRORS, pool="prefill", reason="connect") >= 1
        assert metric(rt.url, m.R_RETRIES, pool="prefill") >= 1
    finally:
        rt.stop()


def test_all_prefill_down_falls_back_or_503(engines):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    want = httpx.post(engines["both"].url + "/v1/completions", json=body, timeout=30).json()["choices"][0][
        "text"
    ]
    rt = router_server({"prefill": [dead_url()], "decode": [engines["decode"].url]})
    strict = router_server(
        {"prefill": [dead_url()], "decode": [engines["decode"].url]}, prefill_fallback=False
    )
    try:
        t0 = time.monotonic()
        r = httpx.post(rt.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert metric(rt.url, m.R_PREFILL_SKIPPED, reason="prefill_unavailable") == 1
        r = httpx.post(strict.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert time.monotonic() - t0 < 10
    finally:
        rt.stop()
        strict.stop()


def test_lost_kv_cache_falls_back_to_local_prefill(engines, routers):
    """The prefill pod answered but its cache is gone when decode fetches it: no error reaches the client."""
    pd, _ = routers
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    want = httpx.post(engines["both"].url + "/v1/completions", json=body, timeout=30).json()["choices"][0][
        "text"
    ]
    store = engines["prefill"].engine.store
    failed0 = metric(engines["decode"].url, m.KV_FETCH_FAILED)
    store.ttl = 0.0  # every cache expires before it can be fetched
    try:
        r = httpx.post(pd.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        with httpx.stream("POST", pd.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
            assert s.status_code == 200 and _stream_text("/v1/completions", sse_events(s)) == want
    finally:
        store.ttl = 60.0
    assert metric(engines["decode"].url, m.KV_FETCH_FAILED) == failed0 + 2
    assert metric(pd.url, m.R_PREFILL_SKIPPED, reason="kv_transfer_failed") == 2


def test_short_prompt_skips_prefill(engines):
    rt = router_server(
        {"prefill": [engines["prefill"].url], "decode": [engines["decode"].url]}, prefill_threshold_tokens=10
    )
    try:
        served0 = metric(engines["prefill"].url, m.KV_SERVED)
        computed0 = metric(engines["decode"].url, m.PREFILL_TOKENS_COMPUTED)
        r = httpx.post(
            rt.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=30
        )
        assert r.status_code == 200
        assert metric(engines["prefill"].url, m.KV_SERVED) == served0
        assert metric(engines["decode"].url, m.PREFILL_TOKENS_COMPUTED) == computed0 + 2  # prefilled locally
        assert metric(rt.url, m.R_PREFILL_SKIPPED, reason="short_prompt") == 1
        r = httpx.post(
            rt.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}, timeout=30
        )  # ~17 tokens by chars/4: goes through prefill
        assert r.status_code == 200 and metric(engines["prefill"].url, m.KV_SERVED) == served0 + 1
    finally:
        rt.stop()


def test_decode_killed_mid_stream_ends_cleanly(engines, victim):
    victim.wait()
    rt = router_server(
        {"prefill": [engines["prefill"].url], "decode": [victim.url]}, read_timeout=5, connect_timeout=1
    )
    try:
        body = {
            "model": NAME,
            "prompt": PROMPT,
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        t0 = time.monotonic()
        with httpx.stream("POST", rt.url + "/v1/completions", json=body, timeout=30) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            victim.kill()
            rest = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - t0 < 10
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])
        assert err["error"]["code"] in (502, 504)
        # Later requests get a clean error at once, not a hang.
        t1 = time.monotonic()
        r = httpx.post(rt.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code in (502, 503) and "error" in r.json()
        assert time.monotonic() - t1 < 5
        assert metric(rt.url, m.R_ERRORS, pool="decode", reason="stream_broken") == 1
    finally:
        rt.stop()


def test_router_metrics_feed_autoscaler(engines, routers):
    pd, _ = routers
    with httpx.stream(
        "POST",
        pd.url + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True},
        timeout=30,
    ) as s:
        sse_events(s)
    sig = poll(lambda: parse_router_metrics(httpx.get(pd.url + "/metrics").text),
               lambda sig: sig["decode"].in_flight == 0 and sig["decode"].itl_recent is not None
               and sig["prefill"].ttft_recent is not None and sig["prefill"].prefill_recent is not None)
    assert sig["prefill"].replicas == 1 and sig["decode"].replicas == 1
    assert sig["prefill"].ttft_recent is not None and sig["prefill"].ttft_recent > 0
    assert sig["decode"].itl_recent is not None
    assert sig["prefill"].prefill_recent is not None and sig["prefill"].prefill_recent > 0
    assert sig["decode"].in_flight == 0 and sig["decode"].requests_total >= 1
    from kubeforge.runtime.serve.autoscale import read_router_signals

    both = read_router_signals([pd.url, pd.url, dead_url()])  # two scrapes of one router, one router gone
    assert both["decode"].requests_total == 2 * sig["decode"].requests_total
    assert both["prefill"].replicas == 1
    text = httpx.get(pd.url + "/metrics").text
    assert f'{m.R_TTFT}_count{{pool="prefill"}}' in text and f'{m.R_ITL}_count{{pool="decode"}}' in text


# ------------------------------------------------------------------------------------ with echo backends


@pytest.fixture()
def echoes():
    servers = []

    def make(delay=0.0, name="echo"):
        srv = ThreadServer(None)
        srv.server.config.app = echo_app(name, delay, srv.port)
        servers.append(srv.start())
        return srv

    yield make
    for s in servers:
        s.stop()


def test_least_outstanding_spreads_load(echoes):
    a, b = echoes(delay=0.05), echoes(delay=0.05)
    rt = router_server({"decode": [a.url, b.url]})
    try:
        ts = [
            threading.Thread(
                target=httpx.post,
                args=(rt.url + "/v1/completions",),
                kwargs={"json": {"prompt": "x", "max_tokens": 4}, "timeout": 30},
            )
            for _ in range(10)
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        na = metric(a.url, "kubeforge:echo_requests_total")
        nb = metric(b.url, "kubeforge:echo_requests_total")
        assert na + nb == 10 and abs(na - nb) <= 2, (na, nb)
    finally:
        rt.stop()


def test_client_supplied_kv_transfer_params_never_reach_an_engine(echoes):
    """kv_transfer_params name the host an engine pulls a KV cache from: a client that could set them would
    make the engine fetch from any address it likes (server-side request forgery). Only the params a
    prefill pod returned go to a decode pod."""
    forged = {"do_remote_prefill": True, "remote_host": "169.254.169.254", "remote_port": 80,
              "remote_engine_id": "x", "remote_block_ids": [1]}
    p, d, solo = echoes(name="p"), echoes(name="d"), echoes(name="solo")
    pd = router_server({"prefill": [p.url], "decode": [d.url]}, scrape_interval=0)
    skip = router_server({"prefill": [p.url], "decode": [d.url]}, scrape_interval=0,
                         prefill_threshold_tokens=10_000)  # short prompt: straight to decode
    agg = router_server({"decode": [solo.url]}, scrape_interval=0)
    try:
        for rt, backend in ((agg, solo), (skip, d)):
            r = httpx.post(rt.url + "/v1/completions", timeout=30,
                           json={"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": forged})
            assert r.status_code == 200
            last = httpx.get(backend.url + "/debug/last", timeout=10).json()
            assert set(last) == {"plain"}, last  # no decode leg with remote params was ever seen
            assert "kv_transfer_params" not in last["plain"]["body"]
        r = httpx.post(pd.url + "/v1/completions", timeout=30,
                       json={"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": forged})
        assert r.status_code == 200
        sent = httpx.get(d.url + "/debug/last", timeout=10).json()["decode"]["body"]["kv_transfer_params"]
        assert sent["remote_host"] != "169.254.169.254" and sent["remote_port"] != 80
    finally:
        for rt in (pd, skip, agg):
            rt.stop()


def test_decode_that_hangs_times_out(echoes):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)  # accepts connections, never answers
    hang = f"http://127.0.0.1:{lsock.getsockname()[1]}"
    p = echoes()
    rt = router_server(
        {"prefill": [p.url], "decode": [hang]}, read_timeout=1, request_timeout=1.5, scrape_interval=0
    )
    try:
        t0 = time.monotonic()
        r = httpx.post(rt.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        r = httpx.post(
            rt.url + "/v1/chat/completions", json={"messages": MESSAGES, "stream": True}, timeout=30
        )
        assert r.status_code == 504
        assert time.monotonic() - t0 < 6
    finally:
        rt.stop()
        lsock.close()


def test_a_stream_may_outlast_the_request_timeout(echoes):
    """request_timeout bounds a whole non-streaming answer; a stream is bounded by the gap between two
    chunks (read_timeout) and by stream_timeout when set, so a long generation is not cut."""
    slow = echoes(delay=0.05)  # 40 tokens: about 2 s, with a chunk every 0.05 s
    rt = router_server({"decode": [slow.url]}, read_timeout=10, request_timeout=0.5, scrape_interval=0)
    try:
        with httpx.stream("POST", rt.url + "/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 40, "stream": True}) as r:
            events = sse_events(r)
        assert not any("error" in e for e in events if isinstance(e, dict)), events
        assert sum(len(e["choices"][0]["text"]) for e in events if isinstance(e, dict)) == 40
    finally:
        rt.stop()


def _held_upstream():
    """A decode 'pod' that accepts a connection and never answers: the test holds the router's request."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    return lsock, f"http://127.0.0.1:{lsock.getsockname()[1]}"


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    c = socket.create_connection((host, int(port)))
    c.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return c


def test_concurrency_is_bounded_with_429(echoes):
    lsock, held = _held_upstream()
    rt = router_server({"decode": [held]}, max_in_flight=1, request_timeout=300, scrape_interval=0)
    try:
        first = _raw_post(rt.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        lsock.settimeout(60)
        upstream, _ = lsock.accept()  # the first request is in flight, held there
        r = httpx.post(rt.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        first.close()
        upstream.close()
    finally:
        rt.stop()
        lsock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_releases_the_upstream_request(stream):
    """The router closes its connection to the engine when the client disconnects, so the engine can stop
    the work (instead of the request holding a slot until the engine's own timeout)."""
    lsock, held = _held_upstream()
    rt = router_server({"decode": [held]}, request_timeout=300, read_timeout=300, scrape_interval=0)
    try:
        client = _raw_post(rt.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "stream": stream})
        lsock.settimeout(60)
        upstream, _ = lsock.accept()
        upstream.settimeout(60)  # a liveness bound for the test, far below the router's 300 s timeouts
        received = upstream.recv(65536)
        assert received.startswith(b"POST /v1/completions")
        client.close()
        rest = b"".join(iter(lambda: upstream.recv(65536), b""))  # returns once the router hangs up
        assert b"POST" not in rest
        upstream.close()
    finally:
        rt.stop()
        lsock.close()


def test_file_discovery_follows_pods(tmp_path, echoes):
    a, b = echoes(name="a"), echoes(name="b")
    f = tmp_path / "endpoints.json"
    f.write_text(json.dumps({"decode": [a.url]}))
    rt = router_server(discovery=FileDiscovery(str(f), interval=0.05))
    try:
        assert httpx.get(rt.url + "/health").json()["endpoints"] == {"prefill": 0, "decode": 1}
        f.write_text(json.dumps({"prefill": [a.url], "decode": [b.url]}))
        assert wait_for(rt.router.discovery, lambda s: s.get("prefill") == [a.url])
        r = httpx.post(rt.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=10)
        assert r.status_code == 200
        assert metric(a.url, "kubeforge:echo_requests_total", leg="prefill") == 1
        assert metric(b.url, "kubeforge:echo_requests_total", leg="decode") == 1
        f.write_text(json.dumps({"decode": []}))
        assert wait_for(rt.router.discovery, lambda s: s.get("decode") == [])
        r = httpx.post(rt.url + "/v1/completions", json={"prompt": PROMPT}, timeout=10)
        assert r.status_code == 503
        assert httpx.get(rt.url + "/ready").status_code == 503
    finally:
        rt.stop()


def _pod(name, ip, ready=True, phase="Running", deleting=False):
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, deletion_timestamp="now" if deleting else None),
        status=SimpleNamespace(
            phase=phase,
            pod_ip=ip,
            conditions=[SimpleNamespace(type="Ready", status="True" if ready else "False")],
        ),
    )


def test_kubernetes_discovery_keeps_ready_pods():
    d = KubernetesDiscovery("ns", {"prefill": "role=prefill", "decode": "role=decode"}, 8000)
    d.apply_event("decode", "ADDED", _pod("d0", "10.0.0.1", ready=False))
    assert d.snapshot()["decode"] == []
    d.apply_event("decode", "MODIFIED", _pod("d0", "10.0.0.1"))
    d.apply_event("decode", "ADDED", _pod("d1", "10.0.0.2"))
    d.apply_event("prefill", "ADDED", _pod("p0", "10.0.1.1"))
    assert d.snapshot() == {
        "prefill": ["http://10.0.1.1:8000"],
        "decode": ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
    }
    d.apply_event("decode", "MODIFIED", _pod("d1", "10.0.0.2", deleting=True))  # terminating: out at once
    d.apply_event("prefill", "DELETED", _pod("p0", "10.0.1.1"))
    assert d.snapshot() == {"prefill": [], "decode": ["http://10.0.0.1:8000"]}


def test_bad_requests_and_models(echoes):
    a = echoes()
    rt = router_server({"decode": [a.url]})
    try:
        r = httpx.post(rt.url + "/v1/completions", content=b"{not json", timeout=10)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(rt.url + "/v1/models").json()["data"][0]["id"] == "echo"
        assert httpx.get(rt.url + "/health").status_code == 200
    finally:
        rt.stop()


def test_kubernetes_discovery_list_and_watch_over_http():
    """The real client against a minimal Pods API on loopback: list, then watch events as pods come and go."""
    import asyncio

    kubernetes = pytest.importorskip("kubernetes")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def pod(name, ip, ready=True):
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "labels": {"role": "decode"}},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }

    events: list[dict] = []
    seen_selectors: list[str] = []

    async def pods(request):
        seen_selectors.append(request.query_params.get("labelSelector", ""))
        if request.query_params.get("watch") not in ("true", "True", "1"):
            return JSONResponse(
                {
                    "apiVersion": "v1",
                    "kind": "PodList",
                    "metadata": {"resourceVersion": "1"},
                    "items": [pod("d0", "10.0.0.1")],
                }
            )

        async def stream():
            sent = 0
            for _ in range(200):
                while sent < len(events):
                    yield (json.dumps(events[sent]) + "\n").encode()
                    sent += 1
                await asyncio.sleep(0.02)

        return StreamingResponse(stream(), media_type="application/json")

    api_srv = ThreadServer(Starlette(routes=[Route("/api/v1/namespaces/ns/pods", pods)])).start()
    cfg = kubernetes.client.Configuration()
    cfg.host = api_srv.url
    api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
    d = KubernetesDiscovery("ns", {"decode": "role=decode"}, 8000, api=api)
    d.start()
    try:
        assert wait_for(d, lambda s: s.get("decode") == ["http://10.0.0.1:8000"])
        events.append({"type": "ADDED", "object": pod("d1", "10.0.0.2")})
        assert wait_for(d, lambda s: s.get("decode") == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
        events.append({"type": "MODIFIED", "object": pod("d0", "10.0.0.1", ready=False)})
        events.append({"type": "DELETED", "object": pod("d1", "10.0.0.2")})
        assert wait_for(d, lambda s: s.get("decode") == [])
        assert seen_selectors[0] == "role=decode"
    finally:
        d.stop()
        api_srv.stop()


def test_router_cli_discovery_choice(tmp_path):
    from kubeforge.runtime.serve.router import make_discovery, parse_args

    a = parse_args(
        [
            "--k8s-namespace",
            "team",
            "--k8s-prefill-selector",
            "a=b,role=prefill",
            "--k8s-decode-selector",
            "a=b,role=decode",
            "--k8s-port",
            "8001",
        ]
    )
    d = make_discovery(a)
    assert isinstance(d, KubernetesDiscovery)
    assert (d.namespace, d.selectors, d.ports) == (
        "team",
        {"prefill": "a=b,role=prefill", "decode": "a=b,role=decode"},
        {"prefill": 8001, "decode": 8001},
    )
    f = tmp_path / "e.json"
    f.write_text('{"decode": ["127.0.0.1:9/v1/"]}')
    assert make_discovery(parse_args(["--discovery-file", str(f)])).snapshot() == {
        "decode": ["http://127.0.0.1:9"]
    }
    d = make_discovery(parse_args(["--prefill", "http://p:1", "--decode", "http://d:2"]))
    assert d.snapshot() == {"prefill": ["http://p:1"], "decode": ["http://d:2"]}


def test_router_cli_pd_flow_and_request_id(echoes):
    """The router as its CLI runs it: the prefill leg is rewritten as vLLM's proxy does, the decode leg gets
    the prefill's kv_transfer_params, and both legs carry the same X-Request-Id."""
    from kubeforge.runtime.serve.testing import Proc

    p, d = echoes(name="p"), echoes(name="d")
    port = free_port()
    rt = Proc(
        "kubeforge.runtime.serve.router",
        [
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prefill",
            p.url,
            "--decode",
            d.url,
            "--log-level",
            "warning",
        ],
        port,
    ).wait(30)
    try:
        r = httpx.post(
            rt.url + "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 5, "min_tokens": 2, "stream": False},
            headers={"X-Request-Id": "abc-123"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["id"] == "abc-123" and j["choices"][0]["message"]["content"] == "xxxxx"
        kv = j["received_kv_transfer_params"]
        assert kv["do_remote_prefill"] is True and kv["remote_block_ids"] == [
            "abc-123"
        ]  # the prefill leg's id
        assert (kv["remote_host"], kv["remote_port"]) == ("127.0.0.1", p.port)
        pre = httpx.get(p.url + "/debug/last").json()["prefill"]
        dec = httpx.get(d.url + "/debug/last").json()["decode"]
        assert pre["headers"]["x-request-id"] == dec["headers"]["x-request-id"] == "abc-123"
        pb = pre["body"]
        assert (pb["stream"], pb["max_tokens"]) == (False, 1) and "min_tokens" not in pb
        assert pb["kv_transfer_params"] == {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
        assert pb["messages"] == MESSAGES
        db = dec["body"]
        assert (db["max_tokens"], db["min_tokens"], db["stream"]) == (5, 2, False)  # the client's own body
        with httpx.stream(
            "POST",
            rt.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 3, "stream": True},
            timeout=10,
        ) as s:
            ev = sse_events(s)
        assert ev[-1] == "[DONE]" and len(ev) == 4
    finally:
        rt.stop()


def test_router_sigterm_drains(echoes):
    """The router on SIGTERM: readiness 503 at once, the stream in flight completes, then a clean exit."""
    import signal

    from kubeforge.runtime.serve.testing import Proc

    d = echoes(delay=0.05)
    port = free_port()
    rt = Proc(
        "kubeforge.runtime.serve.router",
        ["--host", "127.0.0.1", "--port", str(port), "--decode", d.url, "--min-drain-seconds", "0.3"],
        port,
    ).wait(30)
    try:
        with httpx.stream(
            "POST",
            rt.url + "/v1/completions",
            json={"prompt": "x", "max_tokens": 20, "stream": True},
            timeout=10,
        ) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            rt.signal(signal.SIGTERM)
            assert poll(lambda: httpx.get(rt.url + "/ready").status_code, lambda code: code == 503) == 503
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and len(rest) == 20  # 19 more tokens, then [DONE]
        assert rt.proc.wait(10) == 0
    finally:
        rt.stop()


def test_prompt_length_estimate(model_dir):
    rough = Router(StaticDiscovery({}), RouterConfig())
    assert rough.estimate_tokens("/completions", {"prompt": "x" * 40}) == 10  # chars / 4
    assert rough.estimate_tokens("/completions", {"prompt": [1, 2, 3]}) == 3  # token ids
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 20}]}]}
    assert rough.estimate_tokens("/chat/completions", chat) == 5
    exact = Router(StaticDiscovery({}), RouterConfig(tokenizer=model_dir))
    assert exact.estimate_tokens("/completions", {"prompt": "hello"}) == 5  # byte tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": "hi"}]
    want = len(
        tok.encode(
            tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
    )  # what the engine runs
    assert exact.estimate_tokens("/chat/completions", {"messages": msgs}) == want > 4
