"""The engines' internal endpoints over real HTTP: KV-cache transfer (/kv/*), weight sync (/kubeforge/v1/*)
and kv_transfer_params answer only the deployment's token; the router and the decode engines send it, so the
disaggregated flow works end to end with it and fails closed without it."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kubeforge.contract import KV_TOKEN_HEADER  # noqa: E402
from kubeforge.runtime.serve import metrics as m  # noqa: E402
from kubeforge.runtime.serve.discovery import StaticDiscovery  # noqa: E402
from kubeforge.runtime.serve.engine import Engine  # noqa: E402
from kubeforge.runtime.serve.engine import build_app as engine_app  # noqa: E402
from kubeforge.runtime.serve.router import Router, RouterConfig  # noqa: E402
from kubeforge.runtime.serve.router import build_app as router_app  # noqa: E402
from kubeforge.runtime.serve.testing import ThreadServer, metric  # noqa: E402
from kubeforge.runtime.tinymodel import save_tiny_model  # noqa: E402

NAME = "tiny"
TOKEN = "kv-token-of-this-deployment-7f3a"
PROMPT = "Only the deployment's own pods may pull a KV cache."
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return str(save_tiny_model(tmp_path_factory.mktemp("kv-auth") / "model", seed=11))


def engine_server(model_dir: str, role: str, token: str | None) -> ThreadServer:
    srv = ThreadServer(None)
    eng = Engine(model_dir, NAME, role=role, advertise_host="127.0.0.1", port=srv.port, kv_token=token)
    srv.server.config.app = engine_app(eng)
    srv.engine = eng
    return srv.start()


@pytest.fixture(scope="module")
def pool(model_dir):
    """A prefill and a decode engine holding the token, and a router sending it."""
    prefill = engine_server(model_dir, "prefill", TOKEN)
    decode = engine_server(model_dir, "decode", TOKEN)
    router = ThreadServer(router_app(Router(
        StaticDiscovery({"prefill": [prefill.url], "decode": [decode.url]}),
        RouterConfig(scrape_interval=0, prefill_fallback=False, kv_token=TOKEN)))).start()
    yield prefill, decode, router
    for s in (router, prefill, decode):
        s.stop()


def prefill_once(prefill: ThreadServer, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(prefill.url + "/v1/completions", headers=headers, timeout=30, json={
        "model": NAME, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "kv_transfer_params": PREFILL_PARAMS})


def test_kv_endpoint_needs_the_token(pool):
    prefill, _, _ = pool
    served = metric(prefill.url, m.KV_SERVED)
    r = prefill_once(prefill, {KV_TOKEN_HEADER: TOKEN})
    assert r.status_code == 200, r.text
    tid = r.json()["kv_transfer_params"]["remote_block_ids"][0]
    url = f"{prefill.url}/kv/{tid}"
    missing = httpx.get(url, timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    for wrong in ("", "x", TOKEN[:-1], TOKEN + "0", TOKEN.upper()):
        assert httpx.get(url, headers={KV_TOKEN_HEADER: wrong}, timeout=10).status_code == 403, wrong
    # a client's own credentials are no substitute
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 401
    assert metric(prefill.url, m.KV_SERVED) == served, "a refused request was handed a KV cache"
    # the refusals consumed nothing: the cache is still there for the holder of the token
    ok = httpx.get(url, headers={KV_TOKEN_HEADER: TOKEN}, timeout=10)
    assert ok.status_code == 200 and len(ok.content) > 0
    assert httpx.get(url, headers={KV_TOKEN_HEADER: TOKEN}, timeout=10).status_code == 404  # handed off once


def test_kv_transfer_params_need_the_token(pool):
    prefill, decode, _ = pool
    # without it, an engine neither keeps a cache for someone nor fetches one from a host a caller names
    assert prefill_once(prefill, {}).status_code == 401
    assert prefill_once(prefill, {KV_TOKEN_HEADER: "guess"}).status_code == 403
    fetch = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "x",
             "remote_block_ids": ["x"], "remote_host": "169.254.169.254", "remote_port": 80}
    r = httpx.post(decode.url + "/v1/completions", timeout=30, json={
        "model": NAME, "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": fetch})
    assert r.status_code == 401
    assert metric(decode.url, m.KV_FETCH_FAILED) == 0, "the engine tried the fetch before refusing"
    # plain OpenAI requests need no token
    plain = httpx.post(decode.url + "/v1/completions", timeout=30,
                       json={"model": NAME, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert plain.status_code == 200, plain.text


def test_weight_sync_and_shutdown_need_the_token(pool):
    prefill, _, _ = pool
    assert httpx.put(prefill.url + "/kubeforge/v1/weights?version=9", content=b"junk", timeout=10).status_code == 401
    assert httpx.post(prefill.url + "/kubeforge/v1/shutdown", timeout=10).status_code == 401
    assert httpx.post(prefill.url + "/kubeforge/v1/shutdown", headers={KV_TOKEN_HEADER: "no"},
                      timeout=10).status_code == 403
    got = httpx.get(prefill.url + "/kubeforge/v1/weights", headers={KV_TOKEN_HEADER: TOKEN}, timeout=10)
    assert got.status_code == 200 and got.json()["version"] == 0
    assert httpx.get(prefill.url + "/v1/models", timeout=10).status_code == 200  # still serving


def test_router_and_decode_send_the_token_end_to_end(pool):
    prefill, decode, router = pool
    fetched = metric(decode.url, m.KV_FETCHED)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    r = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    direct = httpx.post(decode.url + "/v1/completions", json=body, timeout=60)
    assert r.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
    assert metric(decode.url, m.KV_FETCHED) == fetched + 1, "the decode engine did not pull the prefill's cache"
    assert TOKEN not in r.text and all(TOKEN not in v for v in r.headers.values())


def test_a_router_without_the_token_is_refused(model_dir, pool):
    prefill, decode, _ = pool
    stranger = ThreadServer(router_app(Router(
        StaticDiscovery({"prefill": [prefill.url], "decode": [decode.url]}),
        RouterConfig(scrape_interval=0, prefill_fallback=False)))).start()
    try:
        r = httpx.post(stranger.url + "/v1/completions", timeout=60,
                       json={"model": NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 401, r.text
    finally:
        stranger.stop()


def test_without_a_token_configured_the_endpoints_stay_open(model_dir):
    """Local runs and RLJob rollout engines (which get no token) keep today's behaviour."""
    srv = engine_server(model_dir, "prefill", None)
    try:
        r = prefill_once(srv, {})
        assert r.status_code == 200
        tid = r.json()["kv_transfer_params"]["remote_block_ids"][0]
        assert httpx.get(f"{srv.url}/kv/{tid}", timeout=10).status_code == 200
    finally:
        srv.stop()
