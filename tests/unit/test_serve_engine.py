"""The reference engine over real HTTP on loopback: OpenAI API, P/D KV hand-off, metrics, drain."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kubeforge.runtime.serve import metrics as m  # noqa: E402
from kubeforge.runtime.serve.engine import Engine, build_app  # noqa: E402
from kubeforge.runtime.serve.kvcache import KVStore  # noqa: E402
from kubeforge.runtime.serve.testing import ThreadServer, engine_proc, metric, sse_events  # noqa: E402
from kubeforge.runtime.tinymodel import save_tiny_model  # noqa: E402

NAME = "tiny"
PROMPT = "The quick brown fox jumps over"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, engine"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return str(save_tiny_model(tmp_path_factory.mktemp("serve-engine") / "model", seed=3))


@pytest.fixture(scope="module", autouse=True)
def drain_engine(model_dir, tmp_path_factory):
    """An engine in its own process for the SIGTERM test, started first so its start-up overlaps the tests."""
    log = tmp_path_factory.mktemp("drain") / "engine.log"
    proc = engine_proc(model_dir, extra=["--drain-timeout", "60"], log_path=str(log))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def generate(ids: list[int], n: int) -> str:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    def completion(prompt: str, n: int) -> str:
        return generate(tok.encode(prompt), n)

    def chat(messages, n: int) -> str:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return generate(tok.encode(text, add_special_tokens=False), n)

    return completion, chat


def _server(model_dir, role, policy="fail", ttl=60.0):
    srv = ThreadServer(None)
    eng = Engine(
        model_dir,
        NAME,
        role=role,
        kv_load_failure_policy=policy,
        advertise_host="127.0.0.1",
        port=srv.port,
        kv_store=KVStore(ttl=ttl),
    )
    srv.server.config.app = build_app(eng)
    srv.engine = eng
    return srv.start()


@pytest.fixture(scope="module")
def engines(model_dir):
    both = _server(model_dir, "both", policy="recompute")
    prefill = _server(model_dir, "prefill")
    decode = _server(model_dir, "decode", policy="fail")
    yield both, prefill, decode
    for s in (both, prefill, decode):
        s.stop()


PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def test_completions_greedy_matches_generate(engines, reference):
    both, _, _ = engines
    r = httpx.post(
        both.url + "/v1/completions",
        json={"model": NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion" and j["model"] == NAME
    assert j["choices"][0]["text"] == reference[0](PROMPT, 12)
    assert j["choices"][0]["finish_reason"] in ("length", "stop")
    assert j["usage"]["prompt_tokens"] == len(PROMPT.encode())
    assert j["usage"]["total_tokens"] == j["usage"]["prompt_tokens"] + j["usage"]["completion_tokens"]


def test_streaming_completions_and_chat(engines, reference):
    both, _, _ = engines
    body = {
        "model": NAME,
        "prompt": PROMPT,
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", both.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    assert ev[-2]["usage"]["completion_tokens"] == 10 and ev[-2]["choices"] == []
    text = "".join(e["choices"][0]["text"] for e in ev[:-2])
    assert text == reference[0](PROMPT, 10)
    assert ev[-3]["choices"][0]["finish_reason"] == "length"

    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 9, "temperature": 0, "stream": True}
    with httpx.stream("POST", both.url + "/v1/chat/completions", json=body, timeout=30) as r:
        ev = sse_events(r)
    assert ev[-1] == "[DONE]" and ev[0]["object"] == "chat.completion.chunk"
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in ev[:-1])
    assert text == reference[1](MESSAGES, 9)

    r = httpx.post(
        both.url + "/v1/chat/completions",
        json={"model": NAME, "messages": MESSAGES, "max_tokens": 9, "temperature": 0},
        timeout=30,
    )
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": text}


def test_disaggregated_kv_handoff_equals_aggregated(engines, reference):
    _, prefill, decode = engines
    computed_before = metric(decode.url, m.PREFILL_TOKENS_COMPUTED)
    for api, extra, ref in (
        ("/v1/completions", {"prompt": PROMPT}, reference[0](PROMPT, 14)),
        ("/v1/chat/completions", {"messages": MESSAGES}, reference[1](MESSAGES, 14)),
    ):
        body = {"model": NAME, "max_tokens": 14, "temperature": 0, **extra}
        p = httpx.post(
            prefill.url + api,
            json={**body, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS},
            headers={"X-Request-Id": "req-1"},
            timeout=30,
        )
        assert p.status_code == 200, p.text
        kv = p.json()["kv_transfer_params"]
        assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
        assert kv["remote_engine_id"] == prefill.engine.engine_id
        assert (kv["remote_host"], kv["remote_port"]) == ("127.0.0.1", prefill.port)
        assert len(kv["remote_block_ids"]) == 1
        assert p.json()["usage"]["completion_tokens"] == 1
        d = httpx.post(
            decode.url + api,
            json={**body, "kv_transfer_params": kv},
            headers={"X-Request-Id": "req-1"},
            timeout=30,
        )
        assert d.status_code == 200, d.text
        got = d.json()["choices"][0]
        assert (got.get("text") if "text" in got else got["message"]["content"]) == ref
        # The cache is freed once fetched.
        assert httpx.get(f"{prefill.url}/kv/{kv['remote_block_ids'][0]}").status_code == 404
    # The decode engine computed no prompt token: both prompts came over as KV caches.
    assert metric(decode.url, m.PREFILL_TOKENS_COMPUTED) == computed_before
    assert metric(decode.url, m.KV_FETCHED) >= 2
    assert metric(prefill.url, m.KV_SERVED) >= 2


def test_kv_load_failure_policies(engines, reference):
    both, prefill, decode = engines
    bad = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "gone",
        "remote_block_ids": ["nope"],
        "remote_host": "127.0.0.1",
        "remote_port": prefill.port,
    }
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "kv_transfer_params": bad}
    t0 = time.monotonic()
    r = httpx.post(decode.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["type"] == "kv_transfer_error"
    assert time.monotonic() - t0 < 5
    r = httpx.post(both.url + "/v1/completions", json=body, timeout=30)  # policy recompute
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[0](PROMPT, 6)
    assert metric(both.url, m.KV_FETCH_FAILED) >= 1

    # A cache for another prompt is refused, not silently used.
    p = httpx.post(
        prefill.url + "/v1/completions",
        json={
            "model": NAME,
            "prompt": "something else",
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": PREFILL_PARAMS,
        },
        timeout=30,
    ).json()["kv_transfer_params"]
    r = httpx.post(decode.url + "/v1/completions", json={**body, "kv_transfer_params": p}, timeout=30)
    assert r.status_code == 502 and "another prompt" in r.json()["error"]["message"]


def test_sampling_with_seed_is_reproducible_and_disaggregates(engines):
    both, prefill, decode = engines
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    a = httpx.post(both.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    b = httpx.post(both.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    assert a == b
    kv = httpx.post(
        prefill.url + "/v1/completions", json={**body, "kv_transfer_params": PREFILL_PARAMS}, timeout=30
    ).json()["kv_transfer_params"]
    c = httpx.post(decode.url + "/v1/completions", json={**body, "kv_transfer_params": kv}, timeout=30)
    assert c.json()["choices"][0]["text"] == a


def test_api_errors_and_models(engines):
    both, _, _ = engines
    r = httpx.get(both.url + "/v1/models").json()
    assert r["data"][0]["id"] == NAME
    assert httpx.get(both.url + "/health").status_code == 200
    assert httpx.post(both.url + "/v1/completions", json={"model": "other", "prompt": "x"}).status_code == 404
    r = httpx.post(both.url + "/v1/completions", json={"prompt": "x", "max_tokens": 100000})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert httpx.post(both.url + "/v1/chat/completions", json={"messages": []}).status_code == 400


def test_stop_strings_and_metrics(engines, reference):
    both, _, _ = engines
    full = reference[0](PROMPT, 12)
    stop = full[4:6]
    r = httpx.post(
        both.url + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop]},
        timeout=30,
    ).json()
    assert r["choices"][0]["text"] == full[: full.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    text = httpx.get(both.url + "/metrics").text
    s = m.parse_text(text)
    for name in (
        m.VLLM_WAITING,
        m.VLLM_RUNNING,
        m.VLLM_KV_USAGE,
        m.VLLM_TTFT + "_count",
        m.VLLM_ITL + "_count",
        m.PREFILL_TOKENS_COMPUTED,
        m.KV_FETCHED,
    ):
        assert m.find_samples(s, name), name
    assert m.sum_samples(s, m.VLLM_TTFT + "_count") >= 1
    assert 'model_name="tiny"' in text


def test_queue_and_concurrency(engines, reference):
    """More requests than --max-num-seqs: some wait, all finish with the right text."""
    both, _, _ = engines
    results: list = [None] * 10
    waiting_seen = []

    def go(i):
        results[i] = httpx.post(
            both.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
            timeout=60,
        ).json()

    ts = [threading.Thread(target=go, args=(i,)) for i in range(10)]
    for t in ts:
        t.start()
    # watch the engine until it showed queued or running work, or every request is already answered
    deadline = time.monotonic() + 60
    while not (waiting_seen and max(waiting_seen) >= 1) and any(t.is_alive() for t in ts) \
            and time.monotonic() < deadline:
        waiting_seen.append(metric(both.url, m.VLLM_WAITING) + metric(both.url, m.VLLM_RUNNING))
    for t in ts:
        t.join()
    want = reference[0](PROMPT, 12)
    assert all(r["choices"][0]["text"] == want for r in results)
    assert max(waiting_seen) >= 1


def test_a_client_that_goes_away_frees_its_non_streaming_request(model_dir):
    """The engine stops a non-streaming request whose client disconnected (a router that gave up, a user
    who closed the tab) instead of holding it until its 600 s timeout. The engine's worker is stopped, so
    the request waits in the queue for as long as the test needs: nothing depends on timing."""
    import socket

    srv = _server(model_dir, "both")
    try:
        srv.engine.stop()
        srv.engine._worker.join(30)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 8}).encode()
        client = socket.create_connection(("127.0.0.1", srv.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

        def open_requests(want: int) -> int:
            deadline = time.monotonic() + 30
            while srv.engine.open_requests != want and time.monotonic() < deadline:
                time.sleep(0.02)
            return srv.engine.open_requests

        assert open_requests(1) == 1  # submitted, waiting for the (stopped) worker
        queued = list(srv.engine.queue.queue)
        client.close()
        assert open_requests(0) == 0
        assert [q.cancelled for q in queued] == [True]  # the worker would drop it, not run it
    finally:
        srv.stop()


def test_a_full_queue_answers_429(model_dir):
    """Back-pressure: with --max-waiting requests queued (the worker is stopped, so they stay queued) the
    next one is refused with 429 and Retry-After instead of joining an unbounded queue."""
    srv = _server(model_dir, "both")
    srv.engine.max_waiting = 1
    try:
        srv.engine.stop()
        srv.engine._worker.join(30)
        held = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", timeout=60,
                                                          json={"prompt": PROMPT, "max_tokens": 4}), daemon=True)
        held.start()
        deadline = time.monotonic() + 30
        while srv.engine.queue.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_then_exits(drain_engine):
    """Scale-down: SIGTERM refuses new work (readiness 503) but finishes the streams already running and keeps
    serving the KV caches that decode engines have yet to fetch; it exits once both are done.

    The prefill leg's KV cache, held until the test fetches it, is what keeps the engine up while the test
    looks at it: the test never relies on a stream outlasting a fixed sleep."""
    eng = drain_engine.wait()
    try:
        held = httpx.post(
            eng.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "kv_transfer_params": PREFILL_PARAMS},
            timeout=30,
        )
        assert held.status_code == 200, held.text
        kv = held.json()["kv_transfer_params"]
        body = {
            "prompt": PROMPT,
            "max_tokens": 300,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", eng.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert first
            eng.signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while httpx.get(eng.url + "/v1/models").status_code != 503:  # readiness flips on the signal
                assert time.monotonic() < deadline, "readiness never failed after SIGTERM"
                time.sleep(0.02)
            assert httpx.post(eng.url + "/v1/completions", json={"prompt": "x"}).status_code == 503
            assert httpx.get(eng.url + "/health").status_code == 200  # liveness holds
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 300  # every token arrived
        assert json.loads(rest[-3][6:])["choices"][0]["finish_reason"] == "length"
        # Still draining: the KV cache a decode engine would fetch is served, and only then does it exit.
        assert eng.proc.poll() is None
        fetched = httpx.get(f"{eng.url}/kv/{kv['remote_block_ids'][0]}", timeout=30)
        assert fetched.status_code == 200 and len(fetched.content) > 0
        assert eng.proc.wait(15) == 0
    finally:
        eng.stop()


def test_kv_store_bounds_ttl_and_wire_format():
    from kubeforge.runtime.serve.kvcache import KVEntry, KVTransferError, deserialize, serialize

    def entry(n=4):
        layer = (torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8))
        return KVEntry(list(range(n)), [layer, layer], torch.randn(16), {"m": 1})

    store = KVStore(max_entries=2, max_bytes=1 << 20, ttl=60.0)
    a, b, c = store.put(entry()), store.put(entry()), store.put(entry())
    assert len(store) == 2 and store.pop(a) is None and store.evicted == 1  # oldest evicted
    got = store.pop(b)
    assert got is not None and store.pop(b) is None  # freed when fetched
    store.sweep(now=time.monotonic() + 61)
    assert len(store) == 0 and store.expired == 1 and store.nbytes == 0 and c
    small = KVStore(max_entries=10, max_bytes=entry().nbytes * 2)
    ids = [small.put(entry()) for _ in range(3)]
    assert len(small) == 2 and small.pop(ids[0]) is None  # byte bound

    e = entry(5)
    back = deserialize(serialize(e))
    assert back.prompt_ids == e.prompt_ids and back.model_sig == e.model_sig
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(back.layers, e.layers))
    assert torch.equal(back.last_logits, e.last_logits)
    with pytest.raises(KVTransferError):
        deserialize(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
